"""Downstream protocols: each trains a head on a frozen (or tuned) encoder and returns metrics.

A protocol is registered in ``vlpbench.registry.PROTOCOLS`` as a callable
``(adapter, source, SplitIds, config, *, seed, device, progress) -> outcome`` where ``outcome`` holds
``metrics``, ``ci``, ``per_image``, ``n``, ``training`` and ``timing`` (and, for classification, ``calibration``:
see :mod:`vlpbench.protocols.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlpbench.errors import DataError


@dataclass
class SplitIds:
    """Image ids of each part of the split that one run uses, and the run's training fraction (a
    protocol whose hyper-parameters depend on it, e.g. MGCA's 1 % detection runs, reads it here)."""

    train: list[str]
    val: list[str]
    test: list[str]
    fraction: float = 1.0
    # The whole training part the fraction's part was drawn from, for a protocol that draws its own
    # subset as a reference pipeline does (segmentation's ``train_subset: mgca``); None where the caller
    # did not give it (then only ``fraction`` 1.0 can use such a rule).
    train_all: list[str] | None = None

    def require_training(self, batch_size: int) -> None:
        """Raise ``DataError`` unless there is at least one full training batch (training drops the last
        incomplete one, as MGCA does) and validation and test images to select and score with."""
        if len(self.train) < batch_size:
            raise DataError(f"only {len(self.train)} training images for batch size {batch_size} "
                            "(training drops the last incomplete batch, as MGCA does)")
        if not self.val or not self.test:
            raise DataError(f"the split gives {len(self.val)} validation and {len(self.test)} test images; "
                            "the protocol needs both")
