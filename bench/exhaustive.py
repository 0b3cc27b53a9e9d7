"""The exhaustive optimum: every plan of a small model evaluated on the whole validation set.

With L quantizable layers and C candidates there are C^L plans (4^5 = 1,024 on mnist-cnn).
Each is evaluated exactly, on the same quantizers every method uses, by walking the plans
depth first in execution order: the state just before layer k (every value computed so far
that later nodes still need) is computed once per choice of layers 0..k-1 and reused by all
C^(L-k) plans that share that prefix. Quantized weights are computed once per (layer,
candidate). The model is traced with torch.fx (quantized layers are leaves), so any graph
works, residual ones included; the walk needs classification batches ``(inputs, labels)``.

The table of all plans is cached under bench/results/ keyed by task and candidates, so the
search and CLADO benchmarks share one enumeration.

    .venv/bin/python -m bench.exhaustive --task mnist-cnn --candidates w2+asym+omse,w3+asym+omse,...

With ``--methods`` the searches run through ``mixq.run`` at each budget and are recorded beside
the optimum, the calibration oracle (the best plan of the KL on the calibration images) and the
optimum at nominal bits (elements only, no scales), in bench/results/OUT.json; ``--calib-sizes``
adds the oracles of the KL and the cross-entropy at other calibration sizes (OUT_oracles.json):

    python -m bench.exhaustive --candidates w2,w3,w4,w8 --budgets 2.25,2.5,3,3.25,4 \
        --out exhaustive_symmetric --methods clado,clado-naive,sensitivity-ilp,hawq,clado+refine
    python -m bench.exhaustive --candidates w2,w3,w4,w8 --budgets 2.25,2.5,3,3.25,4 \
        --out exhaustive_symmetric --calib-sizes 512,2048
    python -m bench.exhaustive --candidates w2-a8,w3-a8,w4-a8,w8-a8 --budgets 2.25,2.5,3,3.25,4 \
        --out exhaustive_symmetric_a8 --methods clado,clado-naive,sensitivity-ilp,hawq
    python -m bench.exhaustive --candidates w2,w3,w4,w8 --budgets 2.25,2.5,3,3.25,4 \
        --out exhaustive_symmetric --methods clado-ce,clado-ce+refine --paired
    python -m bench.exhaustive --candidates x --out exhaustive_symmetric --markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

import mixq
from bench.common import RESULTS, provenance
from mixq import cost
from mixq.api import prepare
from mixq.nn import QCall, QConv2d, QLinear
from mixq.plan import as_layer_spec
from mixq.wrap import applied, current_plan

MAX_PLANS = 1 << 16


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QLinear, QConv2d, QCall)) or super().is_leaf_module(m, qualname)


def _layer_forward(m: nn.Module, x: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """The quantized layer's forward with a precomputed quantized weight (every site type)."""
    return m.forward_with(m.input_quant(x), wq, m.bias)


