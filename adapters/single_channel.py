"""An smp encoder pre-trained on one-channel images, behind the three-channel input every protocol feeds.

The protocols give encoders ``(B, 3, H, W)`` input: the grey value of the X-ray repeated to three channels, each
normalised with the task's mean/std. A model pre-trained on single-channel input (PRIOR: ``conv1`` weight
``(64, 1, 7, 7)``) reads one channel. ``GreyInputEncoder`` converts the input as the pre-training loaders convert
an RGB file to grey (PIL's ``convert('L')``, mmcv's ``rgb2gray`` in BenchX's ``RGB2Gray``): the ITU-R BT.601 luma
``0.299 R + 0.587 G + 0.114 B``. The weights sum to 1, so on three equal channels the result is exactly the
normalised grey value: the network receives ``(g - task mean) / task std`` on its one channel, the task's
normalisation unchanged. Nothing is renormalised behind the task's back; a task that wants the model's own
statistics sets them (``--set mean=... --set std=...``).
"""

from __future__ import annotations

import torch
from torch import nn

# ITU-R BT.601 luma weights (R, G, B), as PIL's convert('L') and mmcv's rgb2gray apply them.
LUMA = (0.299, 0.587, 0.114)
CONVERSION = ("three-channel input reduced to one channel by the ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B "
              "(PIL convert('L')); on the protocols' equal channels this is the task-normalised grey value itself")


class GreyInputEncoder(nn.Module):
    """A one-channel smp encoder that takes three-channel input (module docstring).

    ``forward(x)`` returns the smp feature list with ``x`` itself first, as smp encoders do, so ``out_channels``
    is ``(3, *encoder.out_channels[1:])``: what a U-Net built for three channels expects. The inner encoder's
    weights are under ``encoder.``.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_channels = (3, *encoder.out_channels[1:])
        # Not persistent: a constant, so the state dict holds the encoder's weights only.
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    @property
    def output_stride(self) -> int:
        """The inner encoder's output stride (smp's U-Net checks input sizes against it)."""
        return self.encoder.output_stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        grey = (x * self.luma.to(x.dtype)).sum(dim=1, keepdim=True)
        return [x, *self.encoder(grey)[1:]]
