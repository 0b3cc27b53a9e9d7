"""The default solver of pairwise problems: warm start, then exact solvers, best incumbent and bound.

1. Warm start: the better of `greedy` and the caller's ``warm_start``, improved by
   `mixq.search.local.polish` (one- and two-layer exchanges on the full objective).
2. The solvers of ``solvers`` in order, each warm-started from the best incumbent so far and
   given its share (``weights``) of the time left (``None``: no limit; the first that proves optimality
   ends the run). Each returns an incumbent and a proven lower bound.
3. The best incumbent is polished once more; the bound is the largest bound of any solver, the
   gap ``(f − bound)/|f|``.

Default order, from bench/results/iqp.json: the HiGHS MILP (`mixq.search.highs.highs`, the best
incumbents in short times, and the proofs on the zoo's matrices), then the branch-and-bound on
the convexified objective (`mixq.search.qcr`: the semidefinite bound at its root, incumbents
rounded from it, and branching that lifts the bound), warm-started from the best incumbent.
Which run, and their time shares, depend on the size (`default_plan`: half the time each on
small problems). The SDP
bound needs only numpy and scipy; the others are optional (``pip install mixq[search]``:
OR-Tools, PySCIPOpt); one that cannot be imported is skipped and named in the note, and when
only HiGHS (and the SDP bound) is left it says "HiGHS MILP fallback".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from mixq.search.greedy import greedy
from mixq.search.highs import highs
from mixq.search.local import polish
from mixq.search.problem import Problem, Solution, check_budgets, relative_gap

__all__ = [
    "DEFAULT",
    "DEFAULT_WEIGHTS",
    "LARGE_WEIGHTS",
    "SMALL",
    "SMALL_WEIGHTS",
    "SOLVERS",
    "default_plan",
    "portfolio",
    "run_solver",
]

logger = logging.getLogger(__name__)

SMALL = ("highs", "qcr")  # up to LARGE variables: HiGHS proves most zoo matrices in seconds, QCR the rest
SMALL_WEIGHTS = (0.5, 0.5)
LARGE = 100  # more variables (allowed (layer, candidate) pairs): the SDP bound gets most of the time
DEFAULT = ("highs", "qcr")
LARGE_WEIGHTS = (0.1, 0.9)
DEFAULT_WEIGHTS = LARGE_WEIGHTS


def _highs(problem: Problem, time_limit: float | None, warm_start: list[int] | None) -> Solution:
    return highs(problem, time_limit=time_limit, warm_start=warm_start)


def _cpsat(problem: Problem, time_limit: float | None, warm_start: list[int] | None) -> Solution:
    from mixq.search.cpsat import cpsat

    return cpsat(problem, time_limit=time_limit, warm_start=warm_start)


def _scip(formulation: str) -> Callable[[Problem, float | None, list[int] | None], Solution]:
    def run(problem: Problem, time_limit: float | None, warm_start: list[int] | None) -> Solution:
        from mixq.search.scip import scip

        return scip(problem, time_limit=time_limit, warm_start=warm_start, formulation=formulation)

    return run


def _sdp(problem: Problem, time_limit: float | None, warm_start: list[int] | None) -> Solution:
    from mixq.search.sdp import sdp

    return sdp(problem, time_limit=time_limit, warm_start=warm_start)


def _qcr(problem: Problem, time_limit: float | None, warm_start: list[int] | None) -> Solution:
    from mixq.search.qcr import qcr

    return qcr(problem, time_limit=time_limit, warm_start=warm_start)


def _portfolio(problem: Problem, time_limit: float | None, warm_start: list[int] | None) -> Solution:
    return portfolio(problem, time_limit=time_limit, warm_start=warm_start)


SOLVERS: dict[str, Callable[[Problem, float | None, list[int] | None], Solution]] = {
    "highs": _highs,
    "cpsat": _cpsat,
    "sdp": _sdp,
    "qcr": _qcr,
    "scip": _scip("convex"),
    "scip-linear": _scip("linear"),
    "scip-both": _scip("both"),
    "portfolio": _portfolio,
}
_MODULE = {"cpsat": "ortools", "scip": "pyscipopt", "scip-linear": "pyscipopt", "scip-both": "pyscipopt"}


def run_solver(
    name: str, problem: Problem, time_limit: float | None = None, warm_start: list[int] | None = None
) -> Solution:
    """Run the solver ``name`` of `SOLVERS` alone.

    Raises:
        ValueError: Unknown ``name``.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid: {sorted(SOLVERS)}")
    return SOLVERS[name](problem, time_limit, warm_start)


