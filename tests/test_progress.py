"""Test the feedback on long stages: bars on a terminal, lines with the time left, slow-stage warnings."""

import contextlib
import io
import logging

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


class Clock:
    """A perf_counter that moves only when told: ``tick`` seconds per call of ``advance``."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(mprogress, "time", c)
    return c


def test_no_bar_and_no_lines_for_a_quick_stage_off_a_terminal(capsys, caplog):
    caplog.set_level(logging.INFO, logger="mixq.progress")
    assert not mprogress.enabled()  # pytest captures stderr: not a terminal
    assert list(mprogress.progress([1, 2, 3], "quiet")) == [1, 2, 3]
    with mprogress.Bar(3, "quiet") as bar:
        bar.update()
        bar.set(loss=1.0)
    assert capsys.readouterr().err == "" and caplog.records == []  # done within QUIET_S


def test_one_line_per_unit_of_work_with_the_time_left(clock, caplog):
    caplog.set_level(logging.INFO, logger="mixq.progress")
    with mprogress.Bar(4 * 100, "adaround", unit="step", per_line=100, line_unit="layer") as bar:
        for _ in range(4):
            for _ in range(4):  # updates inside a unit log nothing
                clock.now += 2.5
                bar.update(25)
    assert [r.getMessage() for r in caplog.records] == [
        "adaround: layer 1/4 (25%), 10 s elapsed, about 30 s left",
        "adaround: layer 2/4 (50%), 20 s elapsed, about 20 s left",
        "adaround: layer 3/4 (75%), 30 s elapsed, about 10 s left",
        "adaround: layer 4/4 (100%), 40 s elapsed",
    ]
    assert {r.levelno for r in caplog.records} == {logging.INFO}


def test_progress_over_items_logs_each_item_and_skips_resumed_work(clock, caplog):
    caplog.set_level(logging.INFO, logger="mixq.progress")

    def slow(n):
        for i in range(n):
            clock.now += 70
            yield i

    assert list(mprogress.progress(slow(3), "bench", total=3, unit="run")) == [0, 1, 2]
    with mprogress.Bar(10, "train", unit="step", per_line=5, line_unit="epoch", start=5) as bar:
        clock.now += 30
        bar.update(5)
    warning, *lines = caplog.records
    assert warning.getMessage() == "bench will take about 3 min 30 s (3 runs, estimated from the first 1)"
    assert [r.getMessage() for r in lines] == [
        "bench: run 1/3 (33%), 1 min 10 s elapsed, about 2 min 20 s left",
        "bench: run 2/3 (67%), 2 min 20 s elapsed, about 1 min 10 s left",
        "bench: run 3/3 (100%), 3 min 30 s elapsed",
        "train: epoch 2/2 (100%), 30 s elapsed",  # the resumed epoch is not timed
    ]


def test_a_slow_stage_says_so_at_its_start(clock, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="mixq.progress")
    monkeypatch.setenv("MIXQ_PROGRESS", "0")  # no lines: the warning stays
    hint = "--ptq-arg adaround.iters=N sets the 20000 iterations per layer"
    with mprogress.Bar(5 * 20000, "adaround", unit="step", per_line=20000, hint=hint) as bar:
        clock.now += 0.5
        bar.update(200)  # before PROBE_S: no estimate yet
        assert caplog.records == []
        clock.now += 0.5
        bar.update(200)  # 400 steps in 1 s: 100,000 steps in about 4 min
        clock.now += 1.0
        bar.update(400)  # warned once only
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING
    assert rec.getMessage() == (
        "adaround will take about 4 min 10 s (100000 steps, estimated from the first 400); " + hint
    )
    caplog.clear()
    with mprogress.Bar(1000, "quick", unit="step") as bar:  # 10 s in all: no warning
        clock.now += 1.0
        bar.update(100)
    assert caplog.records == []


def test_adaround_at_its_defaults_warns_and_logs_each_layer(caplog, monkeypatch):
    monkeypatch.setattr(mprogress, "QUIET_S", 0.0)
    monkeypatch.setattr(mprogress, "PROBE_S", 0.0)
    monkeypatch.setattr(mprogress, "SLOW_S", 0.0)  # any estimate is "slow": shows the wiring
    caplog.set_level(logging.INFO, logger="mixq.progress")
    mixq.run("synthetic-mlp", candidates=["w4"], ptq=["adaround"], ptq_args={"adaround": {"iters": 20}})
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("adaround will take about") and "adaround.iters=N" in messages[0]
    layers = [m for m in messages if m.startswith("adaround: layer")]
    assert [m.split(" (")[0] for m in layers] == [f"adaround: layer {i}/3" for i in (1, 2, 3)], messages


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
