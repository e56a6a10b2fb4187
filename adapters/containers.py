"""Training-framework objects inside checkpoint pickles: inert stand-ins to read them, look-alikes to write them.

PyTorch Lightning 1.1 checkpoints (GLoRIA's ``chexpert_resnet50.ckpt``: Lightning 1.1.4, omegaconf 2.0.5) hold
more than tensors and plain containers:

- ``callbacks`` is keyed by the callback *classes* (``trainer/callback_hook.py: on_save_checkpoint`` in
  Lightning 1.1.4: ``callback_states[type(callback)] = state``), so the pickle names
  ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` and
  ``pytorch_lightning.callbacks.early_stopping.EarlyStopping`` as dict keys.
- ``hyper_parameters`` is the omegaconf ``DictConfig`` given to ``save_hyperparameters`` and ``hparams_type``
  its class (``trainer/connectors/checkpoint_connector.py: dump_checkpoint``, Lightning 1.1.4 lines 310-312).

What an omegaconf 2.0.5 ``DictConfig`` pickles to (read from ``pickletools`` output of omegaconf 2.0.5 at pickle
protocol 2, as ``torch.save`` writes): every container and node is ``GLOBAL cls, EMPTY_TUPLE, NEWOBJ`` then its
``__dict__`` and ``BUILD`` (``basecontainer.py: __getstate__`` returns ``__dict__``). The globals are
``omegaconf.dictconfig.DictConfig`` (containers; ``{_metadata, _parent, _content}``), ``omegaconf.nodes.AnyNode``
(every value of a config loaded from YAML; ``{_metadata, _parent, _val}``), ``omegaconf.base.ContainerMetadata``
and ``omegaconf.base.Metadata`` (dataclasses), ``typing.Any`` and ``builtins.dict`` (written ``__builtin__ dict``)
as type annotations in the metadata, and ``collections.defaultdict`` called once per node by ``REDUCE`` with
``(dict,)``: the ``resolver_cache`` field. A config with lists adds ``omegaconf.listconfig.ListConfig``,
``builtins.list`` and ``builtins.int`` (written ``__builtin__ long``); typed nodes (``StringNode``, ``IntegerNode``,
``FloatNode``, ``BooleanNode``) come from structured configs.

Reading (``READ_AS``, allow-listed by ``vlpbench.adapters.base.load_state_dict_file`` for one load only): none of
these classes is imported or called. A ``DictConfig`` comes back as ``OmegaConfDict``, a plain ``dict`` of its
content (nodes replaced by their values, the parent links and metadata dropped); a ``ListConfig`` as
``OmegaConfList``; a class or annotation that is only named (callback classes, ``typing.Any``, builtin types) as a
``GlobalName`` marker; ``collections.defaultdict`` as a function that returns an empty ``dict`` without calling
the factory it is given. Nothing else is added: a pickle that calls anything else (``os.system``,
``builtins.eval``, ``subprocess``...) is still refused before the call.

Writing (``WRITTEN_AS``, used by ``save_checkpoint``'s pickler): look-alike classes recorded under the real
class paths, so that test files carry exactly the opcodes and globals of the real checkpoints.
"""

from __future__ import annotations

import collections
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
EARLY_STOPPING = "pytorch_lightning.callbacks.early_stopping.EarlyStopping"
DICT_CONFIG = "omegaconf.dictconfig.DictConfig"
LIST_CONFIG = "omegaconf.listconfig.ListConfig"
CONTAINER_METADATA = "omegaconf.base.ContainerMetadata"
NODE_METADATA = "omegaconf.base.Metadata"
ANY_NODE = "omegaconf.nodes.AnyNode"
# omegaconf 2.0's typed value nodes: same state as AnyNode ({_metadata, _parent, _val}).
VALUE_NODES = (ANY_NODE, "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode",
               "omegaconf.nodes.BooleanNode")
# Classes and annotations a checkpoint only names, never instantiates: Lightning 1.1 callback-state keys, and the
# ref_type / object_type / key_type / element_type annotations of omegaconf metadata.
NAMED_ONLY = (MODEL_CHECKPOINT, EARLY_STOPPING, "typing.Any", "builtins.dict", "builtins.list", "builtins.int",
              "builtins.str", "builtins.float", "builtins.bool")


@dataclass(frozen=True)
class GlobalName:
    """Inert marker for a class or object a checkpoint names by ``path`` but whose code is never loaded.

    Hashable and compared by path, so a Lightning 1.1 ``callbacks`` dict keyed by callback classes loads as a dict
    keyed by ``GlobalName("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")`` and so on.
    """

    path: str

    def __repr__(self) -> str:
        return f"<{self.path} (named in the checkpoint, not imported)>"


class OmegaConfNode:
    """Stand-in for an omegaconf value node (``AnyNode`` ...): keeps only the value (``_val``)."""

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.value = state["_val"]


