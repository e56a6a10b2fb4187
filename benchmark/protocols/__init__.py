"""Downstream protocols: each trains a head on a frozen (or tuned) encoder and returns metrics.

A protocol is registered in ``vlpbench.registry.PROTOCOLS`` as a callable
``(adapter, source, SplitIds, config, *, seed, device, progress) -> outcome`` where ``outcome`` holds
``metrics``, ``ci``, ``per_image``, ``n``, ``training`` and ``timing``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SplitIds:
    """Image ids of each part of the split that one run uses, and the run's training fraction (a
    protocol whose hyper-parameters depend on it, e.g. MGCA's 1 % detection runs, reads it here)."""

    train: list[str]
    val: list[str]
    test: list[str]
    fraction: float = 1.0
