"""Retrieval metrics against a brute-force loop over a sorted candidate list, ties and chance included."""

import numpy as np
import pytest
from scipy.special import comb

from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics import metric_spec
from vlpbench.metrics.retrieval import first_relevant_rank, precision_at_k, query_scores, weighted_median


def brute_force(scores, query_keys, candidate_keys, k):
    """Rank of the first relevant candidate and precision@k, from an explicit pessimistic order: sort by
    score descending, and among equal scores put the irrelevant candidates first."""
    ranks, precisions = [], []
    for row, key in zip(scores, query_keys):
        relevant = [c == key for c in candidate_keys]
        order = sorted(range(len(row)), key=lambda j: (-row[j], relevant[j]))
        ranks.append(next(position + 1 for position, j in enumerate(order) if relevant[j]))
        precisions.append(sum(relevant[j] for j in order[:k]) / k)
    return np.array(ranks), np.array(precisions)


@pytest.mark.parametrize("levels", [None, 4])  # continuous scores, or scores on 4 levels: many ties
def test_ranks_and_precision_equal_a_brute_force_loop(levels):
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(40, 30))
    if levels:
        scores = np.round(scores * levels / 3) / levels
    image_class = rng.integers(0, 3, size=40)
    text_class = np.r_[0, 1, 2, rng.integers(0, 3, size=27)]
    for k in (1, 5, 10):
        ranks, precision = brute_force(scores, image_class, text_class, k)
        assert first_relevant_rank(scores, image_class, text_class).tolist() == ranks.tolist()
        np.testing.assert_allclose(precision_at_k(scores, image_class, text_class, k), precision)
        assert query_scores(scores, image_class, text_class).hits(k).tolist() == (ranks <= k).tolist()
    # One relevant text per image (the paired one): the rank is 1 + the other texts scoring at least as high.
    paired = rng.normal(size=(25, 25))
    expected = [int((paired[i] >= paired[i, i]).sum()) for i in range(25)]  # itself included
    assert first_relevant_rank(paired, np.arange(25), np.arange(25)).tolist() == expected


def test_ties_are_pessimistic():
    # Query 0: its relevant text (column 0) ties with two irrelevant ones at the top: rank 3, not 1.
    # Query 1: every candidate scores the same: the relevant one comes last.
    scores = np.array([[0.9, 0.9, 0.9, 0.1], [0.5, 0.5, 0.5, 0.5]])
    keys, candidates = np.array([0, 1]), np.array([0, 2, 3, 1])
    assert first_relevant_rank(scores, keys, candidates).tolist() == [3, 4]
    assert precision_at_k(scores, keys, candidates, 2).tolist() == [0.0, 0.0]
    assert precision_at_k(scores, keys, candidates, 3).tolist() == [pytest.approx(1 / 3), 0.0]
    # Ties among relevant candidates only cost nothing.
    assert first_relevant_rank(np.array([[0.7, 0.7, 0.2]]), [5], [5, 5, 1]).tolist() == [1]


def test_a_perfect_ranking_scores_one_and_a_random_one_scores_chance():
    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(5), 40)
    aligned = (classes[:, None] == classes[None, :]).astype(float) + rng.normal(scale=0.01, size=(200, 200))
    assert (first_relevant_rank(aligned, classes, classes) == 1).all()
    assert precision_at_k(aligned, classes, classes, 40).mean() == 1.0
    # Random scores, 3 relevant of 60 candidates: P(a relevant one in the top K) = 1 - C(57, K) / C(60, K).
    n_queries, m, relevant = 20000, 60, 3
    scores = rng.random((n_queries, m))
    keys = np.zeros(n_queries, dtype=int)
    candidates = np.r_[np.zeros(relevant, dtype=int), np.ones(m - relevant, dtype=int)]
    hits = query_scores(scores, keys, candidates, precision_at=(10,))
    for k in (1, 5, 10):
        chance = 1 - comb(m - relevant, k) / comb(m, k)
        assert hits.hits(k).mean() == pytest.approx(chance, abs=4 * np.sqrt(chance * (1 - chance) / n_queries))
    assert hits.precision[10].mean() == pytest.approx(relevant / m, abs=0.005)
    # The first relevant rank of 3 among 60 in random order: E = (m + 1) / (relevant + 1).
    assert hits.rank.mean() == pytest.approx((m + 1) / (relevant + 1), rel=0.03)


def test_weighted_median_repeats_values_by_their_counts():
    values, counts = np.array([1, 4, 9, 20]), np.array([2, 0, 1, 3])
    assert weighted_median(values, counts) == np.median([1, 1, 9, 20, 20, 20])
    assert np.isnan(weighted_median(values, np.zeros(4)))


def test_bad_inputs_are_refused_with_what_is_wrong():
    with pytest.raises(DataError, match="no relevant candidate"):
        first_relevant_rank(np.zeros((2, 2)), [0, 7], [0, 1])
    with pytest.raises(DataError, match="finite"):
        first_relevant_rank(np.array([[np.nan, 1.0]]), [0], [0, 1])
    with pytest.raises(DataError, match="keys"):
        first_relevant_rank(np.zeros((2, 3)), [0, 1], [0, 1])
    with pytest.raises(ConfigError, match="precision@5"):
        precision_at_k(np.zeros((1, 3)), [0], [0, 1, 2], 5)


def test_retrieval_metrics_are_registered_with_their_direction():
    assert metric_spec("i2t_r1").display == "I2T R@1" and metric_spec("t2i_p10").higher_is_better
    assert metric_spec("i2t_medr").ci == "recomputed" and not metric_spec("t2i_medr").higher_is_better
    assert metric_spec("t2i_meanr").ci == "per-image mean" and not metric_spec("t2i_meanr").higher_is_better
