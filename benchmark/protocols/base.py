"""The protocol unit: one object per downstream protocol, with ``run`` and ``score`` sharing one evaluation.

A protocol declares what it can do (``distributed``, ``table_group``, ``prediction_files``) and owns two
entry points:

- :meth:`Protocol.run` trains / infers on a model, then evaluates the test predictions;
- :meth:`Protocol.score` reads predictions from files (those ``run --save-predictions`` writes, or any
  framework's in the same format), then evaluates them with the same function.

So ``run`` and ``score`` give identical metrics, CIs and thresholds for identical predictions. Both return
an *outcome*: ``metrics``, ``ci``, ``per_image`` and ``n``; ``run`` adds ``training`` and ``timing``,
``score`` adds ``scoring`` (what it used: thresholds, notes).

A protocol is registered once, in :data:`vlpbench.registry.PROTOCOLS`, as an instance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlpbench.errors import ConfigError
from vlpbench.protocols import SplitIds

if TYPE_CHECKING:
    import torch

# Paper table groups (G2D Tables 1-4, then image-text retrieval), in the order tables print them.
TABLE_GROUPS = ("seg", "det", "cls", "zs", "ground", "ret")


class Protocol(ABC):
    """A downstream protocol: how a model is trained / queried on a task, and how its predictions are scored.

    Attributes:
        name: the name task files give in ``protocol:``.
        table_group: the paper table group of its tasks (one of :data:`TABLE_GROUPS`).
        distributed: whether one run can be shared among torchrun's processes.
        prediction_files: what ``run --save-predictions`` writes and ``score`` reads, in words.
        prediction_file: the one file ``score`` reads inside that folder, or None where it reads the folder.
        uses_val: whether ``score`` reads the validation part (thresholds chosen on validation predictions).
        trains: whether a run trains anything (a seed changes its predictions); false for the zero-shot
            protocols, whose seeds differ only in the bootstrap's resamples.
        needs: the adapter capabilities a run asks for beyond an encoder (:meth:`require`); none for the
            protocols that train on the image encoder.
    """

    name: ClassVar[str]
    table_group: ClassVar[str]
    distributed: ClassVar[bool] = True
    prediction_files: ClassVar[str]
    prediction_file: ClassVar[str | None] = None
    uses_val: ClassVar[bool] = False
    trains: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def run(self, adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int, device: torch.device,
            progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
        """Train / infer on ``split`` and evaluate its test part; ``predictions``: a folder to save the
        test (and, where thresholds come from them, validation) predictions in, in the format ``score`` reads."""

    @abstractmethod
    def score(self, predictions: Path, source, split: SplitIds, config: dict[str, Any], *,
              seed: int = 0) -> dict[str, Any]:
        """Evaluate the predictions in ``predictions`` (a folder or file) on ``split.test``, with the
        validation predictions of ``split.val`` where the protocol chooses thresholds on them. Reads the
        label files only, never an image."""

    def require(self, adapter) -> None:
        """Raise ``CapabilityError`` (the adapter's own message) unless ``adapter`` provides every capability of
        :attr:`needs`: what :meth:`run` checks before any work, and ``reproduce`` before it lists a run."""
        adapter.require(*self.needs)

    def prediction_path(self, predictions: Path) -> Path:
        """What ``score`` reads: :attr:`prediction_file` inside a folder, else ``predictions`` as given."""
        if self.prediction_file is not None and predictions.is_dir():
            return predictions / self.prediction_file
        return predictions

    def __repr__(self) -> str:
        return f"<protocol {self.name}>"


def protocol_named(name: str) -> Protocol:
    """The registered protocol ``name``; RegistryError listing the known ones otherwise."""
    from vlpbench.registry import PROTOCOLS

    protocol = PROTOCOLS.get(name)
    if not isinstance(protocol, Protocol):
        raise ConfigError(f"protocol {name!r} is registered as {protocol!r}, not a vlpbench.protocols.base.Protocol")
    return protocol
