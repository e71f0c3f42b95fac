"""A small L-BFGS with capped steps and backtracking, for well-scaled problems of a few unknowns.

Refinement needs a quasi-Newton method that never jumps far on a landscape with other
optima nearby: torch's L-BFGS extrapolates its strong-Wolfe line search up to tenfold per
trial, which sent trial poses 88-167 mm away on realistic X-rays. Here each step is the
two-loop L-BFGS direction, cut so that no unknown moves more than ``max_step``, then
shortened by ``BACKTRACK`` (Armijo) until it gains enough; the unknowns are expected to be
scaled so that one unit means the same in every direction (see ``Registrar._whitening``).
Because those unknowns mean the same at every level of a pyramid, the curvature one level
learned can start the next (``curvature``), rather than a plain gradient step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

#: Armijo's sufficient-decrease fraction.
ARMIJO = 1e-4

#: Each backtracking trial shortens the step by this factor.
BACKTRACK = 0.3

#: A curvature pair: a step taken and the change of the gradient along it.
Pair = tuple[torch.Tensor, torch.Tensor]


class Minimum(NamedTuple):
    """The best point found, and the curvature pairs in force there (newest last)."""

    x: torch.Tensor
    pairs: list[Pair]


def minimize(
    evaluate: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    start: torch.Tensor,
    evaluations: int,
    tolerance: Callable[[], float],
    max_step: float,
    history: int = 8,
    curvature: Callable[[], list[Pair]] | None = None,
) -> Minimum:
    """The best point found from ``start`` within ``evaluations`` calls of ``evaluate``.

    ``evaluate(x)`` returns the value to minimise and its gradient. The search stops when an
    accepted step gains less than ``tolerance()``, or when the evaluations run out.
    ``curvature()`` gives pairs learned on the same unknowns before (in ``evaluate``'s
    units) to take the first steps with. Both are asked after the first evaluation, so that
    they can depend on it.
    """
    x = start.detach().clone()
    value, gradient = evaluate(x)
    used = 1
    steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y·s)
    for moved, turned in (curvature() if curvature is not None else [])[-history:]:
        _remember(steps, moved, turned, history)
    while used < evaluations:
        direction = _direction(gradient, steps)
        slope = float(gradient @ direction)
        if slope >= 0:  # not a descent direction (curvature pairs gone stale): start over
            steps.clear()
            direction, slope = -gradient, -float(gradient @ gradient)
        longest = float(direction.abs().max())
        if longest > max_step:
            direction, slope = direction * (max_step / longest), slope * (max_step / longest)
        if longest == 0.0:
            break
        fraction = 1.0
        while True:
            trial = x + fraction * direction
            trial_value, trial_gradient = evaluate(trial)
            used += 1
            if trial_value <= value + ARMIJO * fraction * slope or used >= evaluations:
                break
            fraction *= BACKTRACK
        if trial_value >= value:  # out of evaluations without a gain
            break
        _remember(steps, trial - x, trial_gradient - gradient, history)
        gain = value - trial_value
        x, value, gradient = trial, trial_value, trial_gradient
        if gain < tolerance():
            break
    return Minimum(x, [(moved, turned) for moved, turned, _ in steps])


def _remember(
    steps: list[tuple[torch.Tensor, torch.Tensor, float]],
    moved: torch.Tensor,
    turned: torch.Tensor,
    history: int,
) -> None:
    """Keep a curvature pair when it curves upwards (else it would spoil the estimate)."""
    curvature = float(turned @ moved)
    if curvature > 1e-12:
        steps.append((moved, turned, 1.0 / curvature))
        del steps[:-history]


def _direction(
    gradient: torch.Tensor, steps: list[tuple[torch.Tensor, torch.Tensor, float]]
) -> torch.Tensor:
    """L-BFGS's two-loop recursion: minus the inverse-Hessian estimate times the gradient."""
    q = -gradient.clone()
    alphas = []
    for moved, turned, rho in reversed(steps):
        alpha = rho * float(moved @ q)
        q -= alpha * turned
        alphas.append(alpha)
    if steps:
        moved, turned, _ = steps[-1]
        q *= float(moved @ turned) / float(turned @ turned)
    for (moved, turned, rho), alpha in zip(steps, reversed(alphas), strict=True):
        beta = rho * float(turned @ q)
        q += (alpha - beta) * moved
    return q
