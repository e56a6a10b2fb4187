"""A base for test models that need no checkpoint.

A subclass names itself and its capabilities and computes its embeddings from the inputs themselves
(image brightness, a lookup table), so that a test decides what a zero-shot, grounding or retrieval score
must come out as, without training or weights.
"""

from __future__ import annotations

from vlpbench.adapters.base import Adapter, LoadReport, Weights


class WeightlessAdapter(Adapter):
    """An adapter with no weights to load: identity normalisation at 32² unless a subclass says otherwise."""

    takes_checkpoint = False
    image_size = 32
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    @classmethod
    def map_weights(cls, checkpoint, options) -> Weights:
        """Nothing to map: an empty accounting."""
        return Weights(LoadReport("none"), {})
