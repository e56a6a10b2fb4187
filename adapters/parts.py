"""Key accounting for the small heads of a checkpoint (projections, pools), shared by the adapters: a head is
accounted against the state dict of the module its authors define, built on the meta device so that no init time
or global RNG draw is spent; ``strip`` and ``linear`` are the small helpers every mapping uses."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import LoadReport, match_keys, tensor_spec


def strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` whose key starts with ``prefix``, with ``prefix`` removed."""
    return {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}


def meta_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    """Key → shape of the state dict of the module ``build()`` returns, built on the meta device."""
    with torch.device("meta"):
        module = build()
    return {k: tensor_spec(v) for k, v in module.state_dict().items()}


def match_head(state: Mapping[str, Any], prefix: str, build: Callable[[], nn.Module], report: LoadReport,
               *, source_prefix: str = "") -> dict[str, torch.Tensor]:
    """Account the keys of ``state`` under ``prefix`` against ``build()``'s state dict; return its tensors.

    ``source_prefix`` is what the file had in front of ``state``'s keys (e.g. a DataParallel ``module.``), so
    that the report names keys as they are in the file. Module keys are recorded under ``prefix``.
    """
    return match_keys(strip(state, prefix), meta_shapes(build), report, source_prefix=source_prefix + prefix,
                      target_prefix=prefix)


def linear(state: Mapping[str, torch.Tensor]) -> nn.Linear:
    """A ``Linear`` holding ``state`` (``weight`` (out, in), optional ``bias``), in eval mode."""
    out_features, in_features = state["weight"].shape
    layer = nn.Linear(in_features, out_features, bias="bias" in state)
    layer.load_state_dict(dict(state))
    return layer.eval()
