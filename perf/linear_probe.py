"""Cost of the linear probe: cached frozen-encoder features vs MGCA's per-epoch augmented mode.

Runs ``rsna_cls`` (or another linear task) on a synthetic dataset three times at the same number of
epochs (early stopping off): ``linear_mode=cached`` with an empty feature cache (the encoder runs once
per image), the same again with every feature cached (a second run of a sweep: same result), and
``linear_mode=mgca`` with an empty feature cache (the encoder runs on every augmented training image
of every epoch). The image cache is filled beforehand so that no run pays for decoding. Prints the
wall time and test metric of each run and the cost ratios.

    python perf/linear_probe.py --n 200 --size 128 --epochs 10 [--arch resnet50] [--lr 0.01] [--device cuda]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="rsna_cls", choices=sorted(TASKS))
    parser.add_argument("--n", type=int, default=200, help="synthetic images")
    parser.add_argument("--size", type=int, default=128, help="image-cache resize; the crop is 7/8 of it")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--arch", default="resnet18", help="torchvision ResNet of the generic adapter")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="head learning rate (the task's 5e-4 suits pre-trained features; the random-init "
                             "encoder here gives small ones)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vlpbench-linear-probe-"))
    os.environ["VLPBENCH_CACHE"] = str(work / "cache")  # a private cache: every run starts cold
    from vlpbench import api
    from vlpbench.protocols.features import cache_root, load_images

    try:
        dataset = TASKS[args.task]
        data = work / dataset
        api.synth(dataset, data, n=args.n, size=args.size, progress=False)
        checkpoint = _checkpoint(args.arch, work)
        spec = api.load_task(args.task)
        source = api.open_dataset(spec, data)
        split, holder = api.task_splits(spec, source)
        ids = [i for part, s in (("train", split), ("val", split), ("test", holder))
               for i in api.split_ids(s, part, source)[0]]
        load_images(source, ids, args.size, progress=False)  # decode once, outside every timing

        base = {"resize_size": args.size, "image_size": args.size * 7 // 8, "max_epochs": args.epochs,
                "patience": args.epochs, "lr": args.lr, "bootstrap_resamples": 200}
        runs = {}
        for label, mode, fresh in (("cached, cold", "cached", True), ("cached, warm", "cached", False),
                                   ("mgca", "mgca", True)):
            if fresh:
                shutil.rmtree(cache_root(), ignore_errors=True)
            record, _ = api.run("generic", args.task, 1.0, checkpoint=checkpoint,
                                model_options={"arch": args.arch}, data_root=data, results=work / "results",
                                overrides={**base, "linear_mode": mode}, device=args.device, overwrite=True,
                                progress=False)
            runs[label] = record
        metric = spec.primary_metric
        first = runs["cached, cold"]
        print(f"{args.task} on {first['n']['train']}/{first['n']['val']}/{first['n']['test']} synthetic images, "
              f"{args.arch} at {base['image_size']}px, {args.epochs} epochs, device {first['config']['device']}, "
              f"{torch.get_num_threads()} CPU threads")
        for label, record in runs.items():
            training = record["config"]["training"]
            print(f"{label:>13}: {record['timing']['wall_s']:7.2f} s   {metric} {record['metrics'][metric]:.3f}   "
                  f"epochs {training['epochs']}   feature cache {training['feature_cache']}")
        mgca = runs["mgca"]["timing"]["wall_s"]
        print(f"mgca / cached cold: {mgca / first['timing']['wall_s']:.1f}x   "
              f"mgca / cached warm: {mgca / runs['cached, warm']['timing']['wall_s']:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
