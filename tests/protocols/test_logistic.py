"""The linear protocol's ``head_solver: lbfgs``: the L-BFGS logistic regression against scikit-learn's
(same C, lbfgs, fit_intercept) on binary, multi-label and multi-class problems, the penalty chosen on
validation loss, and the option's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from scipy.special import logsumexp

from vlpbench.errors import ConfigError, DataError
from vlpbench.protocols import SplitIds
from vlpbench.protocols.linear import head_solver, run_linear_task
from vlpbench.protocols.logistic import L2_GRID, centred_features, fit_logistic, preconditioner, select_logistic

KINDS = ("binary", "multilabel", "multiclass")


def _problem(kind: str, n: int, seed: int, separable: bool = False):
    """Features ``(n, 12)`` float32 and labels: a noisy linear rule, or an exact one (separable)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32) + 0.5
    truth = np.random.default_rng(99).normal(size=(12, 3))
    logits = x.astype(np.float64) @ truth + (0 if separable else rng.normal(size=(n, 3)))
    if kind == "binary":
        return x, (logits[:, :1] > 0).astype(np.int64)
    if kind == "multilabel":
        return x, (logits > 0).astype(np.int64)
    return x, logits.argmax(axis=1)


def _tensor_targets(kind: str, y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(y) if kind == "multiclass" else torch.from_numpy(y).float()


def _sklearn_models(kind: str, x: np.ndarray, y: np.ndarray, l2: float) -> list[LogisticRegression]:
    """scikit-learn's L-BFGS logistic regression at C = 1 / (l2 n): one multinomial model for a multi-class
    task, one binary model per label otherwise, fitted tightly so that the optimum, not the stopping rule, is
    compared."""
    def model(labels):
        return LogisticRegression(C=1.0 / (l2 * len(x)), solver="lbfgs", fit_intercept=True, tol=1e-12,
                                  max_iter=10_000).fit(x.astype(np.float64), labels)

    return [model(y)] if kind == "multiclass" else [model(y[:, k]) for k in range(y.shape[1])]


def _sklearn_probabilities(kind: str, x: np.ndarray, y: np.ndarray, l2: float, test: np.ndarray) -> np.ndarray:
    models = _sklearn_models(kind, x, y, l2)
    if kind == "multiclass":
        return models[0].predict_proba(test.astype(np.float64))
    return np.stack([m.predict_proba(test.astype(np.float64))[:, 1] for m in models], axis=1)


def _sklearn_logits(kind: str, x: np.ndarray, y: np.ndarray, l2: float, test: np.ndarray) -> np.ndarray:
    models = _sklearn_models(kind, x, y, l2)
    if kind == "multiclass":
        return models[0].decision_function(test.astype(np.float64))
    return np.stack([m.decision_function(test.astype(np.float64)) for m in models], axis=1)


def _probabilities(kind: str, weight: torch.Tensor, bias: torch.Tensor, x: np.ndarray) -> np.ndarray:
    logits = torch.addmm(bias, torch.from_numpy(x).double(), weight.T)
    return (logits.softmax(dim=1) if kind == "multiclass" else torch.sigmoid(logits)).numpy()


@pytest.mark.parametrize("separable", [False, True], ids=["noisy", "separable"])
@pytest.mark.parametrize("kind", KINDS)
def test_lbfgs_head_equals_scikit_learn_logistic_regression(kind, separable):
    x, y = _problem(kind, 150, seed=1, separable=separable)
    test, _ = _problem(kind, 60, seed=2)
    outputs = y.shape[1] if kind != "multiclass" else 3
    for l2 in (1e-1, 1e-3):
        weight, bias, iterations = fit_logistic(kind, torch.from_numpy(x), _tensor_targets(kind, y), outputs, l2)
        ours, reference = _probabilities(kind, weight, bias, test), _sklearn_probabilities(kind, x, y, l2, test)
        assert ours.shape == reference.shape and 0 < iterations < 1000
        np.testing.assert_allclose(ours, reference, atol=1e-4)
        if kind == "multiclass":
            assert np.array_equal(ours.argmax(axis=1), reference.argmax(axis=1))
        else:
            assert np.array_equal(ours > 0.5, reference > 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_the_penalty_chosen_has_the_lowest_validation_loss_of_the_grid(kind):
    x, y = _problem(kind, 40, seed=3)  # few images, 12 channels: the weakest penalties overfit
    val_x, val_y = _problem(kind, 80, seed=4)
    outputs = y.shape[1] if kind != "multiclass" else 3
    head = select_logistic(kind, torch.from_numpy(x), _tensor_targets(kind, y), torch.from_numpy(val_x),
                           _tensor_targets(kind, val_y), outputs)
    assert [row["l2"] for row in head.grid] == list(L2_GRID) == [10.0 ** k for k in range(2, -7, -1)]

    # Independently: scikit-learn's model at every grid value, scored by the mean log loss of its decision
    # function on validation (per label, then averaged: the protocol's BCE over images and labels). Written
    # from the logits, as sklearn.metrics.log_loss clips probabilities below 2e-16 and the weakest penalties
    # reach such ones.
    def val_loss(l2):
        logits = _sklearn_logits(kind, x, y, l2, val_x)
        if kind == "multiclass":
            return np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(val_y)), val_y])
        return np.mean(np.logaddexp(0, logits) - val_y * logits)

    expected = [val_loss(l2) for l2 in L2_GRID]
    # The weakest penalties overfit to logits of tens, where the loss of a wrong image magnifies the solvers'
    # stopping rules: 1e-3 relative.
    np.testing.assert_allclose([row["val_loss"] for row in head.grid], expected, rtol=1e-3)
    best = int(np.argmin(expected))
    assert 0 < best < len(L2_GRID) - 1  # an inside optimum: the choice is a real one
    assert head.l2 == L2_GRID[best] and head.val_loss == pytest.approx(expected[best], rel=1e-4)
    # No value within twice that tolerance of the best: the order of the grid is the same for both solvers.
    assert np.min(np.abs(np.delete(expected, best) - expected[best])) > 2e-3 * expected[best]
    np.testing.assert_allclose(_probabilities(kind, head.weight, head.bias, val_x),
                               _sklearn_probabilities(kind, x, y, head.l2, val_x), atol=1e-4)


