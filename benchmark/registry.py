"""Name → implementation registries for adapters, metrics, dataset readers and protocols.

Entries are lazy ``"module:attribute"`` strings so that listing models never imports torch-heavy
code, and registering a new model is one line next to its file.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterator


class RegistryError(KeyError):
    """An unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """A mapping from names to lazily imported objects."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, str | Any] = {}

    def register(self, name: str, target: str | Any) -> None:
        """Register ``target`` (an object or a ``"module:attr"`` string) under ``name``."""
        if name in self._targets and self._targets[name] != target:
            raise RegistryError(f"{self.kind} {name!r} is already registered as {self._targets[name]!r}")
        self._targets[name] = target

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a registration made for a while only, e.g. by a test); unknown names are ignored."""
        self._targets.pop(name, None)

    def decorator(self, name: str) -> Callable[[Any], Any]:
        """``@REGISTRY.decorator("name")`` registers the decorated object."""

        def wrap(obj: Any) -> Any:
            self.register(name, obj)
            return obj

        return wrap

    def get(self, name: str) -> Any:
        """Return the object registered as ``name``, importing it if needed."""
        if name not in self._targets:
            close = difflib.get_close_matches(name, self._targets, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._targets)) or 'none'}"
            )
        target = self._targets[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._targets[name] = target
        return target

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


ADAPTERS = Registry("model")
# MetricSpec objects, registered by vlpbench.metrics; read them through vlpbench.metrics.metric_spec.
METRICS = Registry("metric")
DATASETS = Registry("dataset")
PROTOCOLS = Registry("protocol")

# Built-in dataset readers and protocols (each protocol an instance of vlpbench.protocols.base.Protocol, with
# its run and score); adapters register in adapters/__init__.py (vlpbench.adapters).
DATASETS.register("siim", "vlpbench.data.siim:SiimSource")
DATASETS.register("rsna", "vlpbench.data.rsna:RsnaSource")
DATASETS.register("chexpert", "vlpbench.data.chexpert:ChexpertSource")
# The same CheXpert folder under the name of its committed 5x200 split; the radiologist-labelled test set.
DATASETS.register("chexpert5x200", "vlpbench.data.chexpert:ChexpertSource")
DATASETS.register("chexpert_test", "vlpbench.data.chexpert:ChexpertTestSet")
DATASETS.register("cxr14", "vlpbench.data.cxr14:Cxr14Source")
DATASETS.register("object_cxr", "vlpbench.data.object_cxr:ObjectCxrSource")
DATASETS.register("covidx", "vlpbench.data.covidx:CovidxSource")
DATASETS.register("mimic_cxr", "vlpbench.data.mimic_cxr:MimicCxrSource")
DATASETS.register("ms_cxr", "vlpbench.data.ms_cxr:MsCxrSource")
PROTOCOLS.register("segmentation", "vlpbench.protocols.segmentation:PROTOCOL")
PROTOCOLS.register("detection", "vlpbench.protocols.detection:PROTOCOL")
PROTOCOLS.register("linear", "vlpbench.protocols.linear:PROTOCOL")
PROTOCOLS.register("finetune", "vlpbench.protocols.finetune:PROTOCOL")
PROTOCOLS.register("zero_shot", "vlpbench.protocols.zero_shot:PROTOCOL")
PROTOCOLS.register("grounding", "vlpbench.protocols.grounding:PROTOCOL")

SYNTHESIZERS = Registry("synthetic dataset")
SYNTHESIZERS.register("siim", "vlpbench.synthetic.siim:synth_siim")
SYNTHESIZERS.register("rsna", "vlpbench.synthetic.rsna:synth_rsna")
SYNTHESIZERS.register("chexpert", "vlpbench.synthetic.chexpert:synth_chexpert")
SYNTHESIZERS.register("cxr14", "vlpbench.synthetic.cxr14:synth_cxr14")
SYNTHESIZERS.register("object_cxr", "vlpbench.synthetic.object_cxr:synth_object_cxr")
SYNTHESIZERS.register("covidx", "vlpbench.synthetic.covidx:synth_covidx")
SYNTHESIZERS.register("mimic_cxr", "vlpbench.synthetic.mimic_cxr:synth_mimic_cxr")
SYNTHESIZERS.register("ms_cxr", "vlpbench.synthetic.ms_cxr:synth_ms_cxr")
