"""Model adapters: one file per model family, registered lazily in ``vlpbench.registry.ADAPTERS``.

Built-in adapters (``vlpbench run --model NAME``):

- ``g2d``: G2D (NeurIPS 2024) ResNet-50 U-Net; loads ``*_encoder.pth``, ``*_encoder_decoder.pth`` and the
  full pre-training checkpoint, detected from the keys (``g2d.py``).
- ``resnet50``: a torchvision ResNet-50 state dict from a local file, e.g. ImageNet weights (``resnet.py``).
- ``random``: a seeded, randomly initialised ResNet-50; takes no checkpoint (``resnet.py``).

Adding a model: subclass ``vlpbench.adapters.base.Adapter`` in a new file, implement ``map_weights``
with the helpers in ``base.py``, and add one ``ADAPTERS.register`` line below. Registration is a string,
so listing models imports neither torch nor the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpbench.registry import ADAPTERS

if TYPE_CHECKING:
    from vlpbench.adapters.base import Adapter

ADAPTERS.register("g2d", "vlpbench.adapters.g2d:G2DAdapter")
ADAPTERS.register("resnet50", "vlpbench.adapters.resnet:TorchvisionResNet50")
ADAPTERS.register("random", "vlpbench.adapters.resnet:RandomResNet50")


def get_adapter(name: str) -> type[Adapter]:
    """Return the adapter class registered as ``name`` (``RegistryError`` with suggestions if unknown)."""
    return ADAPTERS.get(name)


def build_adapter(name: str, checkpoint: str | Path | None = None, **options: Any) -> Adapter:
    """Instantiate adapter ``name`` on ``checkpoint`` with ``options``; loading is strict (see ``Adapter``)."""
    return get_adapter(name)(checkpoint, **options)
