"""Name → implementation registries for adapters, metrics, datasets and protocols.

Entries are lazy ``"module:attribute"`` strings so that listing models never imports torch-heavy
code, and registering a new model is one line next to its file.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from vlpbench.errors import VlpbenchError


class RegistryError(VlpbenchError, KeyError):
    """An unknown or duplicate registry name (a KeyError too, for callers that look names up)."""

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
            target = load_target(target)
            self._targets[name] = target
        return target

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def load_target(target: str | Any) -> Any:
    """The object a ``"module:attribute"`` string names, imported; any other value as it is."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything vlpbench knows of one dataset, registered once (lazy ``"module:attribute"`` strings).

    Each attribute is a ``"module:attribute"`` string (imported when first used) or the object itself.

    Attributes:
        reader: the :class:`vlpbench.data.base.DatasetReader` class that opens a folder of it.
        synthesizer: the function ``(out, *, n, seed, progress, **options)`` that writes a synthetic copy
            in the real format (``vlpbench synth``), or None.
        split_generators: split version → the function ``(out_dir) -> manifest`` that regenerates its
            committed files under ``splits/<name>/<version>/`` from the real label files.
        derived_splits: split version → the function ``(reader) -> Split`` that derives it from the
            user's own files, for a dataset whose label files do not ship to commit a split from.
        test_split: the function ``(reader) -> Split`` that derives the test part from the user's files
            where the split has none (CheXpert: the frontal images of valid.csv), or None.
        release_sizes: ``{split version: {part: images}}`` (or its ``"module:attribute"``): the part sizes of
            a derived split on the dataset's official release (what the split's rule gives on the release's
            label files), which ``sweep --plan`` counts where the data folder is absent; a version not named
            is not counted then.
        evaluation_only: every image of the label file is a test image (the CheXpert radiologist set).
        folder: the dataset whose data folder this one is read from, when it is another split set of the same
            download (``chexpert5x200`` and ``chexpert_test`` read the ``chexpert`` folder, ``mimic5x200`` the
            ``mimic_cxr`` one), or None.
    """

    reader: str | Any
    synthesizer: str | Any | None = None
    split_generators: Mapping[str, str | Any] = field(default_factory=dict)
    derived_splits: Mapping[str, str | Any] = field(default_factory=dict)
    test_split: str | Any | None = None
    release_sizes: str | Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    evaluation_only: bool = False
    folder: str | None = None

    def open(self, root: str | Path):
        """The dataset's reader over the folder ``root``."""
        return load_target(self.reader)(Path(root))


ADAPTERS = Registry("model")
# MetricSpec objects, registered by vlpbench.metrics; read them through vlpbench.metrics.metric_spec.
METRICS = Registry("metric")
DATASETS = Registry("dataset")
PROTOCOLS = Registry("protocol")

# Built-in datasets (one DatasetSpec each) and protocols (each an instance of vlpbench.protocols.base.Protocol,
# with its run and score); adapters register in adapters/__init__.py (vlpbench.adapters).
DATASETS.register("siim", DatasetSpec(
    reader="vlpbench.data.siim:SiimSource", synthesizer="vlpbench.synthetic.siim:synth_siim",
    split_generators={"v1": "vlpbench.data.splits:generate_siim_v1",
                      # MAVL's published SIIM zero-shot test list, for siim_zs's paper profile (docs/datasets.md).
                      "mavl": "vlpbench.data.siim_mavl:generate_split_mavl"}))
DATASETS.register("rsna", DatasetSpec(
    reader="vlpbench.data.rsna:RsnaSource", synthesizer="vlpbench.synthetic.rsna:synth_rsna",
    split_generators={"v1": "vlpbench.data.rsna:generate_split_v1",
                      # Reference splits for the paper profile: MGCA's detection/segmentation split, MGCA's
                      # linear-classification split and MedKLIP's public zero-shot grounding test list
                      # (docs/datasets.md).
                      "mgca": "vlpbench.data.rsna:generate_split_mgca",
                      "mgca_cls": "vlpbench.data.rsna:generate_split_mgca_cls",
                      "medklip": "vlpbench.data.rsna:generate_split_medklip"}))
DATASETS.register("chexpert", DatasetSpec(
    reader="vlpbench.data.chexpert:ChexpertSource", synthesizer="vlpbench.synthetic.chexpert:synth_chexpert",
    split_generators={"v1": "vlpbench.data.chexpert:generate_split_v1",
                      # MGCA's linear-classification split and subsets, its val/train overlap kept (docs/datasets.md).
                      "mgca": "vlpbench.data.chexpert:generate_split_mgca"},
    test_split="vlpbench.data.chexpert:test_split"))
