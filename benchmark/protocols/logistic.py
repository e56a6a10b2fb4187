"""L2-regularised logistic regression on fixed features, solved by L-BFGS: the linear protocol's
``head_solver: lbfgs``.

For a penalty ``l2`` (λ) the head minimises, over all training images at once (full batch),

    sum over outputs of mean_i loss(W x_i + b, y_i)  +  λ/2 ||W||²      (the bias not penalised)

with a sigmoid per output for binary and multi-label tasks (one-vs-rest: the outputs are independent
problems, each with the same λ) and a softmax over the classes for a multi-class task. That is
scikit-learn's ``LogisticRegression(C=1 / (λ n), solver="lbfgs", fit_intercept=True)`` for n training
images, fitted per label for a multi-label task (tests/protocols/test_logistic.py compares the two).
It is solved in float64 by ``torch.optim.LBFGS`` with a strong-Wolfe line search on the features' device;
the host waits only for L-BFGS's own convergence tests, never for a mini-batch. The gradient is written in
closed form (``X^T (p - y) / n + λW``, one pass over the features each way), and L-BFGS works in preconditioned
coordinates: the features centred (the bias takes up their mean) and the weights expressed through the
Cholesky factor of the objective's Hessian at zero logits, ``c Cov(x) + λI`` (``c`` = 1/4 for a sigmoid).
Both are changes of variables, so the optimum is the one defined above; they remove the ill-conditioning of
encoder features (correlated channels with widely spread variances, a large common offset), on which plain
L-BFGS needs over a thousand iterations at the weakest penalties and tens here. The covariance is computed
once per grid, its factor once per λ.

L-BFGS stops where the largest |gradient| in those coordinates is at most :data:`TOLERANCE_GRAD` or the loss
stops changing in float64, within :data:`MAX_ITER` iterations. scikit-learn's defaults are looser: it stops at
a largest |gradient| of ``tol`` = 1e-4 within ``max_iter`` = 100 iterations (scikit-learn 1.9
sklearn/linear_model/_logistic.py:593, ``"gtol": tol``; defaults at lines 1284 and 1290), which at λ = 1e-6
leaves weights up to 1e-4 / λ from the optimum. The fits here reach float64's floor: on 16k x 2048 encoder-like
features, the same probabilities (to 1e-15) as a 1e-12 tolerance.

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

from vlpbench.errors import DataError

L2_GRID = tuple(10.0 ** k for k in range(2, -7, -1))  # 1e2 .. 1e-6, strongest first
MAX_ITER = 1000  # CLIP appendix A.3
TOLERANCE_GRAD = 1e-9  # largest |gradient| (preconditioned coordinates) at which L-BFGS stops
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


@dataclass(frozen=True)
class CentredFeatures:
    """The training features as the solver uses them: centred and in float64, with their mean and covariance
    ``(channels, channels)`` (computed once, shared by every λ of the grid)."""

    values: torch.Tensor
    mean: torch.Tensor
    covariance: torch.Tensor


def centred_features(features: torch.Tensor) -> CentredFeatures:
    """:class:`CentredFeatures` of ``(n, channels)`` training features.

    Raises:
        DataError: a feature is NaN or infinite.
    """
    x = features.double()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise DataError(f"{bad} of {len(x)} training feature rows hold NaN or infinite values: the encoder's "
                        "features must be finite for the lbfgs head")
    mean = x.mean(dim=0)
    centred = x - mean
    return CentredFeatures(centred, mean, centred.T @ centred / len(x))


def preconditioner(covariance: torch.Tensor, c: float, l2: float) -> torch.Tensor:
    """Lower Cholesky factor of ``c * covariance + l2 * I``, the objective's Hessian in the weights at zero
    logits (``c``: :func:`curvature`). A preconditioner only: where rounding leaves the matrix not quite
    positive definite a tiny multiple of the identity is added, which changes the speed, not the optimum."""
    matrix = c * covariance
    shift = l2
    while True:
        factor, info = torch.linalg.cholesky_ex(matrix + shift * torch.eye(len(matrix), dtype=matrix.dtype,
                                                                          device=matrix.device))
        if not info:
            return factor
        shift = max(10 * shift, 1e-12 * float(matrix.diagonal().mean()))


def curvature(kind: str, outputs: int) -> float:
    """The loss's second derivative per logit at logits 0: p(1 - p) at p = 1/2 for a sigmoid, 1/classes for
    a softmax."""
    p = 1.0 / outputs if kind == "multiclass" else 0.5
    return p * (1 - p)


def data_term(kind: str, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`training_loss` and its gradient with respect to the logits, in closed form, for logits laid out
    ``(outputs, n)`` and targets ``(outputs, n)`` (``(n,)`` class indices for ``multiclass``)."""
    n = targets.shape[-1]
    if kind == "multiclass":
        residual = logits.softmax(dim=0)
        residual[targets, torch.arange(n, device=logits.device)] -= 1
        loss = F.cross_entropy(logits.T, targets, reduction="sum")
    else:
        residual = torch.sigmoid(logits) - targets
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    return loss / n, residual / n


