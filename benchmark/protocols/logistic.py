"""L2-regularised logistic regression on fixed features, solved by L-BFGS: the linear protocol's
``head_solver: lbfgs``.

For a penalty ``l2`` (λ) the head minimises, over all training images at once (full batch),

    sum over outputs of mean_i loss(W x_i + b, y_i)  +  λ/2 ||W||²      (the bias not penalised)

with a sigmoid per output for binary and multi-label tasks (one-vs-rest: the outputs are independent
problems, each with the same λ) and a softmax over the classes for a multi-class task. That is
scikit-learn's ``LogisticRegression(C=1 / (λ n), solver="lbfgs", fit_intercept=True)`` for n training
images, fitted per label for a multi-label task (tests/protocols/test_logistic.py compares the two).
It is solved in float64 by ``torch.optim.LBFGS`` with a strong-Wolfe line search on the features' device;
the host waits only for L-BFGS's own convergence tests, never for a mini-batch.

λ is chosen on the validation split: every value of :data:`L2_GRID` is solved, the strongest first from
zero weights (as scikit-learn starts) and each solution starting the next (the problem is strictly convex,
so the start changes the time, not the optimum), and the one with the lowest validation loss (the
protocol's unpenalised loss, which the ``sgd`` head early-stops on; the first of equal ones) is kept.

This is CLIP's linear probe (Radford et al. 2021, appendix A.3: scikit-learn's L-BFGS logistic regression,
at most 1,000 iterations, λ swept on a validation split) as LAION-AI/CLIP_benchmark runs it
(clip_benchmark/metrics/linear_probe.py:265-278: a log grid over [1e-6, 1e2], lines 269-270, searched on
validation, lines 272-278), with four differences: each λ is solved to convergence, where that code trains
an AdamW head with the value as weight decay (linear_probe.py:59-107); the grid is one value per decade,
not 97 values searched from 7 by bisection (linear_probe.py:269-277); λ is picked on validation loss, not
accuracy (find_peak, linear_probe.py:128-139), as AUC tasks have no accuracy to pick on; and the head is
the one fitted on the training images, not refitted on training + validation (linear_probe.py:279-281),
so that the test images are scored as the ``sgd`` head's are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

L2_GRID = tuple(10.0 ** k for k in range(2, -7, -1))  # 1e2 .. 1e-6, strongest first
MAX_ITER = 1000  # CLIP appendix A.3
TOLERANCE_GRAD = 1e-7  # max |gradient| at which L-BFGS stops: probabilities within ~1e-5 of the optimum's (float64)
TOLERANCE_CHANGE = 1e-15  # a loss change this small is float64 rounding: no progress left


@dataclass
class LogisticHead:
    """A fitted head: ``weight`` ``(outputs, channels)`` and ``bias`` ``(outputs,)`` in float64, the λ
    chosen and, per λ of the grid, its validation loss and L-BFGS iterations."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    val_loss: float
    grid: list[dict[str, Any]]


def training_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The data term of the objective: per output, the mean loss over images, summed over outputs."""
    n = len(targets)
    if kind == "multiclass":
        return F.cross_entropy(logits, targets, reduction="sum") / n
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / n


def validation_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The protocol's loss (mean cross-entropy, or BCE-with-logits averaged over images and outputs)."""
    if kind == "multiclass":
        return F.cross_entropy(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets)


def fit_logistic(kind: str, features: torch.Tensor, targets: torch.Tensor, outputs: int, l2: float,
                 start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Weight, bias and L-BFGS iterations of the head minimising the module's objective at penalty ``l2``.

    Args:
        kind: ``binary``, ``multilabel`` or ``multiclass``.
        features: ``(n, channels)`` on the device to fit on.
        targets: ``(n, outputs)`` 0/1 floats, or ``(n,)`` class indices for ``multiclass``.
        outputs: logits of the head (the number of classes for ``multiclass``).
        start: weight and bias to start from (default zeros).
    """
    x = features.double()
    y = targets.double() if kind != "multiclass" else targets
    if start is None:
        weight = torch.zeros(outputs, x.shape[1], dtype=torch.float64, device=x.device)
        bias = torch.zeros(outputs, dtype=torch.float64, device=x.device)
    else:
        weight, bias = (t.detach().clone() for t in start)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=MAX_ITER, tolerance_grad=TOLERANCE_GRAD,
                                  tolerance_change=TOLERANCE_CHANGE, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        loss = training_loss(kind, torch.addmm(bias, x, weight.T), y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach(), int(optimizer.state[weight].get("n_iter", 0))


def select_logistic(kind: str, train_features: torch.Tensor, train_targets: torch.Tensor,
                    val_features: torch.Tensor, val_targets: torch.Tensor, outputs: int,
                    grid: tuple[float, ...] = L2_GRID) -> LogisticHead:
    """The head of the λ in ``grid`` (strongest first) with the lowest validation loss (module docstring)."""
    fits, losses = [], []
    start = None
    for l2 in grid:
        weight, bias, iterations = fit_logistic(kind, train_features, train_targets, outputs, l2, start)
        start = (weight, bias)
        with torch.no_grad():
            logits = torch.addmm(bias, val_features.double(), weight.T)
            losses.append(validation_loss(kind, logits, val_targets if kind == "multiclass" else val_targets.double()))
        fits.append((weight, bias, iterations))
    values = torch.stack(losses).cpu().tolist()  # one transfer for the whole grid
    best = min(range(len(grid)), key=lambda k: (math.isnan(values[k]), values[k], k))
    weight, bias, _ = fits[best]
    return LogisticHead(weight, bias, grid[best], values[best],
                        [{"l2": l2, "val_loss": value, "iterations": iterations}
                         for l2, value, (_, _, iterations) in zip(grid, values, fits)])
