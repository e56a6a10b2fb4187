"""The Python API behind the ``vlpbench`` command: run, score, table, inspect, synth, demo.

>>> from vlpbench import api
>>> api.task_table()[0]["task"]
'siim_seg'
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlpbench.config import resolve_data_root
from vlpbench.errors import ConfigError, DataError
from vlpbench.protocols import SplitIds
from vlpbench.registry import DATASETS, PROTOCOLS
from vlpbench.tasks import Task, load_task, task_names

log = logging.getLogger("vlpbench")

DEFAULT_RESULTS = Path("results")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is a GPU; ``cuda`` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible (use --device cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def model_label(model: str, checkpoint: str | Path | None, name: str | None = None) -> str:
    """Row label of a model in tables: ``--name`` if given, else ``adapter:checkpoint-stem``."""
    if name:
        return name
    return f"{model}:{Path(checkpoint).stem}" if checkpoint else model


def open_dataset(task: Task, data_root: str | Path | None = None):
    """The task's dataset reader over the user's folder."""
    return DATASETS.get(task.dataset)(resolve_data_root(task.dataset, data_root))


def split_ids(split, part: str, source) -> tuple[list[str], int]:
    """Ids of ``part`` that the data folder holds, and how many it lacks.

    A real dataset must hold every image of the split; a synthetic one (``vlpbench synth``) holds a
    sample of the split's real image ids, and only those are used.
    """
    ids = split.ids(part)
    missing = source.missing(ids)
    if missing and not source.synthetic:
        raise DataError(f"{len(missing)} of {len(ids)} images of split {split.dataset}/{split.version} "
                        f"{part} are not in the data folder, e.g. {', '.join(missing[:3])}")
    absent = set(missing)
    return [i for i in ids if i not in absent], len(missing)


def run(
    model: str,
    task: str,
    frac: float,
    *,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    name: str | None = None,
    model_options: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    results: str | Path = DEFAULT_RESULTS,
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Any], Path]:
    """Run one (model, task, fraction, seed) and write its result record.

    Everything that can fail fast (task, fraction, overrides, checkpoint, data folder, an existing
    record) is checked before any training starts. Returns the record and its path.
    """
    from vlpbench.adapters import build_adapter
    from vlpbench.data.splits import dataset_split
    from vlpbench.results import existing_record, make_record, write_record

    spec = load_task(task)
    frac = float(frac)
    if frac not in spec.fractions:
        raise ConfigError(f"--frac {frac}: task {spec.name} allows {', '.join(map(str, spec.fractions))}")
    config = spec.resolve(overrides)
    torch_device = resolve_device(device)

    adapter = build_adapter(model, checkpoint, **(model_options or {}))
    model_info = {"name": model_label(model, checkpoint, name), **adapter.describe()}
    stub = {"model": model_info, "task": {"name": spec.name, "version": spec.version}, "frac": frac,
            "seed": seed, "config": {"overrides": dict(overrides or {})}}
    if not overwrite and (path := existing_record(results, stub)) is not None:
        raise ConfigError(f"a record for this run already exists: {path} (pass --overwrite to replace it; "
                          "the old record is kept as a .bak file)")

    source = open_dataset(spec, data_root)
    split = dataset_split(spec.dataset, source, spec.split)
    parts = {}
    absent = {}
    for role, part in (("train", split.part_for_fraction(frac)), ("val", "val"), ("test", "test")):
        parts[role], absent[role] = split_ids(split, part, source)
    if source.synthetic:
        log.warning("synthetic dataset at %s: using the %d/%d/%d split images it holds",
                    getattr(source, "root", data_root), len(parts["train"]), len(parts["val"]), len(parts["test"]))

    log.info("run %s on %s at %g%% (seed %d) on %s", model_info["name"], spec.name, frac * 100, seed, torch_device)
    torch.manual_seed(seed)
    np.random.seed(seed)
    started = time.perf_counter()
    protocol = PROTOCOLS.get(spec.protocol)
    outcome = protocol(adapter, source, SplitIds(**parts), config, seed=seed,
                       device=torch_device, progress=progress)
    outcome["timing"]["wall_s"] = time.perf_counter() - started

    record = make_record(
        model=model_info,
        task={"name": spec.name, "version": spec.version, "protocol": spec.protocol,
              "higher_is_better": spec.higher_is_better},
        frac=frac,
        seed=seed,
        split={"dataset": split.dataset, "version": split.version, "sha256": split.manifest_sha256,
               "part": split.part_for_fraction(frac)},
        metrics=outcome["metrics"],
        primary_metric=spec.primary_metric,
        n=outcome["n"],
        config={**config, "overrides": dict(overrides or {}), "device": str(torch_device),
                "training": outcome["training"]},
        timing=outcome["timing"],
        ci=outcome["ci"],
        per_image=outcome["per_image"],
        data={"root": str(getattr(source, "root", data_root)), "synthetic": bool(source.synthetic),
              "absent_from_split": absent},
    )
    path = write_record(record, results, overwrite=overwrite)
    log.info("%s = %.4f → %s", spec.primary_metric, outcome["metrics"][spec.primary_metric], path)
    return record, path


def table(results: str | Path = DEFAULT_RESULTS) -> str:
    """The Markdown leaderboard of every record under ``results``."""
    from vlpbench.report.table import markdown_table
    from vlpbench.results import load_records

    records = load_records(results)
    if not records:
        raise DataError(f"no result records under {Path(results) / 'runs'} (run `vlpbench run` first)")
    return markdown_table(records)


def score(task: str, predictions: str | Path, *, data_root: str | Path | None = None,
          split: str = "test", bootstrap_resamples: int = 1000) -> dict[str, Any]:
    """Score predictions made by any framework against ``split`` with the task's canonical metric."""
    from vlpbench.data.splits import dataset_split
    from vlpbench.registry import SCORERS

    spec = load_task(task)
    scorer = SCORERS.get(spec.protocol)
    source = open_dataset(spec, data_root)
    split_obj = dataset_split(spec.dataset, source, spec.split)
    ids, _ = split_ids(split_obj, split, source)
    val_ids = split_ids(split_obj, "val", source)[0] if "val" in split_obj.parts and split != "val" else None
    result = scorer(Path(predictions), source, ids, spec.config, val_ids=val_ids,
                    bootstrap_resamples=bootstrap_resamples)
    return {"task": spec.name, "version": spec.version, "split": split,
            "split_sha256": split_obj.manifest_sha256, **result}


