"""Solvers against brute force and an independent, literal objective."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mixq.search import (
    InfeasibleBudgetError,
    Problem,
    Solution,
    brute_force,
    greedy,
    ilp,
    pareto_sweep,
)

INF = math.inf


def literal_objective(problem: Problem, choices: list[int]) -> float:
    """Σ_l s[l, x_l] + Σ_{l<m} ½ (P[l, x_l, m, x_m] + P[m, x_m, l, x_l]), written out."""
    s = problem.scores.double()
    value = sum(float(s[i, c]) for i, c in enumerate(choices))
    if problem.pairs is not None:
        p = problem.pairs.double()
        for i, j in itertools.combinations(range(len(choices)), 2):
            a, b = choices[i], choices[j]
            value += 0.5 * (float(p[i, a, j, b]) + float(p[j, b, i, a]))
    return value


def literal_costs(problem: Problem, choices: list[int]) -> dict[str, float]:
    return {name: sum(float(t[i, c]) for i, c in enumerate(choices)) for name, t in problem.costs.items()}


def literal_feasible(problem: Problem, choices: list[int]) -> bool:
    allowed = all(
        math.isfinite(float(problem.scores[i, c]))
        and all(math.isfinite(float(t[i, c])) for t in problem.costs.values())
        for i, c in enumerate(choices)
    )
    totals = literal_costs(problem, choices)
    return allowed and all(totals[k] <= b + 1e-9 * max(1.0, abs(b)) for k, b in problem.budgets.items())


def literal_optimum(problem: Problem) -> float | None:
    """Loop over itertools.product; None when nothing is feasible."""
    L, C = problem.scores.shape
    values = [
        literal_objective(problem, list(x))
        for x in itertools.product(range(C), repeat=L)
        if literal_feasible(problem, list(x))
    ]
    return min(values) if values else None


def literal_min_cost(problem: Problem, name: str) -> float:
    """Σ_l min over allowed c of costs[name][l, c]."""
    total = 0.0
    for i in range(problem.scores.shape[0]):
        total += min(
            float(problem.costs[name][i, c])
            for c in range(problem.scores.shape[1])
            if math.isfinite(float(problem.scores[i, c]))
            and all(math.isfinite(float(t[i, c])) for t in problem.costs.values())
        )
    return total


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def random_problem(seed: int, with_pairs: bool | None = None) -> Problem:
    """L ≤ 6, C ≤ 4, negative scores and pairs, one or two budgets, forbidden entries."""
    rng = np.random.default_rng(seed)
    L, C = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    scores = rng.normal(size=(L, C))
    names = ["size_bits", "bops"][: int(rng.integers(1, 3))]
    costs = {k: rng.integers(0, 20, size=(L, C)).astype(float) for k in names}
    if rng.random() < 0.3:
        costs["size_bits"] = rng.uniform(0, 10, size=(L, C))  # non-integer costs too
    forbidden = rng.random((L, C)) < 0.15
    forbidden[np.arange(L), rng.integers(0, C, size=L)] = False  # keep one per layer
    for i, c in zip(*np.nonzero(forbidden), strict=True):
        if rng.random() < 0.5:
            scores[i, c] = INF
        else:
            costs[names[int(rng.integers(len(names)))]][i, c] = INF
    allowed = np.isfinite(scores) & np.all([np.isfinite(t) for t in costs.values()], axis=0)
    budgets = {}
    for k in names:
        t = np.where(allowed, costs[k], np.nan)
        lo, hi = np.nanmin(t, axis=1).sum(), np.nanmax(t, axis=1).sum()
        budgets[k] = float(lo + rng.uniform(0.0, 1.0) * (hi - lo))
        if rng.random() < 0.2:
            budgets[k] = float(np.round(budgets[k]))  # exact ties with integer costs
    pairs = None
    if with_pairs if with_pairs is not None else rng.random() < 0.6:
        pairs = rng.normal(scale=0.7, size=(L, C, L, C))
        zero = rng.random((L, L)) < 0.3  # zero blocks are skipped by the MILP
        pairs *= ~zero[:, None, :, None]
        if rng.random() < 0.5:
            pairs = pairs + pairs.transpose(2, 3, 0, 1)
    return Problem(
        torch.tensor(scores),
        {k: torch.tensor(v) for k, v in costs.items()},
        budgets,
        None if pairs is None else torch.tensor(pairs),
    )


def test_objective_convention_counts_symmetric_pair_once() -> None:
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    pairs = torch.zeros(2, 2, 2, 2)
    pairs[0, 1, 1, 0] = pairs[1, 0, 0, 1] = 10.0  # symmetric storage of Ω_01(1, 0)
    pairs[0, 0, 0, 1] = 99.0  # diagonal block: ignored
    problem = Problem(scores, {"size": torch.ones(2, 2)}, {}, pairs)
    assert problem.objective([1, 0]) == 2.0 + 3.0 + 10.0
    assert problem.objective([0, 1]) == 1.0 + 4.0
    upper_only = torch.zeros(2, 2, 2, 2)
    upper_only[0, 1, 1, 0] = 10.0
    assert Problem(scores, {}, {}, upper_only).objective([1, 0]) == 2.0 + 3.0 + 5.0


def test_brute_force_matches_literal_enumeration() -> None:
    compared = 0
    for seed in range(40):
        problem = random_problem(seed)
        expected = literal_optimum(problem)
        if expected is None:
            with pytest.raises(InfeasibleBudgetError):
                brute_force(problem)
            continue
        sol = brute_force(problem)
        assert close(sol.objective, expected)
        assert close(literal_objective(problem, sol.choices), expected)
        assert literal_feasible(problem, sol.choices)
        compared += 1
    assert compared >= 25


def check_solution(problem: Problem, sol: Solution) -> None:
    assert len(sol.choices) == problem.scores.shape[0]
    assert literal_feasible(problem, sol.choices)
    assert close(sol.objective, literal_objective(problem, sol.choices))
    totals = literal_costs(problem, sol.choices)
    assert set(sol.costs) == set(totals)
    assert all(close(sol.costs[k], totals[k]) for k in totals)


def test_ilp_equals_brute_force_and_greedy_is_feasible() -> None:
    compared = {True: 0, False: 0}
    for seed in range(120):
        problem = random_problem(seed)
        try:
            best = brute_force(problem)
        except InfeasibleBudgetError:
            with pytest.raises(InfeasibleBudgetError):
                ilp(problem)
            with pytest.raises(InfeasibleBudgetError):
                greedy(problem)
            continue
        sol = ilp(problem)
        check_solution(problem, sol)
        assert sol.status == "optimal" and sol.gap == 0.0
        assert close(sol.objective, best.objective), seed
        fast = greedy(problem)
        check_solution(problem, fast)
        assert fast.status == "greedy"
        assert fast.objective >= best.objective - 1e-9
        compared[problem.pairs is not None] += 1
    assert compared[True] >= 25 and compared[False] >= 25, compared


def test_ilp_warm_start() -> None:
    problem = random_problem(3, with_pairs=True)
    best = brute_force(problem)
    for start in (best.choices, greedy(problem).choices):
        assert close(ilp(problem, warm_start=start).objective, best.objective)
    with pytest.raises(ValueError, match="expected"):
        ilp(problem, warm_start=[0] * (len(best.choices) + 1))


def test_infeasible_budget_names_smallest_value() -> None:
    rng = np.random.default_rng(7)
    scores = torch.tensor(rng.normal(size=(5, 3)))
    size = torch.tensor(rng.integers(1, 50, size=(5, 3)).astype(float))
    bops = torch.tensor(rng.uniform(0, 5, size=(5, 3)))
    size[2, 0] = INF  # forbidden: must not count in the minimum
    costs = {"size_bits": size, "bops": bops}
    min_size = literal_min_cost(Problem(scores, costs, {"size_bits": 0.0}), "size_bits")
    min_bops = literal_min_cost(Problem(scores, costs, {"bops": 0.0}), "bops")
    for solver in (ilp, greedy, brute_force):
        problem = Problem(scores, costs, {"size_bits": min_size - 1.0, "bops": 1e9})
        with pytest.raises(InfeasibleBudgetError, match="size_bits") as info:
            solver(problem)
        assert f"{min_size:.12g}" in str(info.value)
        assert info.value.violated == ["size_bits"]
        problem = Problem(scores, costs, {"size_bits": min_size - 1.0, "bops": min_bops / 2})
        with pytest.raises(InfeasibleBudgetError) as info:
            solver(problem)
        assert f"{min_size:.12g}" in str(info.value) and f"{min_bops:.12g}" in str(info.value)
        # At exactly the minimum the problem is feasible.
        exact = solver(Problem(scores, costs, {"size_bits": min_size}))
        assert close(exact.costs["size_bits"], min_size)


def test_budgets_feasible_alone_but_not_together() -> None:
    a = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    problem = Problem(torch.zeros(2, 2), {"a": a, "b": 1.0 - a}, {"a": 0.5, "b": 0.5})
    for solver in (ilp, greedy, brute_force):
        with pytest.raises(InfeasibleBudgetError, match="combination is infeasible") as info:
            solver(problem)
        assert info.value.violated == [] and info.value.minimums == {"a": 0.0, "b": 0.0}


def test_unconstrained_picks_min_score_per_layer() -> None:
    rng = np.random.default_rng(11)
    scores = torch.tensor(rng.normal(size=(8, 4)))
    size = torch.tensor(rng.uniform(1, 10, size=(8, 4)))
    expected = scores.argmin(dim=1).tolist()
    for budgets in ({"size": 1e12}, {"size": INF}, {}):
        problem = Problem(scores, {"size": size}, budgets)
        for solver in (ilp, greedy, brute_force):
            assert solver(problem).choices == expected


def test_time_limit_returns_feasible_incumbent() -> None:
    rng = np.random.default_rng(5)
    L, C = 40, 4
    scores = torch.tensor(rng.uniform(0, 1, size=(L, C)) * np.array([8.0, 4.0, 2.0, 1.0]))
    size = torch.tensor(rng.integers(100, 1000, size=(L, 1)) * np.array([2.0, 4.0, 6.0, 8.0]))
    pairs = rng.normal(scale=0.1, size=(L, C, L, C))
    pairs = torch.tensor(pairs + pairs.transpose(2, 3, 0, 1))
    budget = float(size.sum()) * 5.0 / 8.0 / C
    problem = Problem(scores, {"size_bits": size}, {"size_bits": budget}, pairs)
    sol = ilp(problem, time_limit=0.5)
    assert sol.status in ("optimal", "time_limit")
    assert sol.gap >= 0.0
    check_solution(problem, sol)
    assert sol.objective <= greedy(problem).objective + 1e-9  # greedy is among the incumbents


def test_pareto_sweep_is_feasible_non_dominated_and_optimal() -> None:
    for seed in range(200):
        problem = random_problem(seed, with_pairs=True)
        if problem.scores.shape[0] >= 4 and len(problem.budgets) == 2:
            break
    name, other = "size_bits", "bops"
    lo = literal_min_cost(problem, name)
    hi = float(np.where(problem.allowed, problem.costs[name].numpy(), -INF).max(axis=1).sum())
    values = [lo - 1.0, *np.linspace(lo, hi, 12).tolist()]
    front = pareto_sweep(problem, name, values)
    assert front
    for sol in front:
        assert sol.costs[name] <= hi + 1e-9 and sol.costs[other] <= problem.budgets[other] + 1e-9
    for a, b in itertools.combinations(front, 2):
        assert not (a.objective <= b.objective and a.costs[name] <= b.costs[name])
        assert not (b.objective <= a.objective and b.costs[name] <= a.costs[name])
    for value in values[1:]:  # the front answers every swept budget optimally
        sub = Problem(problem.scores, problem.costs, {**problem.budgets, name: value}, problem.pairs)
        try:
            best = brute_force(sub).objective
        except InfeasibleBudgetError:
            continue
        reachable = [s.objective for s in front if s.costs[name] <= value + 1e-9]
        assert reachable and close(min(reachable), best)
    with pytest.raises(InfeasibleBudgetError):
        pareto_sweep(problem, name, [lo - 2.0, lo - 1.0])
    with pytest.raises(ValueError, match="unknown budget"):
        pareto_sweep(problem, "latency", values)


def test_brute_force_refuses_large_problems() -> None:
    problem = Problem(torch.zeros(30, 4), {}, {})
    with pytest.raises(ValueError, match="max_choices"):
        brute_force(problem)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budgets": {"latency": 1.0}}, ValueError, "no cost table"),
        ({"costs": {"size": torch.ones(2, 3)}}, ValueError, "shape"),
        ({"scores": torch.ones(3)}, ValueError, "shape"),
        ({"pairs": torch.zeros(3, 2, 2, 3)}, ValueError, "pairs has shape"),
        ({"scores": torch.tensor([[0.0, math.nan]] * 3)}, ValueError, "NaN"),
        ({"scores": torch.tensor([[0.0, -INF]] * 3)}, ValueError, "-inf"),
        ({"costs": {"size": torch.tensor([[1.0, math.nan]] * 3)}}, ValueError, "NaN"),
        ({"budgets": {"size": math.nan}}, ValueError, "NaN"),
        ({"budgets": {"size": "4"}}, TypeError, "number"),
        ({"scores": [[0.0, 1.0]] * 3}, TypeError, "torch.Tensor"),
        ({"scores": torch.tensor([[INF, INF], [0.0, 1.0], [0.0, 1.0]])}, ValueError, "no allowed"),
        ({"pairs": torch.full((3, 2, 3, 2), math.nan)}, ValueError, "pairs contain"),
    ],
)
def test_problem_validation(kwargs: dict, error: type, match: str) -> None:
    args = {
        "scores": torch.zeros(3, 2),
        "costs": {"size": torch.ones(3, 2)},
        "budgets": {"size": 10.0},
        "pairs": None,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Problem(**args)


def test_forbidden_pairs_and_diagonal_blocks_may_be_non_finite() -> None:
    scores = torch.tensor([[0.0, INF], [0.0, 1.0]])
    pairs = torch.zeros(2, 2, 2, 2)
    pairs[0, 1, 1, 0] = math.nan  # involves the forbidden candidate (0, 1)
    pairs[1, 0, 1, 1] = INF  # diagonal block
    problem = Problem(scores, {}, {}, pairs)
    assert ilp(problem).choices == [0, 0]


def test_choice_within_solver_tolerance_but_over_budget_is_cut_off() -> None:
    # [0, 1] scores best and exceeds the budget by 0.25 bit in 1e7: inside HiGHS's tolerance.
    scores = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    size = torch.tensor([[0.0, 1e7], [0.0, 1e7 + 0.5]], dtype=torch.float64)
    problem = Problem(scores, {"size": size}, {"size": 1e7 + 0.25})
    assert ilp(problem).choices == brute_force(problem).choices == [1, 0]


def test_one_infeasible_budget_error():
    import mixq
    from mixq import cost

    assert mixq.InfeasibleBudgetError is cost.InfeasibleBudgetError is InfeasibleBudgetError
    assert issubclass(InfeasibleBudgetError, ValueError)
    e = InfeasibleBudgetError("budget 'x' = 1 is infeasible")
    assert e.minimums == {} and e.violated == []
