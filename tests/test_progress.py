"""Test that progress bars are drawn on a terminal only, through the long stages that use them."""

import contextlib
import io

import pytest
import torch

import mixq
from mixq import progress as mprogress
from mixq import search
from mixq.api import prepare
from mixq.sensitivity import hutchinson_trace


class FakeTerminal(io.StringIO):
    """A stderr that claims to be a terminal and keeps what is written to it."""

    def isatty(self):
        return True


@contextlib.contextmanager
def terminal():
    """Make stderr a fake terminal; inside the test body, as pytest re-captures between phases."""
    stream = FakeTerminal()
    with contextlib.redirect_stderr(stream):
        yield stream


@pytest.fixture(autouse=True)
def progress_on(monkeypatch):
    monkeypatch.delenv("MIXQ_PROGRESS", raising=False)


def test_quiet_when_stderr_is_not_a_terminal(capsys):
    items = [1, 2, 3]
    assert not mprogress.enabled()  # pytest captures stderr: not a terminal
    assert mprogress.progress(items, "quiet") is items
    with mprogress.Bar(3, "quiet") as bar:
        bar.update()
        bar.set(loss=1.0)
    assert capsys.readouterr().err == ""


def test_draws_on_a_terminal():
    with terminal() as tty:
        assert mprogress.enabled()
        assert list(mprogress.progress(range(4), "stage-a", unit="job")) == [0, 1, 2, 3]
        with mprogress.Bar(2, "stage-b") as bar:
            bar.update(2)
    text = tty.getvalue()
    # tqdm draws the empty bar at once (later redraws are rate-limited, and leave=False clears it)
    assert "stage-a:   0%" in text and "0/4" in text and "stage-b:   0%" in text and "0/2" in text


def test_off_switch_and_show_flag(monkeypatch):
    with terminal() as tty:
        assert mprogress.progress([1], "hidden", show=False) == [1]
        monkeypatch.setenv("MIXQ_PROGRESS", "0")
        assert not mprogress.enabled()
        list(mprogress.progress([1, 2], "hidden"))
    assert tty.getvalue() == ""


def test_long_stages_draw_bars_on_a_terminal():
    task = mixq.tasks.get("synthetic-mlp")
    qmodel, infos = prepare(task, [mixq.parse_candidate("w4")])
    layers = [i.name for i in infos]
    costs = {"bits": torch.tensor([[2.0, 4.0, 8.0]] * 3)}
    problem = search.Problem(scores=torch.tensor([[2.0, 1.0, 0.0]] * 3), costs=costs, budgets={"bits": 24.0})
    with terminal() as tty:
        hutchinson_trace(qmodel, task, layers, batches=task.calib[:1], n_samples=2)
        search.pareto_sweep(problem, "bits", [6.0, 12.0, 24.0])
    text = tty.getvalue()
    assert f"hutchinson trace:   0%|          | 0/{len(layers)}" in text  # one step per batch and layer
    assert "pareto sweep (bits):   0%|          | 0/3" in text