def inspect(model: str, checkpoint: str | Path | None, **options: Any):
    """Key accounting of ``checkpoint`` for adapter ``model`` (never raises on missing keys)."""
    from vlpbench.adapters import get_adapter

    return get_adapter(model).inspect(checkpoint, **options)


def model_table() -> list[dict[str, Any]]:
    """Built-in and plug-in adapters, one dict each, sorted by name.

    Keys: ``model``, ``description``, ``capabilities`` (sorted list), ``checkpoint_forms`` (the adapter's
    ``checkpoint_forms``; empty when it declares none), ``package`` (``"<distribution> <version>"`` for a
    plug-in, None for a built-in) and ``error`` (None, or why the adapter cannot be imported; the
    description, capabilities and forms are then None, [] and []). Imports every adapter module.

    Raises:
        PluginError: two installed adapters claim the same name.
    """
    from vlpbench.adapters import adapter_names, get_adapter, plugins

    found = plugins()
    rows = []
    for name in adapter_names():
        plugin = found.get(name)
        row: dict[str, Any] = {"model": name, "description": None, "capabilities": [], "checkpoint_forms": [],
                               "package": f"{plugin.package} {plugin.version}" if plugin else None, "error": None}
        try:
            cls = get_adapter(name)
        except Exception as e:  # one adapter that cannot be imported must not hide the others from the list
            row["error"] = f"{type(e).__name__}: {e}"
        else:
            row.update(description=cls.description, capabilities=sorted(cls.capabilities),
                       checkpoint_forms=list(getattr(cls, "checkpoint_forms", ())))
        rows.append(row)
    return rows


def task_table() -> list[dict[str, Any]]:
    """Shipped tasks with their protocol, metric and fractions."""
    rows = []
    for name in task_names():
        spec = load_task(name)
        rows.append({"task": spec.name, "version": spec.version, "dataset": f"{spec.dataset}/{spec.split}",
                     "protocol": spec.protocol, "metric": spec.primary_metric,
                     "fractions": ", ".join(f"{f:g}" for f in spec.fractions), "description": spec.description})
    return rows


def data_check(dataset: str, root: str | Path | None = None, *, decode: bool = True, progress: bool = True):
    """Validate a dataset folder (layout, labels, split coverage, every image decodable); a CheckReport."""
    from vlpbench.data.check import check_dataset

    return check_dataset(dataset, resolve_data_root(dataset, root), decode=decode, progress=progress)


def splits_verify(dataset: str, root: str | Path | None = None):
    """Check a split against its manifest and, given a data folder, against the data; a CheckReport."""
    from vlpbench.data.check import verify_split

    return verify_split(dataset, root)


def synth(dataset: str, out: str | Path, *, n: int = 200, seed: int = 0, size: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Write a synthetic dataset in the real on-disk format of ``dataset`` (``size``: image side;
    None keeps the dataset's own default)."""
    from vlpbench.registry import SYNTHESIZERS

    options = {} if size is None else {"size": size}
    return SYNTHESIZERS.get(dataset)(Path(out), n=n, seed=seed, progress=progress, **options)


# The demo is the real pipeline on a small synthetic set: only the data size, image size and epoch
# budget differ from a full run, and they differ through task overrides that the records carry.
DEMO_OVERRIDES = {"image_size": 64, "max_epochs": 30, "patience": 10, "lr": 1e-3}
DEMO_FRACTIONS = (0.1, 1.0)


def demo(out: str | Path = "vlpbench-demo", *, n: int = 500, seed: int = 0, device: str = "auto",
         progress: bool = True) -> str:
    """Synthesize SIIM, write a random-init checkpoint in G2D's encoder layout, run ``siim_seg`` at
    two fractions through ``run`` and return the Markdown table."""
    from vlpbench.adapters.g2d import write_g2d_checkpoint

    out = Path(out)
    data = out / "siim"
    if not (data / "VLPBENCH_SYNTHETIC.json").is_file():
        synth("siim", data, n=n, seed=seed, progress=progress)
    checkpoint = out / "g2d_random_encoder.pth"
    if not checkpoint.is_file():
        write_g2d_checkpoint(checkpoint, layout="encoder", seed=seed)
    notes = []
    for frac in DEMO_FRACTIONS:
        record, _ = run("g2d", "siim_seg", frac, seed=seed, checkpoint=checkpoint, name="g2d-random-init",
                        data_root=data, results=out / "results", overrides=DEMO_OVERRIDES, device=device,
                        overwrite=True, progress=progress)
        m = record["metrics"]
        notes.append(f"- {frac:.0%} ({record['n']['train']} training images): Dice {m['dice']:.3f}; "
                     f"positives only {m['dice_positive']:.3f}; negatives left empty {m['empty_correct']:.3f}; "
                     f"an all-empty prediction would score {m['all_empty_baseline']:.3f}")
    return table(out / "results") + "\n" + "\n".join(notes)
