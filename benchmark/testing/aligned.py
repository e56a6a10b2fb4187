"""Hand-set projection heads for zero-shot tests: weights under which a model must score above chance.

A two-layer head ``Linear → [BatchNorm] → ReLU → Linear [→ BatchNorm]`` is set to map a feature ``f`` to
``(relu(f·w - t) - relu(t - f·w)) · d``: a positive multiple of ``d`` when ``f·w > t``, a negative one when
``f·w < t``. On the image side ``w`` reads the pooled feature of a bias-free ResNet, which scales with the
brightness of its input; on the text side ``w`` separates the features of a positive and a negative prompt. With
``d`` shared, the positive prompt's embedding is ``d``, the negative one's ``-d``, and bright images score high.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def set_sign_head(head: nn.Sequential, w: torch.Tensor, threshold: float, d: torch.Tensor) -> nn.Sequential:
    """Set ``head`` (the authors' module) to ``f ↦ (relu(f·w - t) - relu(t - f·w)) · d`` (module docstring).

    BatchNorm layers become identities up to BatchNorm's epsilon (running mean 0, variance 1, weight 1, bias 0),
    every other weight 0. Returns ``head`` in eval mode.
    """
    linears = [m for m in head if isinstance(m, nn.Linear)]
    first, last = linears[0], linears[-1]
    for module in head:
        if isinstance(module, nn.Linear):
            module.weight.zero_()
            module.bias.zero_()
        elif isinstance(module, nn.BatchNorm1d):
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
            if module.affine:
                module.weight.fill_(1.0)
                module.bias.zero_()
    first.weight[0], first.bias[0] = w, -threshold
    first.weight[1], first.bias[1] = -w, threshold
    last.weight[:, 0], last.weight[:, 1] = d, -d
    return head.eval()


def separating(positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(w, t)`` with ``positive·w - t > 0 > negative·w - t``: the difference and the midpoint's projection."""
    w = positive - negative
    return w, float(w @ (positive + negative) / 2)
