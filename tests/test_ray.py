"""Test mixq.ray_executor on a local Ray cluster of two workers: same results as in-process,
a worker killed mid-run, a driver killed mid-run and resumed from the store."""

import collections
import os
import signal
import sys
from pathlib import Path

import pytest
import ray
import torch

import mixq
from mixq import cli, tasks
from mixq.api import prepare
from mixq.executor import InProcessExecutor, Job, make
from mixq.plan import parse_candidate
from mixq.ray_executor import RayExecutor
from mixq.sensitivity import Sensitivity, measured
from mixq.sensitivity.pairs import pairwise
from mixq.sensitivity.perturb import loss_job
from mixq.store import Store

CANDIDATES = ["w2", "w4", "w8"]


def setup_cnn(loss=tasks.cross_entropy):
    """synthetic-cnn (4 layers) on 2 calibration batches, wrapped for CANDIDATES."""
    task = tasks.get("synthetic-cnn")
    task.calib = task.calib[:2]
    task.loss = loss
    qmodel, infos = prepare(task, [parse_candidate(c) for c in CANDIDATES])
    return task, qmodel, [i.name for i in infos]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster with two worker CPUs for the module; workers can import this file."""
    saved = os.environ.get("PYTHONPATH")
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *([saved] if saved else [])])
    # idle workers of this driver are kept while the child driver of the restart test starts its own
    ex = RayExecutor(workers=2, init_args={"_system_config": {"num_workers_soft_limit": 4}})
    try:
        ex.cluster_cpus()  # starts the cluster
        yield ex
    finally:
        ex.close()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def logged(ctx, log: str, marker: str, kill_key: str, key: str, fn, args):
    """Append ``key`` to ``log``, die (SIGKILL) at ``kill_key`` the first time, then run ``fn``."""
    with open(log, "a") as f:
        f.write(key + "\n")
    if key == kill_key and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if key == "boom":
        raise ValueError("job boom failed")
    return fn(ctx, *args)


def wrap_jobs(jobs, tmp_path, kill_key=""):
    log, marker = str(tmp_path / "ran.log"), str(tmp_path / "killed")
    return [Job(j.key, logged, (log, marker, kill_key, j.key, j.fn, j.args)) for j in jobs], Path(log)


def measured_jobs(task, qmodel, layers):
    """The jobs and context that measured() runs, captured from an in-process run."""
    seen = {}

    class Capture(InProcessExecutor):
        def map(self, jobs, context, store=None, progress=True):
            seen.update(jobs=list(jobs), context=context)
            return super().map(jobs, context, store, progress=False)

    sens = measured(qmodel, task, layers, CANDIDATES, executor=Capture())
    return seen["jobs"], seen["context"], sens


def test_same_results_as_in_process(cluster):
    task, qmodel, layers = setup_cnn()
    ex = RayExecutor(chunk_size=2)
    for fn in (pairwise, measured):
        local = fn(qmodel, task, layers, CANDIDATES, progress=False)
        remote = fn(qmodel, task, layers, CANDIDATES, executor=ex, progress=False)
        assert ex.stats["ran"] == len(layers) * len(CANDIDATES) + 1 and ex.stats["chunks"] == 7
        assert torch.equal(local.single, remote.single)
        assert local.meta["fp_loss"] == remote.meta["fp_loss"]
        if fn is pairwise:
            assert torch.equal(local.pairs, remote.pairs) and local.pairs.abs().sum() > 0
    # another map with another context: workers pick up the new model, not the cached one
    with torch.no_grad():
        qmodel.get_submodule(layers[0]).weight.mul_(0.5)
    local = measured(qmodel, task, layers, CANDIDATES, progress=False)
    remote = measured(qmodel, task, layers, CANDIDATES, executor=ex, progress=False)
    assert torch.equal(local.single, remote.single)


def test_killed_worker_costs_only_its_chunk(cluster, tmp_path):
    task, qmodel, layers = setup_cnn()
    jobs, context, local = measured_jobs(task, qmodel, layers)
    assert len(jobs) == 13
    wrapped, log = wrap_jobs(jobs, tmp_path, kill_key=jobs[4].key)  # 2nd job of the 2nd chunk
    ex = RayExecutor(chunk_size=3, max_retries=2)
    with Store(tmp_path / "s.sqlite") as s:
        out = ex.map(wrapped, context, store=s.scope("m", "d"), progress=False)
        assert len(s) == 13
    assert (tmp_path / "killed").exists() and ex.stats["chunks"] == 5
    ran = collections.Counter(log.read_text().split())
    # the chunk jobs[3:6] was cut after jobs[3] and jobs[4] began; it ran again, nothing else did
    assert ran == {j.key: 2 if i in (3, 4) else 1 for i, j in enumerate(jobs)}
    fp = torch.tensor(out[jobs[0].key], dtype=torch.float64)  # per-batch losses
    for i, n in enumerate(layers):
        for j, c in enumerate(CANDIDATES):
            diff = torch.tensor(out[f"measured/{n}/{c}"], dtype=torch.float64) - fp
            assert diff.mean().item() == local.single[i, j].item()


def test_failing_job_raises_and_keeps_finished_results(cluster, tmp_path):
    _, context, _ = measured_jobs(*setup_cnn())
    jobs = [Job(f"j{i}", loss_job, (None, None)) for i in range(3)]
    wrapped, log = wrap_jobs(jobs + [Job("boom", loss_job, (None, None))], tmp_path)
    ex = RayExecutor(chunk_size=4)
    with Store(tmp_path / "s.sqlite") as s:
        with pytest.raises(ValueError, match="job boom failed") as info:
            ex.map(wrapped, context, store=s.scope("m", "d"), progress=False)
        assert sorted(s.scope("m", "d").keys()) == ["j0", "j1", "j2"]  # its chunk's finished jobs
    assert "in job 'boom' on a Ray worker" in "".join(info.value.__notes__)
    assert log.read_text().split() == ["j0", "j1", "j2", "boom"]  # application errors are not retried


CHILD = '''
"""A driver running CLADO pair rows on Ray with a slow loss; the test kills it part way."""
import sys
import time

sys.path.insert(0, sys.argv[3])
from test_ray import CANDIDATES, setup_cnn

from mixq import tasks
from mixq.ray_executor import RayExecutor
from mixq.sensitivity.pairs import pairwise
from mixq.store import Store


def slow_loss(model, batch):
    time.sleep(0.1)  # fixture: slow jobs, so the driver can be killed part way
    return tasks.cross_entropy(model, batch)


if __name__ == "__main__":
    task, qmodel, layers = setup_cnn(slow_loss)
    ex = RayExecutor(address=sys.argv[2], chunk_size=1)
    store = Store(sys.argv[1])
    pairwise(qmodel, task, layers, CANDIDATES, executor=ex, store=store, progress=False, min_batches=1)
'''


def stored_jobs(db: Path) -> int:
    if not db.exists():
        return 0
    with Store(db) as s:
        return len(s)


def test_killed_driver_resumes_from_the_store(cluster, tmp_path, sigkill_when):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db = tmp_path / "store.sqlite"
    address = ray.get_runtime_context().gcs_address
    here = str(Path(__file__).resolve().parent)
    cmd = [sys.executable, str(script), str(db), address, here]
    sigkill_when(cmd, lambda: stored_jobs(db) >= 3, "driver stored no jobs")
    with Store(db) as s:
        stored = len(s)
    task, qmodel, layers = setup_cnn()  # same model and data, fast loss
    total = len(layers) * len(CANDIDATES) + 1
    assert 3 <= stored < total
    ex = RayExecutor(chunk_size=2)
    with Store(db) as s:
        resumed = pairwise(
            qmodel, task, layers, CANDIDATES, executor=ex, store=s, progress=False, min_batches=1
        )
        assert ex.stats["stored"] == stored and ex.stats["ran"] == total - stored
        assert len(s) == total
        pairwise(qmodel, task, layers, CANDIDATES, executor=ex, store=s, progress=False, min_batches=1)
        assert ex.stats["ran"] == 0  # nothing recomputed
    fresh = pairwise(qmodel, task, layers, CANDIDATES, progress=False, min_batches=1)
    assert torch.equal(resumed.single, fresh.single) and torch.equal(resumed.pairs, fresh.pairs)


def test_cli_and_run_send_jobs_to_ray(cluster, tmp_path, monkeypatch):
    maps = []
    original = RayExecutor.map

    def counted(self, jobs, context, store=None, progress=True):
        maps.append(len(jobs))
        return original(self, jobs, context, store, progress)

    monkeypatch.setattr(RayExecutor, "map", counted)
    args = [
        "--task",
        "synthetic-cnn",
        "--method",
        "clado",
        "--candidates",
        ",".join(CANDIDATES),
        "--budget",
        "avg_weight_bits=5",
    ]
    out = tmp_path / "ray"
    assert cli.main(["run", *args, "--executor", "ray", "--workers", "2", "--out", str(out)]) == 0
    # clado measures its calibration set in parts (the pairs' noise): one map of 13 row jobs each
    parts = len(maps)
    assert parts > 1 and maps == [13] * parts
    local = mixq.run("synthetic-cnn", "clado", CANDIDATES, {"avg_weight_bits": 5}, out=tmp_path / "local")
    assert maps == [13] * parts  # the local run sends nothing to the cluster
    a, b = Sensitivity.load(out / "sensitivity.safetensors"), local.sensitivity
    assert torch.equal(a.single, b.single) and torch.equal(a.pairs, b.pairs)
    assert (out / "plan.json").read_text() == (tmp_path / "local" / "plan.json").read_text()
    res = mixq.run(
        "synthetic-cnn",
        "sensitivity-ilp",
        CANDIDATES,
        {"avg_weight_bits": 5},
        executor="ray",
        executor_args={"chunk_size": 4},
    )
    assert maps == [13] * (parts + 1) and res.sensitivity.kind == "measured"
    assert ray.is_initialized()  # a cluster the run did not start is left running


def test_factory_and_errors(tmp_path, capsys, monkeypatch):
    assert isinstance(make("inprocess"), InProcessExecutor)
    assert make("ray", address="auto", workers=3).workers == 3  # nothing starts before a map
    with pytest.raises(ValueError, match="unknown executor 'dask'; valid: inprocess, ray"):
        make("dask")
    with pytest.raises(ValueError, match=r"unknown settings \['nodes'\].*workers"):
        make("ray", nodes=3)
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        RayExecutor(workers=0)
    with pytest.raises(ValueError, match="executor_args need a named executor"):
        mixq.run("synthetic-mlp", candidates=["w4"], executor_args={"workers": 2})
    assert (
        cli.main(
            [
                "run",
                "--task",
                "synthetic-mlp",
                "--candidates",
                "w4",
                "--workers",
                "2",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "--executor ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'mixq\[ray\]'"):
        RayExecutor().map([Job("a", len, ())], [], progress=False)
    assert RayExecutor().map([], None) == {}  # nothing to run: Ray is not needed


def context_identity(ctx, i):
    """A job reporting which deserialized context object (in which worker process) it ran on."""
    return [os.getpid(), id(ctx), int(mixq.cache.current() is not None)]


def test_each_worker_fetches_the_context_once_per_map(cluster):
    ex = RayExecutor(chunk_size=1)
    jobs = [Job(f"j{i}", context_identity, (i,)) for i in range(8)]
    for context in ({"model": torch.zeros(3)}, {"model": torch.ones(3)}):
        seen = collections.defaultdict(set)
        for pid, ident, active in ex.map(jobs, context, progress=False).values():
            seen[pid].add(ident)
            assert active  # the worker's cache is the active one while its jobs run
        assert ex.stats["chunks"] == 8 and all(len(ids) == 1 for ids in seen.values())
