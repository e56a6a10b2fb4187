"""Percentile bootstrap: determinism, coverage of the estimate, scaling, and scipy as a reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics import bootstrap_ci


@pytest.fixture
def scores() -> np.ndarray:
    """200 Dice-like per-image scores: many near 0 or 1, some in between."""
    return np.random.default_rng(0).beta(0.6, 0.4, size=200)


def test_result_fields_and_determinism(scores):
    ci = bootstrap_ci(scores, n_resamples=500, seed=3)
    assert set(ci) == {"method", "unit", "n_resamples", "level", "low", "high", "seed", "skipped"}
    assert (ci["method"], ci["unit"], ci["n_resamples"], ci["level"], ci["seed"], ci["skipped"]) == (
        "percentile_bootstrap", "image", 500, 0.95, 3, 0)
    assert bootstrap_ci(scores, n_resamples=500, seed=3) == ci
    other = bootstrap_ci(scores, n_resamples=500, seed=4)
    assert (other["low"], other["high"]) != (ci["low"], ci["high"])


def test_interval_contains_the_mean_and_narrows_with_level(scores):
    ci95 = bootstrap_ci(scores)
    ci80 = bootstrap_ci(scores, level=0.8)
    assert ci95["low"] < ci80["low"] < scores.mean() < ci80["high"] < ci95["high"]


def test_width_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.random(100))
    large = bootstrap_ci(rng.random(10_000))
    ratio = (small["high"] - small["low"]) / (large["high"] - large["low"])
    # sqrt(10000 / 100) = 10; Monte Carlo noise of 1,000 resamples moves each width by a few percent.
    assert 8 < ratio < 12


def test_agrees_with_scipy_percentile_bootstrap(scores):
    b = 10_000
    ours = bootstrap_ci(scores, n_resamples=b, seed=0)
    ref = scipy.stats.bootstrap((scores,), np.mean, n_resamples=b, method="percentile",
                                confidence_level=0.95, rng=np.random.default_rng(1)).confidence_interval
    # Both take the 2.5 % and 97.5 % quantiles of B resampled means, so they differ only by Monte Carlo
    # noise. The resampled mean is ~ Normal(., sigma) with sigma = std(scores) / sqrt(n); a quantile
    # estimated from B draws has standard error sqrt(p (1 - p) / B) / phi(z_p) * sigma
    # (p = 0.025, z_p = 1.96: 0.0267 sigma at B = 10,000). The difference of two independent estimates
    # has sqrt(2) times that, 0.0378 sigma; we allow 4 of those, 0.151 sigma. A wrong quantile (a 90 %
    # interval instead of 95 %) would move each end by (1.96 - 1.645) sigma = 0.31 sigma.
    sigma = scores.std() / np.sqrt(scores.size)
    p = 0.025
    se = np.sqrt(p * (1 - p) / b) / scipy.stats.norm.pdf(scipy.stats.norm.ppf(p)) * sigma
    tolerance = 4 * np.sqrt(2) * se
    assert abs(ours["low"] - ref.low) < tolerance
    assert abs(ours["high"] - ref.high) < tolerance


def test_callable_form_reproduces_the_vectorised_mean(scores):
    # Both forms draw the same index matrices from the same seed, so a mean statistic must give
    # the same interval to rounding.
    ci = bootstrap_ci(lambda idx: scores[idx].mean(), scores.size, n_resamples=300, seed=5)
    expected = bootstrap_ci(scores, n_resamples=300, seed=5)
    assert ci["low"] == pytest.approx(expected["low"], abs=1e-12)
    assert ci["high"] == pytest.approx(expected["high"], abs=1e-12)
    assert ci["skipped"] == 0


def _auc_problem() -> tuple[np.ndarray, np.ndarray]:
    # 14 images, 2 positive: a resample misses both positives with probability (12/14)^14 = 11.5 %.
    rng = np.random.default_rng(2)
    labels = np.array([1, 1] + [0] * 12)
    return labels, labels * 0.4 + rng.random(14) * 0.8


def test_callable_auc_skips_and_counts_single_class_resamples():
    labels, probs = _auc_problem()
    single_class = []

    def auc(idx: np.ndarray) -> float:
        single_class.append(len(np.unique(labels[idx])) == 1)
        return roc_auc_score(labels[idx], probs[idx])  # sklearn >= 1.6 warns and returns NaN

    ci = bootstrap_ci(auc, len(labels), n_resamples=1000, seed=0)
    assert len(single_class) == 1 + 1000  # the original sample, then every resample
    assert ci["skipped"] == sum(single_class[1:])
    assert 60 < ci["skipped"] < 180  # 1000 * 11.5 % = 115, +-5 binomial standard deviations
    assert ci["low"] <= roc_auc_score(labels, probs) <= ci["high"] <= 1.0

    def auc_raising(idx: np.ndarray) -> float:  # older sklearn raised instead of returning NaN
        if len(np.unique(labels[idx])) == 1:
            raise ValueError("Only one class present in y_true")
        return roc_auc_score(labels[idx], probs[idx])

    assert bootstrap_ci(auc_raising, len(labels), n_resamples=1000, seed=0) == ci


def test_callable_errors():
    labels, probs = _auc_problem()
    with pytest.raises(ConfigError, match="needs n"):
        bootstrap_ci(lambda idx: 0.0)
    with pytest.raises(DataError, match="original sample"):
        bootstrap_ci(lambda idx: np.nan, 10)
    calls = itertools.count()

    def defined_on_original_only(idx: np.ndarray) -> float:
        if next(calls):
            raise ValueError("boom")
        return 1.0

    with pytest.raises(DataError, match="undefined on all 50 resamples; last error: boom"):
        bootstrap_ci(defined_on_original_only, 10, n_resamples=50)
    with pytest.raises(TypeError):  # a bug in the statistic is not mistaken for an undefined resample
        bootstrap_ci(lambda idx: roc_auc_score(labels[idx], probs[idx], bogus=1), len(labels))


def test_value_errors(scores):
    with pytest.raises(ConfigError, match="level"):
        bootstrap_ci(scores, level=1.0)
    with pytest.raises(ConfigError, match="n_resamples"):
        bootstrap_ci(scores, n_resamples=0)
    with pytest.raises(ConfigError, match="n=3 but 200"):
        bootstrap_ci(scores, 3)
    with pytest.raises(DataError, match="per-image value 1 is nan"):
        bootstrap_ci(np.array([0.1, np.nan, 0.3]))
    with pytest.raises(DataError, match="no images"):
        bootstrap_ci(np.array([]))