@pytest.mark.parametrize("l2", [1e-2, 1e-6])
def test_ill_conditioned_features_converge_in_few_iterations_to_the_exact_optimum(l2):
    # Correlated channels whose scales span three decades, on a common offset of 50: the shape of encoder
    # features that takes plain L-BFGS over a hundred iterations (and at 1e-6 stops it 1e-3 off in
    # probability). The reference is scikit-learn's Newton solver, whose steps do not depend on conditioning.
    rng = np.random.default_rng(5)
    scales = np.logspace(-2, 1, 12)
    x = (rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * scales + 50).astype(np.float32)
    logits = (x - x.mean(axis=0)) @ (rng.normal(size=12) / scales * 0.3)
    y = (rng.random(300) < 1 / (1 + np.exp(-logits))).astype(np.int64)
    weight, bias, iterations = fit_logistic("binary", torch.from_numpy(x), torch.from_numpy(y[:, None]).float(), 1, l2)
    reference = LogisticRegression(C=1.0 / (l2 * len(x)), solver="newton-cholesky", tol=1e-12, max_iter=100)
    reference.fit(x.astype(np.float64), y)
    assert iterations <= 30
    np.testing.assert_allclose(_probabilities("binary", weight, bias, x)[:, 0],
                               reference.predict_proba(x.astype(np.float64))[:, 1], atol=1e-6)


def test_the_preconditioner_shifts_a_matrix_that_rounding_left_indefinite():
    covariance = torch.tensor([[1.0, 0.0], [0.0, -1e-3]], dtype=torch.float64)
    factor = preconditioner(covariance, 0.25, 1e-6)  # 0.25 * -1e-3 + 1e-6 < 0: shifted by 1e-5, 1e-4, then 1e-3
    torch.testing.assert_close(factor @ factor.T, torch.tensor([[0.251, 0.0], [0.0, 0.00075]], dtype=torch.float64))
    exact = preconditioner(torch.eye(2, dtype=torch.float64), 0.25, 1e-6)
    torch.testing.assert_close(exact @ exact.T, (0.25 + 1e-6) * torch.eye(2, dtype=torch.float64))


def test_non_finite_training_features_are_a_data_error():
    features = torch.zeros(5, 3)
    features[1, 2], features[3, 0] = float("nan"), float("inf")
    with pytest.raises(DataError, match="2 of 5 training feature rows hold NaN or infinite values"):
        centred_features(features)


def test_an_unknown_head_solver_is_a_config_error_with_the_closest_name():
    assert head_solver({}) == "sgd" and head_solver({"head_solver": "lbfgs"}) == "lbfgs"
    with pytest.raises(ConfigError, match=r"head_solver='lbgfs': expected one of sgd, lbfgs "
                                          r"\(did you mean 'lbfgs'\?\)"):
        head_solver({"head_solver": "lbgfs"})
    with pytest.raises(ConfigError, match=r"head_solver='newton': expected one of sgd, lbfgs$"):
        head_solver({"head_solver": "newton"})


def test_lbfgs_needs_cached_features():
    config = {"label_kind": "binary", "linear_mode": "mgca", "train_transform": "crop", "head_solver": "lbfgs"}
    with pytest.raises(ConfigError, match="head_solver=lbfgs fits on fixed features: it needs linear_mode=cached"):
        run_linear_task(None, None, SplitIds(["a"], ["b"], ["c"]), config, seed=0, device=torch.device("cpu"))