class Walker:
    """Evaluate every plan of a wrapped model on classification batches, sharing prefixes.

    Args:
        qmodel: the wrapped, calibrated model (mixq.api.prepare).
        layers: the quantizable layer names (the L axis of the result).
        candidates: the candidate specs (the C axis).
    """

    def __init__(self, qmodel: nn.Module, layers: list[str], candidates: list) -> None:
        self.qmodel = qmodel.eval()
        self.gm = fx.GraphModule(qmodel, _Tracer().trace(qmodel))
        self.nodes = list(self.gm.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        by_target = {n.target: n for n in self.nodes if n.op == "call_module"}
        missing = [name for name in layers if name not in by_target]
        if missing:
            raise ValueError(f"layers {missing} are not called in the traced graph")
        # Execution order of the layers, and where each layer sits in the user's order.
        self.order = sorted(range(len(layers)), key=lambda i: index[by_target[layers[i]]])
        self.pos = [index[by_target[layers[i]]] for i in self.order] + [len(self.nodes)]
        self.last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in self.nodes}
        self.candidates = candidates
        self.layers = layers
        self.mods = [self.gm.get_submodule(layers[i]) for i in self.order]
        self.wq: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            for m in self.mods:
                row = []
                for c in candidates:
                    m.weight_quant.set_spec(c.weight)
                    row.append(m.weight_quant(m.weight).clone())
                m.weight_quant.set_spec(None)
                self.wq.append(row)

    def _run(self, env: dict, start: int, stop: int, k: int | None, j: int | None) -> Any:
        """Run nodes [start, stop); node ``start`` is layer ``k`` at candidate ``j`` if k is given."""
        out = None
        for i in range(start, stop):
            n = self.nodes[i]
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = args[0]
                continue
            if n.op == "get_attr":
                val = functools.reduce(getattr, n.target.split("."), self.gm)
            elif n.op == "call_module" and k is not None and i == start:
                m = self.mods[k]
                m.input_quant.set_spec(self.candidates[j].act)
                val = _layer_forward(m, args[0], self.wq[k][j])
            elif n.op == "call_module":
                val = self.gm.get_submodule(n.target)(*args, **kwargs)
            elif n.op == "call_function":
                val = n.target(*args, **kwargs)
            else:  # call_method
                val = getattr(args[0], n.target)(*args[1:], **kwargs)
            env[n] = val
        return out

    def _live(self, env: dict, upto: int) -> dict:
        """The values still needed by nodes at index >= ``upto``."""
        return {n: v for n, v in env.items() if self.last_use[n] >= upto}

    def correct(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """Correct predictions on one batch for every plan, shape [C] * L in the user's layer order."""
        return self.scores(x, lambda out: float((out.argmax(-1) == y).sum())).astype(np.int64)

    def scores(self, x: torch.Tensor, score: Any) -> np.ndarray:
        """``score(outputs)`` on one batch for every plan, shape [C] * L in the user's layer order."""
        n_layers, n_cands = len(self.mods), len(self.candidates)
        values = np.zeros([n_cands] * n_layers, dtype=np.float64)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        env0: dict = {placeholders[0]: x}
        self._run(env0, 0, self.pos[0], None, None)
        env0 = self._live(env0, self.pos[0])

        def walk(k: int, env: dict, prefix: tuple[int, ...]) -> None:
            for j in range(n_cands):
                e = dict(env)
                out = self._run(e, self.pos[k], self.pos[k + 1], k, j)
                if k + 1 == n_layers:
                    idx = [0] * n_layers
                    for kk, jj in enumerate((*prefix, j)):
                        idx[self.order[kk]] = jj
                    values[tuple(idx)] = score(out)
                else:
                    walk(k + 1, self._live(e, self.pos[k + 1]), (*prefix, j))

        with torch.inference_mode():
            walk(0, env0, ())
        return values


def _key(task: str, candidates: list[str], val_images: int) -> str:
    h = hashlib.sha1(json.dumps([task, candidates, val_images]).encode()).hexdigest()[:10]
    return f"exhaustive_{task}_{h}"


def enumerate_plans(task_name: str, candidates: list[str], use_cache: bool = True) -> dict[str, Any]:
    """Evaluate every plan of ``task_name``'s model over ``candidates`` (cached under bench/results).

    Returns:
        A dict with "layers", "candidates", "metric" (top-1 % per plan, in
        ``itertools.product(range(C), repeat=L)`` order over the task's layer order),
        "avg_weight_bits" per plan, "size_bytes" per plan and timing.
    """
    task = mixq.tasks.get(task_name)
    val_images = sum(len(b[1]) for b in task.val)
    path = RESULTS / f"{_key(task_name, candidates, val_images)}.json"
    if use_cache and path.exists():
        return json.loads(path.read_text())
    specs = [as_layer_spec(c) for c in candidates]
    t0 = time.perf_counter()
    qmodel, infos = prepare(task, specs)
    layers = [i.name for i in infos]
    n_plans = len(specs) ** len(layers)
    if n_plans > MAX_PLANS:
        raise ValueError(f"{n_plans} plans are too many to enumerate (at most {MAX_PLANS})")
    walker = Walker(qmodel, layers, specs)
    counts = np.zeros([len(specs)] * len(layers), dtype=np.int64)
    for x, y in task.val:
        counts += walker.correct(x, y)
    seconds = time.perf_counter() - t0
    mc = cost.model_costs(qmodel, infos)
    table = cost.cost_table(infos, specs)
    plans = list(itertools.product(range(len(specs)), repeat=len(layers)))
    rows = torch.arange(len(layers))
    bits, size = [], []
    for p in plans:
        pick = torch.tensor(p)
        bits.append(cost.from_limit(mc, "avg_weight_bits", float(table["weight_bits"][rows, pick].sum())))
        size.append(cost.from_limit(mc, "size_bytes", float(table["size_bits"][rows, pick].sum())))
    metric = (100.0 * counts.reshape(-1) / val_images).tolist()
    out = {
        "provenance": provenance(),
        "task": task_name,
        "layers": layers,
        "candidates": candidates,
        "val_images": val_images,
        "plans": len(plans),
        "seconds": seconds,
        "metric": metric,
        "avg_weight_bits": bits,
        "size_bytes": size,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out) + "\n")
    return out