class OmegaConfMetadata:
    """Stand-in for omegaconf's ``Metadata`` / ``ContainerMetadata`` dataclasses: their fields as attributes."""

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)


def _plain(item: Any) -> Any:
    """A container's content item as plain data: a value node becomes its value, containers stay as they are."""
    return item.value if isinstance(item, OmegaConfNode) else item


class OmegaConfDict(dict):
    """Stand-in for an omegaconf ``DictConfig``: a plain ``dict`` of its content, values unwrapped from their nodes.

    Interpolations (``"${...}"``) stay the strings they were written as. A config that is itself null, missing
    (``"???"``) or an interpolation stores that in ``unresolved`` and holds no items.
    """

    unresolved: Any = None

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        content = state["_content"]
        if isinstance(content, dict):
            self.update((key, _plain(item)) for key, item in content.items())
        else:
            self.unresolved = content


class OmegaConfList(list):
    """Stand-in for an omegaconf ``ListConfig``: a plain ``list`` of its content, values unwrapped from their nodes."""

    unresolved: Any = None

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        content = state["_content"]
        if isinstance(content, list):
            self.extend(_plain(item) for item in content)
        else:
            self.unresolved = content


def empty_resolver_cache(*_factory: Any) -> dict:
    """Stand-in for ``collections.defaultdict``: an empty ``dict``; the default factory it is given is never called.

    omegaconf pickles each node's ``resolver_cache`` as ``defaultdict(dict)``; as a plain dict it can still take the
    items a pickle sets on it.
    """
    return {}


READ_AS: Mapping[str, Any] = MappingProxyType({
    DICT_CONFIG: OmegaConfDict,
    LIST_CONFIG: OmegaConfList,
    CONTAINER_METADATA: OmegaConfMetadata,
    NODE_METADATA: OmegaConfMetadata,
    **{path: OmegaConfNode for path in VALUE_NODES},
    "collections.defaultdict": empty_resolver_cache,
    **{path: GlobalName(path) for path in NAMED_ONLY},
})


# --- writing: look-alikes that pickle exactly as the real objects do -------------------------------------------


class ModelCheckpointClass:
    """Written as the class ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` (a callback-state key)."""


class EarlyStoppingClass:
    """Written as the class ``pytorch_lightning.callbacks.early_stopping.EarlyStopping`` (a callback-state key)."""


@dataclass
class _Metadata:
    """Pickles as omegaconf 2.0.5's ``omegaconf.base.Metadata`` (same fields, same order)."""

    ref_type: Any
    object_type: Any
    optional: bool
    key: Any
    flags: dict = field(default_factory=dict)
    resolver_cache: dict = field(default_factory=lambda: collections.defaultdict(dict))


@dataclass
class _ContainerMetadata(_Metadata):
    """Pickles as omegaconf 2.0.5's ``omegaconf.base.ContainerMetadata``."""

    key_type: Any = None
    element_type: Any = None


class _AnyNode:
    """Pickles as omegaconf 2.0.5's ``omegaconf.nodes.AnyNode``: ``__dict__`` = ``_metadata, _parent, _val``."""

    def __init__(self, key: str, value: Any, parent: DictConfigLike) -> None:
        self._metadata = _Metadata(ref_type=typing.Any, object_type=None, optional=True, key=key)
        self._parent = parent
        self._val = value


class DictConfigLike:
    """Pickles as omegaconf 2.0.5's ``omegaconf.dictconfig.DictConfig``: ``_metadata, _parent, _content``.

    The class itself is written as ``omegaconf.dictconfig.DictConfig`` too (Lightning's ``hparams_type``).
    """

    def __init__(self, content: Mapping[str, Any], key: str | None = None,
                 parent: DictConfigLike | None = None) -> None:
        # OmegaConf.create / OmegaConf.load give the root ref_type dict and nested configs typing.Any.
        self._metadata = _ContainerMetadata(ref_type=dict if parent is None else typing.Any, object_type=None,
                                            optional=True, key=key)
        self._parent = parent
        self._content = {k: DictConfigLike(v, k, self) if isinstance(v, Mapping) else _AnyNode(k, v, self)
                         for k, v in content.items()}


def dict_config(content: Mapping[str, Any]) -> Any:
    """A look-alike of ``OmegaConf.create(content)`` (omegaconf 2.0.5) that ``save_checkpoint`` writes byte for byte
    as the real one pickles: nested mappings become configs, every other value an ``AnyNode``. Lists are not
    supported (GLoRIA's configs have none)."""
    return DictConfigLike(content)


# The look-alike class → the path the pickle records for it.
WRITTEN_AS: Mapping[type, str] = MappingProxyType({
    ModelCheckpointClass: MODEL_CHECKPOINT,
    EarlyStoppingClass: EARLY_STOPPING,
    DictConfigLike: DICT_CONFIG,
    _ContainerMetadata: CONTAINER_METADATA,
    _Metadata: NODE_METADATA,
    _AnyNode: ANY_NODE,
})
