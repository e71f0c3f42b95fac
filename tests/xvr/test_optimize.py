"""The refinement's L-BFGS: it converges on a badly scaled problem, never steps further
than it is allowed, and keeps the best point it has seen."""

from __future__ import annotations

import itertools

import torch

from xvr_node.xvr.optimize import minimize


def quadratic(scales: list[float], centre: list[float]):
    """f(x) = Σ s_i (x_i − c_i)², with a log of every point evaluated."""
    s, c = torch.tensor(scales, dtype=torch.float64), torch.tensor(centre, dtype=torch.float64)
    seen: list[torch.Tensor] = []

    def evaluate(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        seen.append(x.clone())
        return float((s * (x - c) ** 2).sum()), 2 * s * (x - c)

    return evaluate, seen


def test_converges_in_few_evaluations_where_gradient_steps_would_crawl():
    # Condition number 100: plain steps of the gradient's size need hundreds of them.
    evaluate, seen = quadratic([1.0, 0.1, 0.01], [3.0, -2.0, 5.0])
    best = minimize(evaluate, torch.zeros(3, dtype=torch.float64), 60, lambda: 1e-12, 100.0).x
    torch.testing.assert_close(best, torch.tensor([3.0, -2.0, 5.0], dtype=torch.float64))
    assert len(seen) < 40


def test_no_step_is_longer_than_allowed():
    evaluate, seen = quadratic([1.0, 1.0], [50.0, -30.0])
    minimize(evaluate, torch.zeros(2, dtype=torch.float64), 40, lambda: 0.0, 2.0)
    jumps = [float((b - a).abs().max()) for a, b in itertools.pairwise(seen)]
    # Backtracking trials start from the accepted point, so every trial is within reach.
    assert max(jumps) <= 2.0 + 1e-9
    assert float((seen[-1] - torch.tensor([50.0, -30.0])).abs().max()) < 1.0  # it got there


def test_returns_the_start_when_nothing_gains():
    evaluate, seen = quadratic([1.0, 2.0], [0.0, 0.0])
    start = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(minimize(evaluate, start, 10, lambda: 0.0, 1.0).x, start)
    assert len(seen) == 1  # a zero gradient: no step is tried


def test_stops_when_the_evaluations_run_out_and_keeps_the_best_point():
    evaluate, seen = quadratic([1.0, 0.001], [10.0, 10.0])
    best = minimize(evaluate, torch.zeros(2, dtype=torch.float64), 5, lambda: 0.0, 1.0).x
    assert len(seen) == 5
    values = [evaluate(x)[0] for x in list(seen)]
    assert evaluate(best)[0] == min(values)


def test_curvature_learned_before_saves_evaluations_later():
    """A pyramid's premise for carrying pairs: the same unknowns, the same curvature."""
    scales, centre = [1.0, 0.1, 0.01], [3.0, -2.0, 5.0]
    evaluate, _ = quadratic(scales, centre)
    learned = minimize(evaluate, torch.zeros(3, dtype=torch.float64), 60, lambda: 1e-12, 100.0)
    assert learned.pairs  # what the first search knew about the curvature at its end
    near = torch.tensor([3.5, -2.5, 7.0], dtype=torch.float64)
    counts = []
    for curvature in (None, lambda: learned.pairs):
        evaluate, seen = quadratic(scales, centre)
        best = minimize(evaluate, near, 60, lambda: 1e-12, 100.0, curvature=curvature).x
        torch.testing.assert_close(best, torch.tensor(centre, dtype=torch.float64))
        counts.append(len(seen))
    assert counts[1] < 0.7 * counts[0]  # 7 against 12 evaluations