def best_by_budget(
    task_name: str, candidates: list[str], budgets: list[float], key: str = "avg_weight_bits"
) -> dict[float, dict[str, Any]]:
    """The best plan within each budget on ``key`` ("avg_weight_bits" or "size_bytes")."""
    table = enumerate_plans(task_name, candidates)
    n_layers, n_cands = len(table["layers"]), len(candidates)
    plans = list(itertools.product(range(n_cands), repeat=n_layers))
    out = {}
    for b in budgets:
        ok = [i for i, v in enumerate(table[key]) if v <= b * (1 + 1e-9)]
        if not ok:
            out[b] = {"metric": math.nan, "choices": None, key: None, "feasible_plans": 0}
            continue
        # Ties in accuracy go to the plan with more bits (then the lower index): deterministic.
        i = max(ok, key=lambda i: (table["metric"][i], table["avg_weight_bits"][i], -i))
        out[b] = {
            "metric": table["metric"][i],
            "choices": list(plans[i]),
            "plan": {layer: candidates[j] for layer, j in zip(table["layers"], plans[i], strict=True)},
            "avg_weight_bits": table["avg_weight_bits"][i],
            "size_bytes": table["size_bytes"][i],
            "feasible_plans": len(ok),
        }
    return out


def calib_kl(task_name: str, candidates: list[str]) -> list[float]:
    """Every plan's mean KL divergence to the float outputs on the task's calibration batches.

    The objective a calibration-only method can see: the plan minimizing it within a budget is
    the best any such method can pick with this data (the "calibration oracle").
    """
    return calib_objectives(task_name, candidates)["kl"]


def calib_objectives(task_name: str, candidates: list[str], calib_size: int | None = None) -> dict[str, list]:
    """Every plan's mean KL to the float outputs ("kl") and cross-entropy ("ce") on calibration data.

    ``calib_size``: calibration images of the task (None: its default); the task draws them in a
    fixed order, so a larger set holds the smaller ones.
    """
    task = (
        mixq.tasks.get(task_name) if calib_size is None else mixq.tasks.get(task_name, calib_size=calib_size)
    )
    specs = [as_layer_spec(c) for c in candidates]
    qmodel, infos = prepare(task, specs)
    walker = Walker(qmodel, [i.name for i in infos], specs)
    kl_total = np.zeros([len(specs)] * len(infos))
    ce_total = np.zeros([len(specs)] * len(infos))
    images = 0
    for x, y in task.calib:
        with torch.inference_mode():
            logp = torch.log_softmax(task.model.eval()(x).float(), -1)

        def kl(out: torch.Tensor, logp: torch.Tensor = logp) -> float:
            return float((logp.exp() * (logp - torch.log_softmax(out.float(), -1))).sum(-1).sum())

        def ce(out: torch.Tensor, y: torch.Tensor = y) -> float:
            return float(torch.nn.functional.cross_entropy(out.float(), y, reduction="sum"))

        kl_total += walker.scores(x, kl)
        ce_total += walker.scores(x, ce)
        images += len(y)
    return {"kl": (kl_total.reshape(-1) / images).tolist(), "ce": (ce_total.reshape(-1) / images).tolist()}


