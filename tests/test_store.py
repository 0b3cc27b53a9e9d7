"""Test mixq.store and mixq.executor: persistence, fingerprints, and resuming a killed run."""

import importlib.util
import math
import sys

import pytest
import torch
from torch import nn

from mixq import tasks
from mixq.executor import InProcessExecutor, Job
from mixq.store import Store, fingerprint_data, fingerprint_model


def test_put_get_keys_and_reopen(tmp_path):
    path = tmp_path / "run" / "store.sqlite"
    with Store(path) as s:
        s.put("m", "d", "a", 1.5)
        s.put("m", "d", "b", {"x": [1, 2], "y": None})
        s.put("m", "other", "a", float("nan"))
        s.put("m", "d", "a", 2.5)  # replaces
        assert s.get("m", "d", "a") == 2.5
        assert sorted(s.keys("m", "d")) == ["a", "b"]
        with pytest.raises(KeyError):
            s.get("m2", "d", "a")
    with Store(path) as s:
        assert s.get("m", "d", "b") == {"x": [1, 2], "y": None}
        assert math.isnan(s.get("m", "other", "a"))
        assert len(s) == 3
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        scope = s.scope("m", "d")
        scope.put("c", 3)
        assert scope.get("c") == 3 and sorted(scope.keys()) == ["a", "b", "c"]


def test_fingerprint_model():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    b = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    b.load_state_dict(a.state_dict())
    assert fingerprint_model(a) == fingerprint_model(b)
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-6
    assert fingerprint_model(a) != fingerprint_model(b)
    b.load_state_dict(a.state_dict())
    b[1].running_mean += 1  # buffers count too
    assert fingerprint_model(a) != fingerprint_model(b)


def test_fingerprint_data():
    x, y = torch.arange(6.0).reshape(2, 3), torch.tensor([0, 1])
    base = fingerprint_data([(x, y)])
    assert base == fingerprint_data([[x.clone(), y.clone()]])
    assert fingerprint_data([{"a": x, "b": y}]) == fingerprint_data([{"b": y, "a": x}])
    assert base != fingerprint_data([(x.reshape(3, 2), y)])  # shape
    assert base != fingerprint_data([(x.double(), y)])  # dtype
    assert base != fingerprint_data([(x, y), (x, y)])
    assert fingerprint_data([(x.bfloat16(),)]) != fingerprint_data([(x.half(),)])
    with pytest.raises(TypeError, match="object"):
        fingerprint_data([object()])


def square(ctx, x):
    ctx["calls"].append(x)
    if x == ctx.get("fail_at"):
        raise RuntimeError("boom")
    return x * x


def test_executor_skips_stored_and_writes_each_result(tmp_path):
    jobs = [Job(f"sq/{i}", square, (i,)) for i in range(5)]
    ex = InProcessExecutor()
    assert ex.map(jobs, {"calls": []}, progress=False) == {f"sq/{i}": i * i for i in range(5)}
    with Store(tmp_path / "s.sqlite") as s:
        scope = s.scope("m", "d")
        ctx = {"calls": [], "fail_at": 3}
        with pytest.raises(RuntimeError, match="boom"):
            ex.map(jobs, ctx, store=scope, progress=False)
        assert sorted(scope.keys()) == ["sq/0", "sq/1", "sq/2"]  # written as each finished
        ctx = {"calls": []}
        out = ex.map(jobs, ctx, store=scope, progress=False)
        assert ctx["calls"] == [3, 4]
        assert list(out) == [j.key for j in jobs] and out["sq/4"] == 16
        ctx = {"calls": []}
        ex.map(jobs, ctx, store=scope, progress=False)
        assert ctx["calls"] == []
    with pytest.raises(ValueError, match="unique"):
        ex.map([jobs[0], jobs[0]], {"calls": []}, progress=False)


CHILD = '''
"""Run measured sensitivity with a slow loss; the test kills this process part way."""
import sys
import time

from mixq import tasks
from mixq.api import prepare
from mixq.plan import parse_candidate
from mixq.sensitivity import measured
from mixq.store import Store

CANDIDATES = ["w2", "w4", "w8"]


def slow_loss(model, batch):
    time.sleep(0.1)  # fixture: slow jobs, so the run can be killed part way
    return tasks.cross_entropy(model, batch)


def setup(loss):
    task = tasks.get("synthetic-mlp")
    task.calib = task.calib[:2]
    task.loss = loss
    qmodel, infos = prepare(task, [parse_candidate(c) for c in CANDIDATES])
    return task, qmodel, [i.name for i in infos]


if __name__ == "__main__":
    task, qmodel, layers = setup(slow_loss)
    measured(qmodel, task, layers, CANDIDATES, store=Store(sys.argv[1]), progress=False)
'''


class CountingExecutor:
    """An in-process executor that counts the jobs it actually runs."""

    def __init__(self):
        self.ran = []
        self.inner = InProcessExecutor()

    def map(self, jobs, context, store=None, progress=True):
        def counted(job):
            def fn(ctx, *args):
                self.ran.append(job.key)
                return job.fn(ctx, *args)

            return Job(job.key, fn, job.args)

        return self.inner.map([counted(j) for j in jobs], context, store, progress)


def test_killed_run_resumes_without_recomputing(tmp_path, sigkill_when):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db = tmp_path / "store.sqlite"
    with Store(db) as poll:
        sigkill_when([sys.executable, str(script), str(db)], lambda: len(poll) >= 3, "stored no jobs")
    with Store(db) as s:
        stored = len(s)

    spec = importlib.util.spec_from_file_location("child", script)
    child = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child)
    task, qmodel, layers = child.setup(tasks.cross_entropy)  # same model and data, fast loss
    total = len(layers) * len(child.CANDIDATES) + 1  # + the float loss
    assert 0 < stored < total
    from mixq.sensitivity import measured

    counting = CountingExecutor()
    with Store(db) as s:
        resumed = measured(qmodel, task, layers, child.CANDIDATES, executor=counting, store=s)
        assert len(counting.ran) == total - stored
        assert len(s) == total
        again = CountingExecutor()
        measured(qmodel, task, layers, child.CANDIDATES, executor=again, store=s)
        assert again.ran == []
    fresh = measured(qmodel, task, layers, child.CANDIDATES, progress=False)
    torch.testing.assert_close(resumed.single, fresh.single, rtol=1e-5, atol=1e-6)
    assert resumed.meta["fp_loss"] == pytest.approx(fresh.meta["fp_loss"], rel=1e-6)


def test_store_is_keyed_by_model_and_data(tmp_path):
    from mixq.api import prepare
    from mixq.plan import parse_candidate
    from mixq.sensitivity import measured

    task = tasks.get("synthetic-mlp")
    q, infos = prepare(task, [parse_candidate("w4")])
    layers = [i.name for i in infos]
    with Store(tmp_path / "s.sqlite") as s:
        args = (layers, ["w4"])
        measured(q, task, *args, batches=task.calib[:1], store=s, progress=False)
        counting = CountingExecutor()
        measured(q, task, *args, batches=task.calib[1:2], executor=counting, store=s)
        assert len(counting.ran) == len(layers) + 1  # other data: all recomputed
        with torch.no_grad():
            q.get_submodule(layers[0]).weight.mul_(0.5)
        counting = CountingExecutor()
        measured(q, task, *args, batches=task.calib[:1], executor=counting, store=s)
        assert len(counting.ran) == len(layers) + 1  # other weights: all recomputed
