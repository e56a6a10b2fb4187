"""Cost of the linear probe: cached frozen-encoder features vs MGCA's per-epoch augmented mode, and the
``sgd`` head vs the ``lbfgs`` head on the same cached features.

Runs ``rsna_cls`` (or another linear task) on a synthetic dataset four times at the same number of epochs
(early stopping off): ``linear_mode=cached`` with an empty feature cache (the encoder runs once per image),
the same again with every feature cached (a second run of a sweep: same result), ``head_solver=lbfgs`` on
those cached features, and ``linear_mode=mgca`` with an empty feature cache (the encoder runs on every
augmented training image of every epoch). The image cache is filled beforehand so that no run pays for
decoding. Prints the wall time and test metric of each run, the head's fit time per solver, and the cost
ratios measured in this process, each beside its arithmetic bound in encoder passes: the ratio that wall
times approach when the encoder dominates. A last line counts the encoder passes of a sweep of the task's
three fractions x three seeds on the task's real split (its committed split files): in cached mode one
extraction serves all nine runs.

    python perf/linear_probe.py --n 160 --size 128 --epochs 10 [--arch resnet50] [--lr 0.01] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torchvision

TASKS = {"rsna_cls": "rsna", "chexpert_cls": "chexpert", "covidx_cls": "covidx"}


def _checkpoint(arch: str, folder: Path) -> Path:
    """A random-init torchvision ``arch`` state dict (the numbers depend on shapes, not weights)."""
    path = folder / f"{arch}.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(getattr(torchvision.models, arch)(weights=None).state_dict(), path)
    return path


def encoder_passes(n_train: int, n_eval: int, epochs: int, batch_size: int, mgca: bool) -> int:
    """Images through the encoder in one run: each once (cached), or every epoch's training batches
    (the last incomplete one dropped) plus the validation and test images once (mgca)."""
    return (epochs * (n_train // batch_size) * batch_size if mgca else n_train) + n_eval


def _report(args, spec, split, holder, runs: dict) -> None:
    """Print each run, the head fit times and the measured ratios beside their arithmetic bounds."""
    metric = spec.primary_metric
    first = runs["cached, cold"]
    n = first["n"]
    print(f"{args.task} on {n['train']}/{n['val']}/{n['test']} synthetic images, "
          f"{args.arch} at {first['config']['image_size']}px, {args.epochs} epochs, "
          f"device {first['config']['device']}, "
          f"{torch.get_num_threads()} CPU threads")
    for label, record in runs.items():
        training = record["config"]["training"]
        fitted = (f"l2 {training['l2']:g} ({sum(row['iterations'] for row in training['l2_grid'])} L-BFGS iterations)"
                  if training["head_solver"] == "lbfgs" else f"epochs {training['epochs']}")
        print(f"{label:>13}: {record['timing']['wall_s']:7.2f} s   {metric} {record['metrics'][metric]:.3f}   "
              f"head fit {record['timing']['train_s']:6.3f} s   {fitted}   feature cache {training['feature_cache']}")
    sgd, lbfgs = runs["cached, warm"]["timing"]["train_s"], runs["lbfgs, warm"]["timing"]["train_s"]
    print(f"head fit on the same cached features: sgd {sgd:.3f} s ({args.epochs} epochs), lbfgs {lbfgs:.3f} s "
          f"({len(runs['lbfgs, warm']['config']['training']['l2_grid'])} penalties): sgd / lbfgs {sgd / lbfgs:.3g}x")

    batch_size = int(first["config"]["batch_size"])
    n_eval = n["val"] + n["test"]
    bound = (encoder_passes(n["train"], n_eval, args.epochs, batch_size, True)
             / encoder_passes(n["train"], n_eval, args.epochs, batch_size, False))
    mgca = runs["mgca"]["timing"]["wall_s"]
    print(f"mgca / cached cold: {mgca / first['timing']['wall_s']:.1f}x measured, {bound:.1f}x in encoder passes   "
          f"mgca / cached warm: {mgca / runs['cached, warm']['timing']['wall_s']:.1f}x measured")

    # A sweep on the task's real split: three fractions x three seeds at the task's batch size and epochs.
    config = spec.resolve()
    epochs, batch_size, seeds = int(config["max_epochs"]), int(config["batch_size"]), 3
    sizes = {f: len(split.ids(split.part_for_fraction(f))) for f in spec.fractions}
    n_eval = len(split.ids("val")) + len(holder.ids("test"))
    cached = encoder_passes(max(sizes.values()), n_eval, epochs, batch_size, False)
    mgca = n_eval + seeds * sum(encoder_passes(size, 0, epochs, batch_size, True) for size in sizes.values())
    print(f"sweep of {args.task} on split {split.dataset}/{split.version} "
          f"({', '.join(f'{f:g}: {size:,}' for f, size in sizes.items())} training images), {len(sizes)} fractions x "
          f"{seeds} seeds, {epochs} epochs at batch {batch_size}: cached {cached:,} encoder passes (one extraction "
          f"for all {len(sizes) * seeds} runs), mgca {mgca:,} (at most; fewer where early stopping ends a run): "
          f"{mgca / cached:.0f}x (arithmetic)")


def add_arguments(parser: argparse.ArgumentParser, *, n: int, size: int) -> None:
    """The options of both linear-probe benchmarks (this one and ``linear_probe_sweep.py``)."""
    parser.add_argument("--task", default="rsna_cls", choices=sorted(TASKS))
    parser.add_argument("--n", type=int, default=n, help="synthetic images")
    parser.add_argument("--size", type=int, default=size, help="image-cache resize; the crop is 7/8 of it")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--arch", default="resnet18", help="torchvision ResNet of the generic adapter")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="head learning rate (the task's 5e-4 suits pre-trained features; the random-init "
                             "encoder here gives small ones)")
    parser.add_argument("--device", default="auto")


def prepare(args: argparse.Namespace, work: Path):
    """Synthetic data of ``args.task`` under ``work``, a random-init checkpoint, and the image cache filled (so that
    no timed run decodes): ``(data folder, checkpoint, task, split, test holder, run overrides)``, the overrides
    training ``args.epochs`` epochs with early stopping off."""
    from vlpbench import api
    from vlpbench.protocols.features import load_images

    data = work / TASKS[args.task]
    api.synth(TASKS[args.task], data, n=args.n, size=args.size, progress=False)
    checkpoint = _checkpoint(args.arch, work)
    spec = api.load_task(args.task)
    source = api.open_dataset(spec, data)
    split, holder = api.task_splits(spec, source)
    ids = [i for part, s in (("train", split), ("val", split), ("test", holder))
           for i in api.split_ids(s, part, source)[0]]
    load_images(source, ids, args.size, progress=False)
    overrides = {"resize_size": args.size, "image_size": args.size * 7 // 8, "max_epochs": args.epochs,
                 "patience": args.epochs, "lr": args.lr, "bootstrap_resamples": 200}
    return data, checkpoint, spec, split, holder, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, n=160, size=128)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vlpbench-linear-probe-"))
    os.environ["VLPBENCH_CACHE"] = str(work / "cache")  # a private cache: every run starts cold
    from vlpbench import api
    from vlpbench.protocols.features import cache_root

    try:
        data, checkpoint, spec, split, holder, base = prepare(args, work)
        runs = {}
        for label, changes, fresh in (("cached, cold", {}, True), ("cached, warm", {}, False),
                                      ("lbfgs, warm", {"head_solver": "lbfgs"}, False),
                                      ("mgca", {"linear_mode": "mgca"}, True)):
            if fresh:
                shutil.rmtree(cache_root(), ignore_errors=True)
            record, _ = api.run("generic", args.task, 1.0, checkpoint=checkpoint,
                                model_options={"arch": args.arch}, data_root=data, results=work / "results",
                                overrides={**base, **changes}, device=args.device, overwrite=True,
                                progress=False)
            runs[label] = record
        _report(args, spec, split, holder, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
