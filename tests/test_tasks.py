"""Tests of ``mixq.tasks.get``: built-in tasks by name, with the validation and calibration sizes."""

import importlib.util

import pytest
import torch

from mixq import tasks


def same_batches(a, b) -> bool:
    """Whether two lists of (inputs, labels) or dict batches hold equal tensors."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        xs = list(x.values()) if isinstance(x, dict) else list(x)
        ys = list(y.values()) if isinstance(y, dict) else list(y)
        if len(xs) != len(ys) or not all(torch.equal(u, v) for u, v in zip(xs, ys, strict=True)):
            return False
    return True


def test_sizes_give_the_factory_task_and_none_keeps_the_default():
    small = tasks.get("mnist-cnn", val_size=300, calib_size=64)
    ref = tasks.mnist_cnn(val_size=300, calib_size=64)
    assert same_batches(small.val, ref.val) and same_batches(small.calib, ref.calib)
    assert small.info == ref.info and sum(len(y) for _, y in small.val) == 300
    default = tasks.get("mnist-cnn")
    assert default.info == tasks.mnist_cnn().info
    # the first N validation images of the full set, and the same calibration draw at the same size
    assert torch.equal(small.val[0][0], default.val[0][0][:300])
    same_calib = tasks.get("mnist-cnn", val_size=300)
    assert same_batches(same_calib.calib, default.calib)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs mixq[hf]")
def test_minilm_sizes():
    t = tasks.get("minilm", val_size=8, calib_size=4)
    ref = tasks.minilm(val_size=8, calib_size=4)
    assert same_batches(t.val, ref.val) and same_batches(t.calib, ref.calib)
    assert (t.info["val_sentences"], t.info["calib_sentences"]) == (8, 4)


def test_synthetic_task_without_size_knobs():
    assert same_batches(tasks.get("synthetic-mlp").val, tasks.synthetic_mlp().val)
    with pytest.raises(ValueError, match=r"'synthetic-mlp' has no val_size \(got 10\).*mnist-cnn"):
        tasks.get("synthetic-mlp", val_size=10)
    with pytest.raises(ValueError, match=r"'synthetic-cnn' has no calib_size \(got 5\)"):
        tasks.get("synthetic-cnn", calib_size=5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100"])
def test_bad_sizes_name_the_value(bad):
    with pytest.raises(ValueError, match=rf"val_size must be a positive int or None .*got {bad!r}"):
        tasks.get("mnist-cnn", val_size=bad)
    with pytest.raises(ValueError, match=rf"calib_size must be a positive int or None .*got {bad!r}"):
        tasks.get("minilm", calib_size=bad)


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'mnist'; valid: mnist-cnn, minilm"):
        tasks.get("mnist", val_size=10)