def nominal_bits(task_name: str, candidates: list[str]) -> list[float]:
    """Every plan's nominal average weight bits: element bits only (no scales), weighted by size."""
    task = mixq.tasks.get(task_name)
    specs = [as_layer_spec(c) for c in candidates]
    _, infos = prepare(task, specs)
    bits = []
    for c in candidates:
        m = re.match(r"w(\d+)", c)
        if m is None:
            raise ValueError(f"nominal bits need candidates named w<bits>..., got {c!r}")
        bits.append(int(m.group(1)))
    numel = np.array([i.numel for i in infos], dtype=np.float64)
    plans = itertools.product(range(len(candidates)), repeat=len(infos))
    return [float((numel * np.array([bits[j] for j in p])).sum() / numel.sum()) for p in plans]


# Methods compared with the optimum: label -> (method, method_args).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "clado": ("clado", {}),
    "clado-raw": ("clado", {"repair": "none", "snr": 0.0, "splits": 1}),
    "clado-psd": ("clado", {"repair": "psd", "snr": 0.0, "splits": 1}),
    "clado-snr": ("clado", {"repair": "none", "snr": 2.0}),
    "clado-snr-psd-diag": ("clado", {"repair": "psd-diag", "snr": 2.0}),
    "clado-naive": ("clado-naive", {}),
    "clado-ce": ("clado", {"loss": "task"}),  # the cross-entropy on the calibration labels
    "sensitivity-ilp": ("sensitivity-ilp", {}),
    "hawq": ("hawq", {"hutchinson_samples": 16}),
}
REFINE = 24  # measured plans of the "+refine" variants


def variant(label: str) -> tuple[str, dict[str, Any]]:
    """The method and method_args of a label of VARIANTS, with "+refine" for ``refine=REFINE``."""
    base, _, extra = label.partition("+")
    if base not in VARIANTS or extra not in ("", "refine"):
        raise ValueError(
            f"unknown variant {label!r}; valid: {', '.join(VARIANTS)}, each with or without +refine"
        )
    method, args = VARIANTS[base]
    return method, {**args, **({"refine": REFINE} if extra else {})}


