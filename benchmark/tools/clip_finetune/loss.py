"""The symmetric CLIP (InfoNCE) loss, with positive-pair loss relaxation as an option.

For a batch of B image and text embeddings (L2-normalised), ``S[i, j]`` is the cosine similarity of image
i and text j, and the logits are ``logit_scale * S``; the loss is the mean of the cross-entropy over each
row (image → texts) and each column (text → images), the diagonal being the positives (CLIP).

Relaxation with margin ``m`` (vlpbench's reading of Jang et al.'s "positive-pair loss relaxation"; the
paper's formula is unpublished): every positive similarity is capped, ``S[i, i] → min(S[i, i], m)``, before
the logits are formed. A positive pair whose cosine already exceeds ``m`` then contributes a constant
positive logit: its gradient is exactly zero, so the loss stops pulling that pair closer, while the
negatives in its row and column are still pushed away. A positive at or below ``m`` is untouched, so when
every positive is at most ``m`` the loss equals the plain loss, and ``m = None`` is the plain CLIP loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relax_positives(similarity: torch.Tensor, margin: float) -> torch.Tensor:
    """``similarity`` (B, B) with each diagonal entry capped at ``margin`` (zero gradient above it)."""
    positive = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    return torch.where(positive, similarity.clamp(max=margin), similarity)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
              margin: float | None = None) -> torch.Tensor:
    """The symmetric InfoNCE loss of paired rows; ``margin`` relaxes the positives (module docstring).

    Args:
        image_features, text_features: (B, D), L2-normalised; row i of each is a positive pair.
        logit_scale: the multiplier of the cosine similarities (CLIP's ``logit_scale.exp()``).
        margin: the cosine above which a positive pair is no longer pulled together; None: the plain loss.

    Raises:
        ValueError: the two batches differ in shape or hold fewer than two pairs.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2 or len(image_features) < 2:
        raise ValueError(f"expected two (B, D) batches with B >= 2, got {tuple(image_features.shape)} and "
                         f"{tuple(text_features.shape)}")
    similarity = image_features @ text_features.T
    if margin is not None:
        similarity = relax_positives(similarity, margin)
    logits = logit_scale * similarity
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
