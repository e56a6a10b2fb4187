"""Image–text retrieval metrics from a similarity matrix and relevance keys, per query and aggregated.

Queries (rows of ``similarity``, shape ``(Q, M)``) rank candidates (columns) by similarity, highest first.
Relevance comes from keys: candidate ``j`` is relevant to query ``i`` when ``query_keys[i] ==
candidate_keys[j]``. One relevant text per image (MIMIC-CXR, texts deduplicated): the key is the index of
the image's text. Class-level relevance (CheXpert 5x200 with class prompts; GLoRIA's Precision@K counts a
text relevant when its class matches the image's): the key is the class. Every query needs at least one
relevant candidate.

**Ties are pessimistic**: a relevant candidate tied with irrelevant ones is ranked after all of them (a
model that scores every candidate alike gets the worst ranks, never the best). So, per query:

* ``rank``: the rank of the first relevant candidate, ``1 + #{irrelevant j: s_j >= max over relevant s}``.
* ``hit@K`` (Recall@K, ``r<K>``): 1 when ``rank <= K``, i.e. a relevant candidate is among the top K (with one
  relevant candidate per query, the usual recall; with several, "any relevant in the top K", as
  CLIP_benchmark and CXR-CLIP count it).
* ``precision@K`` (``p<K>``): the share of relevant candidates among the top K of the pessimistic order
  (GLoRIA's Precision@K). It needs ``K <= M``.

Aggregates over queries: Recall@K, Precision@K and the mean rank are means of the per-query values (CXR-CLIP
reports the mean rank); the median rank is the median of the ranks (a half-integer when Q is even).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlpbench.errors import ConfigError, DataError

DIRECTIONS = ("i2t", "t2i")
DIRECTION_WORDS = {"i2t": "image→text", "t2i": "text→image"}
# Cut-offs with a registered metric (vlpbench.metrics): the ones CXR-CLIP (R@1/5/10), GLoRIA (P@5/10/100),
# ConVIRT (P@5/10/50) and BenchX (Hit@1/5/10, which is R@K under class relevance, and P@1/5/10) report.
RECALL_AT = (1, 5, 10)
PRECISION_AT = (1, 5, 10, 50, 100)


def _checked(similarity, query_keys, candidate_keys) -> tuple[np.ndarray, np.ndarray]:
    """``similarity`` as a finite 2-D float array and the relevance matrix, or a DataError."""
    scores = np.asarray(similarity)
    if scores.ndim != 2 or 0 in scores.shape:
        raise DataError(f"retrieval: the similarity matrix must be 2-D and non-empty, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating) or not np.isfinite(scores).all():
        raise DataError("retrieval: similarities must be finite floating-point numbers")
    query_keys, candidate_keys = np.asarray(query_keys), np.asarray(candidate_keys)
    if query_keys.shape != (scores.shape[0],) or candidate_keys.shape != (scores.shape[1],):
        raise DataError(f"retrieval: {query_keys.shape} query keys and {candidate_keys.shape} candidate keys for "
                        f"a similarity matrix of shape {scores.shape}")
    relevant = query_keys[:, None] == candidate_keys[None, :]
    if (lonely := np.flatnonzero(~relevant.any(axis=1))).size:
        raise DataError(f"retrieval: {lonely.size} of {len(query_keys)} queries have no relevant candidate "
                        f"(first: query {int(lonely[0])}, key {query_keys[lonely[0]]!r})")
    return scores, relevant


def first_relevant_rank(similarity, query_keys, candidate_keys) -> np.ndarray:
    """Per query the rank (1-based) of its first relevant candidate, ties pessimistic (module docstring).

    Raises:
        DataError: a malformed or non-finite matrix, keys of the wrong length, or a query without a relevant
            candidate.
    """
    scores, relevant = _checked(similarity, query_keys, candidate_keys)
    best = np.where(relevant, scores, -np.inf).max(axis=1)
    return 1 + ((scores >= best[:, None]) & ~relevant).sum(axis=1)


def precision_at_k(similarity, query_keys, candidate_keys, k: int) -> np.ndarray:
    """Per query the share of relevant candidates among its top ``k``, ties pessimistic (module docstring).

    The top ``k`` hold every candidate scoring above the k-th highest score ``t``; the places left go to
    the candidates scoring exactly ``t``, irrelevant ones first.

    Raises:
        ConfigError: ``k`` is not a positive integer or exceeds the number of candidates.
        DataError: as :func:`first_relevant_rank`.
    """
    scores, relevant = _checked(similarity, query_keys, candidate_keys)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= scores.shape[1]:
        raise ConfigError(f"precision@{k!r}: expected an integer K from 1 to the number of candidates "
                          f"({scores.shape[1]})")
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]  # the k-th highest score of each row
    above = scores > kth
    tied_irrelevant = ((scores == kth) & ~relevant).sum(axis=1)
    relevant_in_top = (above & relevant).sum(axis=1) + np.maximum(0, k - above.sum(axis=1) - tied_irrelevant)
    return relevant_in_top / k


@dataclass(frozen=True)
class QueryScores:
    """Per-query values of one retrieval direction: ``rank`` (Q,) and ``precision`` (K → (Q,))."""

    rank: np.ndarray
    precision: dict[int, np.ndarray]

    def hits(self, k: int) -> np.ndarray:
        """1.0 where a relevant candidate is among the top ``k`` (``rank <= k``), else 0.0."""
        return (self.rank <= k).astype(np.float64)


def query_scores(similarity, query_keys, candidate_keys, precision_at=()) -> QueryScores:
    """Ranks and the precision at each cut-off of ``precision_at``, per query (module docstring)."""
    return QueryScores(first_relevant_rank(similarity, query_keys, candidate_keys),
                       {int(k): precision_at_k(similarity, query_keys, candidate_keys, k) for k in precision_at})


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The median of ``values`` each repeated ``weights`` times (integer bootstrap counts); NaN when all
    weights are 0."""
    counts = np.asarray(weights).astype(np.int64)
    return float(np.median(np.repeat(values, counts))) if counts.sum() else float("nan")



def metric_name(direction: str, measure: str, k: int | None = None) -> str:
    """The registered name of a retrieval metric: ``i2t_r5``, ``t2i_p10``, ``i2t_medr``, ``t2i_meanr``."""
    return f"{direction}_{measure}{'' if k is None else k}"