def compare(args: argparse.Namespace, cands: list[str], budgets: list[float]) -> None:
    """Run each method at each budget through ``mixq.run`` and record it beside the optimum.

    Resumable: rows already in the result file are kept. The first run's metric is evaluated
    directly and checked against the exhaustive table; the others read their plan's metric
    from the table (the same quantizers and validation images).
    """
    path = RESULTS / f"{args.out}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    table = enumerate_plans(args.task, cands)
    layers = table["layers"]
    result.update(provenance=provenance(), task=args.task, candidates=cands, val_images=table["val_images"])
    if "calib_kl" not in result:
        result["calib_kl"] = calib_kl(args.task, cands)
    if "nominal_bits" not in result:
        result["nominal_bits"] = nominal_bits(args.task, cands)
    plans = list(itertools.product(range(len(cands)), repeat=len(layers)))
    optimum, oracle, nominal = {}, {}, {}
    for b in budgets:
        ok = [i for i, v in enumerate(table["avg_weight_bits"]) if v <= b * (1 + 1e-9)]
        best = max(ok, key=lambda i: (table["metric"][i], table["avg_weight_bits"][i], -i))
        cal = min(ok, key=lambda i: (result["calib_kl"][i], i))
        okn = [i for i, v in enumerate(result["nominal_bits"]) if v <= b * (1 + 1e-9)]
        nom = max(okn, key=lambda i: (table["metric"][i], -i))
        optimum[str(b)] = {"metric": table["metric"][best], "choices": list(plans[best])}
        oracle[str(b)] = {"metric": table["metric"][cal], "choices": list(plans[cal])}
        nominal[str(b)] = {"metric": table["metric"][nom], "choices": list(plans[nom])}
    result.update(optimum=optimum, calib_oracle=oracle, nominal_optimum=nominal)
    rows = result.setdefault("rows", [])
    done = {(r["label"], r["budget"]) for r in rows}
    task = mixq.tasks.get(args.task)
    task.fp_metric()
    result["fp32"] = task.fp_metric()

    names = [as_layer_spec(c).name for c in cands]  # "w8-a8" is named "w8a8"

    def lookup(model: nn.Module, batches: Any) -> float:
        plan = current_plan(model).layers
        return table["metric"][plans.index(tuple(names.index(plan[n].name) for n in layers))]

    table_task = dataclasses.replace(task, metric=lookup)
    cache = mixq.Cache()
    for label in args.methods.split(","):
        method, margs = variant(label)
        for b in budgets:
            if (label, b) in done:
                continue
            direct = not rows
            t0 = time.perf_counter()
            res = mixq.run(
                task if direct else table_task,
                method,
                cands,
                {"avg_weight_bits": b},
                method_args=margs,
                out=Path(args.runs) / label,
                overwrite=True,  # one directory per label: its store serves every budget
                cache=cache,
            )
            choices = [names.index(res.plan.layers[n].name) for n in layers]
            metric = table["metric"][plans.index(tuple(choices))]
            if direct and abs(metric - res.metrics.metric) > 1e-9:
                raise AssertionError(f"direct {res.metrics.metric} != exhaustive table {metric}")
            info = res.history[0]
            refined = info.get("refined", {})
            rows.append(
                {
                    "label": label,
                    "method": method,
                    "method_args": margs,
                    "budget": b,
                    "metric": metric,
                    "optimum": optimum[str(b)]["metric"],
                    "gap": optimum[str(b)]["metric"] - metric,
                    "avg_weight_bits": res.metrics.avg_weight_bits,
                    "choices": choices,
                    "calib_kl": result["calib_kl"][plans.index(tuple(choices))],
                    "status": info.get("status"),
                    "pairs_kept": info.get("pairs_kept"),
                    "pairs_measured": info.get("pairs_measured"),
                    "refine_measured": len(refined.get("measured", [])),
                    "refine_improved": refined.get("improved"),
                    "search_seconds": res.metrics.seconds,
                    "wall_seconds": time.perf_counter() - t0,
                    "metric_from": "direct" if direct else "exhaustive table",
                }
            )
            r = rows[-1]
            print(f"{label} {b}: {r['metric']:.2f} (optimum {r['optimum']:.2f}) {choices}", flush=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
    path.write_text(json.dumps(result, indent=1) + "\n")


def oracles(args: argparse.Namespace, cands: list[str], budgets: list[float]) -> None:
    """The calibration oracles: per calibration size and objective, the plan a perfect search of
    that objective picks within each budget, and its test metric (bench/results/OUT_oracles.json).
    """
    path = RESULTS / f"{args.out}_oracles.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    table = enumerate_plans(args.task, cands)
    plans = list(itertools.product(range(len(cands)), repeat=len(table["layers"])))
    result.update(provenance=provenance(), task=args.task, candidates=cands, budgets=budgets)
    sizes = result.setdefault("sizes", {})
    for size in [int(v) for v in args.calib_sizes.split(",")]:
        if str(size) in sizes:
            continue
        t0 = time.perf_counter()
        values = calib_objectives(args.task, cands, size)
        entry: dict[str, Any] = {"seconds": time.perf_counter() - t0}
        for objective, v in values.items():
            entry[objective] = {}
            for b in budgets:
                ok = [i for i, c in enumerate(table["avg_weight_bits"]) if c <= b * (1 + 1e-9)]
                i = min(ok, key=lambda i: (v[i], i))
                entry[objective][str(b)] = {"metric": table["metric"][i], "choices": list(plans[i])}
            print(size, objective, {b: r["metric"] for b, r in entry[objective].items()}, flush=True)
        sizes[str(size)] = entry
        path.write_text(json.dumps(result, indent=1) + "\n")


def paired(args: argparse.Namespace, cands: list[str]) -> None:
    """Per budget: the optimum against the best method's plan, image by image (OUT.json "paired").

    Both plans run on the validation images; ``n10`` counts the images only the optimum gets
    right, ``n01`` those only the method's plan gets right. The accuracy difference is
    ``(n10 − n01)/N`` and its standard error, paired over images (the two plans' errors are
    correlated), ``sqrt(n10 + n01 − (n10 − n01)²/N) / N``: a gap within about 2 SE is one that a
    different test set of the same size could reverse.
    """
    path = RESULTS / f"{args.out}.json"
    result = json.loads(path.read_text())
    task = mixq.tasks.get(args.task)
    specs = [as_layer_spec(c) for c in cands]
    qmodel, infos = prepare(task, specs, mixq.Cache())
    layers = [i.name for i in infos]

    def correct(choices: list[int]) -> torch.Tensor:
        out = []
        with (
            applied(qmodel, {n: specs[c] for n, c in zip(layers, choices, strict=True)}),
            torch.inference_mode(),
        ):
            for x, y in task.val:
                out.append(qmodel(x).argmax(-1) == y)
        return torch.cat(out)

    entries = {}
    for b, opt in result["optimum"].items():
        rows = [r for r in result["rows"] if str(r["budget"]) == b]
        best = max(rows, key=lambda r: r["metric"])
        a, m = correct(opt["choices"]), correct(best["choices"])
        n = int(a.numel())
        for plan, hits in ((opt, a), (best, m)):  # the exhaustive table's metric, recomputed
            if abs(100.0 * float(hits.float().mean()) - plan["metric"]) > 1e-4:
                raise AssertionError(
                    f"{plan['choices']}: {100.0 * float(hits.float().mean())} != {plan['metric']}"
                )
        n10, n01 = int((a & ~m).sum()), int((~a & m).sum())
        diff = 100.0 * (n10 - n01) / n
        se = 100.0 * math.sqrt(max(0.0, n10 + n01 - (n10 - n01) ** 2 / n)) / n
        entries[b] = {
            "optimum": opt,
            "best_method": {k: best[k] for k in ("label", "metric", "choices")},
            "images": n,
            "n10": n10,
            "n01": n01,
            "difference": diff,
            "se": se,
            "z": diff / se if se else math.inf,
        }
        print(
            f"{b}: optimum {opt['metric']:.2f} vs {best['label']} {best['metric']:.2f}: "
            f"{diff:+.2f} ± {se:.2f}"
        )
    result["paired"] = entries
    path.write_text(json.dumps(result, indent=1) + "\n")


def markdown(name: str) -> str:
    """The table of bench/results/NAME.json: top-1 % per method and budget beside the optimum."""
    d = json.loads((RESULTS / f"{name}.json").read_text())
    budgets = list(d["optimum"])
    lines = ["| plan | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]

    def line(label: str, values: dict[str, float]) -> None:
        lines.append(
            f"| {label} | " + " | ".join(f"{values[b]:.2f}" if b in values else "" for b in budgets) + " |"
        )

    line("exhaustive optimum", {b: v["metric"] for b, v in d["optimum"].items()})
    line("calibration oracle (KL, 512 images)", {b: v["metric"] for b, v in d["calib_oracle"].items()})
    line("optimum at nominal bits (no scales)", {b: v["metric"] for b, v in d["nominal_optimum"].items()})
    labels = list(dict.fromkeys(r["label"] for r in d["rows"]))
    for label in labels:
        line(label, {str(r["budget"]): r["metric"] for r in d["rows"] if r["label"] == label})
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mnist-cnn")
    ap.add_argument("--candidates", required=True, help="comma-separated candidate names")
    ap.add_argument("--budgets", default="2.5,3,3.5,4", help="average weight bits")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--methods", default="", help=f"labels of VARIANTS ({', '.join(VARIANTS)}), +refine")
    ap.add_argument("--out", default="exhaustive_methods", help="result name under bench/results")
    ap.add_argument("--runs", default="/tmp/mixq-bench-exhaustive", help="run directories (stores)")
    ap.add_argument("--calib-sizes", default="", help="calibration sizes of the oracles, e.g. 512,2048")
    ap.add_argument("--markdown", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--paired", action="store_true", help="the optimum vs the best method, image by image")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.out))
        return
    torch.set_num_threads(1)
    cands = args.candidates.split(",")
    budgets = [float(v) for v in args.budgets.split(",")]
    table = enumerate_plans(args.task, cands, use_cache=not args.no_cache)
    print(f"{table['plans']} plans in {table['seconds']:.1f} s")
    for b, r in best_by_budget(args.task, cands, budgets).items():
        print(f"budget {b}: best {r['metric']:.2f} at {r['avg_weight_bits']} bits: {r['choices']}")
    if args.methods:
        compare(args, cands, budgets)
    if args.calib_sizes:
        oracles(args, cands, budgets)
    if args.paired:
        paired(args, cands)


if __name__ == "__main__":
    main()