def fit_logistic(kind: str, features: torch.Tensor, targets: torch.Tensor, outputs: int, l2: float,
                 start: tuple[torch.Tensor, torch.Tensor] | None = None,
                 centred: CentredFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Weight, bias and L-BFGS iterations of the head minimising the module's objective at penalty ``l2``.

    Args:
        kind: ``binary``, ``multilabel`` or ``multiclass``.
        features: ``(n, channels)`` on the device to fit on.
        targets: ``(n, outputs)`` 0/1 floats, or ``(n,)`` class indices for ``multiclass``.
        outputs: logits of the head (the number of classes for ``multiclass``).
        start: weight and bias to start from (default zeros).
        centred: :func:`centred_features` of ``features``, where the caller has them already.
    """
    centred = centred_features(features) if centred is None else centred
    x = centred.values
    # Logits and targets laid out (outputs, n): both passes over the features are then one product with a
    # contiguous (outputs, n) or (outputs, channels) operand, faster on CPU for several outputs.
    y = targets if kind == "multiclass" else targets.double().T.contiguous()
    c = curvature(kind, outputs)
    # The coordinates of the module docstring: weight.T = factor.T⁻¹ z.T, bias = z0 / √c - weight · mean.
    factor = preconditioner(centred.covariance, c, l2)
    bias_scale = c ** -0.5

    def weight_of(z: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(factor.T, z.T, upper=True).T

    if start is None:
        z = torch.zeros(outputs, x.shape[1], dtype=torch.float64, device=x.device)
        z0 = torch.zeros(outputs, dtype=torch.float64, device=x.device)
    else:
        weight, bias = (t.double() for t in start)
        z = weight @ factor
        z0 = (bias + weight @ centred.mean) / bias_scale
    optimizer = torch.optim.LBFGS([z, z0], lr=1.0, max_iter=MAX_ITER, tolerance_grad=TOLERANCE_GRAD,
                                  tolerance_change=TOLERANCE_CHANGE, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        with torch.no_grad():
            weight = weight_of(z)
            loss, residual = data_term(kind, torch.addmm((z0 * bias_scale)[:, None], weight, x.T), y)
            z.grad = torch.linalg.solve_triangular(factor, (residual @ x + l2 * weight).T, upper=False).T
            z0.grad = residual.sum(dim=1) * bias_scale
            return loss + 0.5 * l2 * weight.square().sum()

    optimizer.step(closure)
    with torch.no_grad():
        weight = weight_of(z)
        bias = z0 * bias_scale - weight @ centred.mean
    return weight, bias, int(optimizer.state[z].get("n_iter", 0))


def select_logistic(kind: str, train_features: torch.Tensor, train_targets: torch.Tensor,
                    val_features: torch.Tensor, val_targets: torch.Tensor, outputs: int,
                    grid: tuple[float, ...] = L2_GRID) -> LogisticHead:
    """The head of the λ in ``grid`` (strongest first) with the lowest validation loss (module docstring)."""
    fits, losses = [], []
    start = None
    centred = centred_features(train_features)
    for l2 in grid:
        weight, bias, iterations = fit_logistic(kind, train_features, train_targets, outputs, l2, start, centred)
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