# Two more split sets of the CheXpert folder: the committed 5x200 zero-shot set, and the radiologist-labelled
# test set (groundtruth.csv and test/ kept in the same folder), so one data folder serves every CheXpert task.
DATASETS.register("chexpert5x200", DatasetSpec(
    reader="vlpbench.data.chexpert:ChexpertSource", folder="chexpert",
    split_generators={"v1": "vlpbench.data.chexpert:generate_5x200_v1"}))
DATASETS.register("chexpert_test", DatasetSpec(
    reader="vlpbench.data.chexpert:ChexpertTestSet", folder="chexpert", evaluation_only=True))
DATASETS.register("cxr14", DatasetSpec(
    reader="vlpbench.data.cxr14:Cxr14Source", synthesizer="vlpbench.synthetic.cxr14:synth_cxr14",
    derived_splits={"v1": "vlpbench.data.cxr14:split_v1"},
    release_sizes="vlpbench.data.cxr14:RELEASE_SIZES"))
DATASETS.register("object_cxr", DatasetSpec(
    reader="vlpbench.data.object_cxr:ObjectCxrSource", synthesizer="vlpbench.synthetic.object_cxr:synth_object_cxr",
    derived_splits={"v1": "vlpbench.data.object_cxr:split_v1",
                    "mgca": "vlpbench.data.object_cxr:split_mgca"},  # MGCA's split (docs/datasets.md)
    release_sizes="vlpbench.data.object_cxr:RELEASE_SIZES"))
DATASETS.register("covidx", DatasetSpec(
    reader="vlpbench.data.covidx:CovidxSource", synthesizer="vlpbench.synthetic.covidx:synth_covidx",
    derived_splits={"v1": "vlpbench.data.covidx:split_v1",
                    "mgca": "vlpbench.data.covidx:split_mgca"}))  # MGCA's split and subsets (docs/datasets.md)
DATASETS.register("vindr", DatasetSpec(
    reader="vlpbench.data.vindr:VindrSource", synthesizer="vlpbench.synthetic.vindr:synth_vindr",
    split_generators={"v1": "vlpbench.data.vindr:generate_split_v1"},
    test_split="vlpbench.data.vindr:test_split"))  # test = the official test set in your files
DATASETS.register("padchest", DatasetSpec(
    reader="vlpbench.data.padchest:PadchestSource", synthesizer="vlpbench.synthetic.padchest:synth_padchest",
    split_generators={"v1": "vlpbench.data.padchest:generate_split_v1"}))  # test only: physician-labelled frontal
DATASETS.register("mimic_cxr", DatasetSpec(
    reader="vlpbench.data.mimic_cxr:MimicCxrSource", synthesizer="vlpbench.synthetic.mimic_cxr:synth_mimic_cxr",
    derived_splits={"v1": "vlpbench.data.mimic_cxr:split_v1"}))
# BenchX's MIMIC-5x200 retrieval set, read from the MIMIC-CXR folder; its classes come from the committed split.
DATASETS.register("mimic5x200", DatasetSpec(
    reader="vlpbench.data.mimic_5x200:Mimic5x200Source", folder="mimic_cxr",
    split_generators={"v1": "vlpbench.data.mimic_5x200:generate_split_v1"}))
DATASETS.register("ms_cxr", DatasetSpec(
    reader="vlpbench.data.ms_cxr:MsCxrSource", synthesizer="vlpbench.synthetic.ms_cxr:synth_ms_cxr",
    derived_splits={"v1": "vlpbench.data.ms_cxr:split_v1"}))
DATASETS.register("chexlocalize", DatasetSpec(
    reader="vlpbench.data.chexlocalize:ChexlocalizeSource",
    synthesizer="vlpbench.synthetic.chexlocalize:synth_chexlocalize",
    derived_splits={"v1": "vlpbench.data.chexlocalize:split_v1"}))
DATASETS.register("tbx11k", DatasetSpec(
    reader="vlpbench.data.tbx11k:Tbx11kSource", synthesizer="vlpbench.synthetic.tbx11k:synth_tbx11k",
    split_generators={"v1": "vlpbench.data.tbx11k:generate_split_v1"}))  # BenchX's split (docs/datasets.md)
PROTOCOLS.register("segmentation", "vlpbench.protocols.segmentation:PROTOCOL")
PROTOCOLS.register("detection", "vlpbench.protocols.detection:PROTOCOL")
PROTOCOLS.register("linear", "vlpbench.protocols.linear:PROTOCOL")
PROTOCOLS.register("finetune", "vlpbench.protocols.finetune:PROTOCOL")
PROTOCOLS.register("zero_shot", "vlpbench.protocols.zero_shot:PROTOCOL")
PROTOCOLS.register("grounding", "vlpbench.protocols.grounding:PROTOCOL")
PROTOCOLS.register("retrieval", "vlpbench.protocols.retrieval:PROTOCOL")