def _available(name: str) -> bool:
    module = _MODULE.get(name)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def portfolio(
    problem: Problem,
    time_limit: float | None = None,
    warm_start: list[int] | None = None,
    solvers: tuple[str, ...] | None = None,
    weights: tuple[float, ...] | None = None,
    rel_gap: float = 1e-9,
) -> Solution:
    """Minimize ``f(x)`` under the budgets with a warm start and several exact solvers.

    Args:
        problem: The problem.
        time_limit: Seconds for everything; None runs the first solver to proven optimality.
        warm_start: A choice per layer; ignored (with a warning) when infeasible.
        solvers: Names from `SOLVERS` ("highs", "sdp", "qcr", "cpsat", "scip", "scip-linear",
            "scip-both"), in the order they run. None: by size (`default_plan`).
        weights: Relative time shares of ``solvers``: solver i gets the time left times
            ``weights[i] / Σ_{j ≥ i} weights[j]`` (time a solver leaves unused goes to the
            next). None: `default_plan`'s with ``solvers`` None, equal shares otherwise.
        rel_gap: Stop when the relative gap is at most this.

    Returns:
        A `Solution`: ``status`` "optimal" (gap ≤ ``rel_gap``) or "time_limit", the best
        incumbent, the best ``bound``, the ``gap`` and a ``note`` naming each solver's result.

    Raises:
        ValueError: Unknown solver name, ``time_limit`` not positive, or ``warm_start`` of the
            wrong length, out of range or forbidden.
        InfeasibleBudgetError: No choice satisfies the budgets.
    """
    start = time.perf_counter()
    if solvers is None:
        solvers, default_weights = default_plan(problem)
        weights = default_weights if weights is None else weights
    unknown = [s for s in solvers if s not in SOLVERS or s == "portfolio"]
    if unknown or not solvers:
        raise ValueError(f"unknown solvers {unknown}; valid: {sorted(set(SOLVERS) - {'portfolio'})}")
    if weights is None:
        weights = (1.0,) * len(solvers)
    if len(weights) != len(solvers) or not all(w > 0 for w in weights):
        raise ValueError(f"weights {weights} must be {len(solvers)} positive numbers, one per solver")
    share_of = dict(zip(solvers, weights, strict=True))
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive seconds or None, got {time_limit!r}")
    check_budgets(problem)
    best = _warm_start(problem, warm_start)
    bound = -math.inf
    proven = False
    run, notes = _runnable(solvers)
    for i, name in enumerate(run):
        left = None if time_limit is None else time_limit - (time.perf_counter() - start)
        if left is not None and left <= 0:
            notes.append(f"{name}: no time left")
            continue
        rest = sum(share_of.get(r, 1.0) for r in run[i:])
        share = None if left is None else left * share_of.get(name, 1.0) / rest
        sol = SOLVERS[name](problem, share, best)
        notes.append(f"{sol.note or name} ({'no limit' if share is None else f'{share:.3g} s'})")
        if sol.objective < problem.objective(best):
            best = sol.choices
        if math.isfinite(sol.bound):
            bound = max(bound, sol.bound)
        proven = sol.status == "optimal"  # within the solver's tolerance; best is at least as good
        if proven or relative_gap(problem.objective(best), bound) <= rel_gap:
            break
    best = polish(problem, best)
    value = problem.objective(best)
    bound = min(bound, value)
    gap = relative_gap(value, bound)
    status = "optimal" if gap <= rel_gap or proven else "time_limit"
    if status == "optimal":
        gap = 0.0
    return problem.solution(
        best, status, gap, time.perf_counter() - start, bound=bound, note="; ".join(notes)
    )


def default_plan(problem: Problem) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The solvers and time shares by size: `SMALL` up to `LARGE` variables, else `DEFAULT`.

    Measured (bench/results/iqp.json): HiGHS proves the zoo's w{2,4,8} CLADO matrices (up to 66
    variables) in under 5 s, and QCR (`mixq.search.qcr`) the 88-variable w{2,3,4,8} ResNet-20 ones
    in 10 s that HiGHS and SCIP left at gaps of 125 % and 22 %; from 116 variables on (29×4)
    QCR gives the smallest gaps, HiGHS a first incumbent.
    """
    if int(problem.allowed.sum()) > LARGE:
        return DEFAULT, LARGE_WEIGHTS
    return SMALL, SMALL_WEIGHTS


def _warm_start(problem: Problem, warm_start: list[int] | None) -> list[int]:
    """Return the better of greedy and ``warm_start`` (if feasible), polished."""
    pool = [greedy(problem).choices]
    if warm_start is not None:
        start_choices = problem.check_choices(warm_start)  # wrong length, range: ValueError
        if problem.is_feasible(start_choices):
            pool.append(start_choices)
        else:
            logger.warning("warm start violates budgets %s; ignored", problem.violations(start_choices))
    return polish(problem, min(pool, key=problem.objective))


def _runnable(solvers: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Return the installed solvers of ``solvers`` (HiGHS when none) and the notes about it."""
    notes = []
    missing = [s for s in solvers if not _available(s)]
    run = [s for s in solvers if s not in missing]
    if missing:
        notes.append(f"{', '.join(missing)} not installed (pip install mixq[search])")
    if not run:
        run = ["highs"]
    if missing and set(run) <= {"highs", "sdp", "qcr"}:
        bounded = "sdp" in run or "qcr" in run
        notes.append("HiGHS MILP fallback" + (" with the SDP bound" if bounded else ""))
    return run, notes
