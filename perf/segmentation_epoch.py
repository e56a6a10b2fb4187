"""One full ``siim_seg`` training epoch on synthetic data, broken down into data, forward and backward.

Writes a synthetic SIIM set (real DICOM layout) into a temp folder, loads it as the protocol does
(image cache at the task's input size, masks resized in threads), then runs one epoch of the
protocol's training step (frozen ResNet-50 encoder with BatchNorm in eval mode, U-Net decoder,
MGCA's loss, AdamW, the task's augmentation) followed by the validation pass, and prints wall
seconds per phase:

- data:      synthesis excluded; image cache fill + assembly and mask loading (cold cache)
- batch:     per step, gathering the batch, host→device copy (pinned on CUDA) and augmentation
- forward:   model forward and loss
- backward:  backward pass and optimizer step
- val:       the validation loss pass (inference mode)

The task's own config is used (224 px, batch 8) unless overridden; ``--precision bf16`` on a GPU.

    python perf/segmentation_epoch.py --n 120 [--image-size 224] [--device cuda] [--precision bf16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from vlpbench.api import resolve_device
from vlpbench.data.siim import SiimSource
from vlpbench.protocols.runtime import prepare_model, resolve_precision, to_device
from vlpbench.protocols.segmentation import Images, UNet, mixed_loss, random_affine
from vlpbench.synthetic.siim import synth_siim
from vlpbench.tasks import load_task


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Accumulated wall seconds per phase; ``phase(name)`` times a block, syncing CUDA at its edges."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def phase(self, name: str) -> "_Timed":
        return _Timed(self, name)


class _Timed:
    def __init__(self, phases: Phases, name: str) -> None:
        self.phases, self.name = phases, name

    def __enter__(self) -> None:
        _sync(self.phases.device)
        self.started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        _sync(self.phases.device)
        self.phases.seconds[self.name] += time.perf_counter() - self.started


def run_epoch(root: Path, config: dict, device: torch.device, precision: str) -> tuple[dict[str, float], int]:
    """Seconds per phase of one epoch over every image of the synthetic set (80 % train, 20 % val)."""
    import segmentation_models_pytorch as smp

    phases = Phases(device)
    size, batch_size = int(config["image_size"]), int(config["batch_size"])
    source = SiimSource(root)
    ids = [i for i in source.image_ids if i not in set(source.missing(source.image_ids))]
    cut = int(len(ids) * 0.8)
    with phases.phase("data"):
        train = Images(source, ids[:cut], size, "train", progress=False)
        val = Images(source, ids[cut:], size, "val", progress=False)

    model = UNet(smp.encoders.get_encoder("resnet50", weights=None))
    for parameter in model.unet.encoder.parameters():
        parameter.requires_grad_(False)
    prepare_model(model, device, precision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"],
                                  betas=tuple(config["betas"]), weight_decay=config["weight_decay"])
    generator = torch.Generator().manual_seed(0)

    def batch(data: Images, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = to_device(data.images[index].unsqueeze(1), device).float().div_(255.0)
        masks = to_device(data.masks[index].unsqueeze(1), device)
        return images, masks

    def normalize(images01: torch.Tensor) -> torch.Tensor:
        return ((images01 - config["mean"]) / config["std"]).expand(-1, 3, -1, -1)

    model.train()
    model.unet.encoder.eval()
    order = torch.randperm(len(train), generator=generator)
    steps = 0
    for start in range(0, len(train) - batch_size + 1, batch_size):
        with phases.phase("batch"):
            images, masks = batch(train, order[start:start + batch_size])
            theta = random_affine(len(images), 0.1, 10.0, 0.5, generator).to(device)
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        with phases.phase("forward"):
            loss = mixed_loss(model(normalize(images)), masks, config["focal_weight"], config["focal_gamma"])
        with phases.phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        steps += 1
    with phases.phase("val"), torch.inference_mode():
        model.eval()
        for start in range(0, len(val), batch_size):
            images, masks = batch(val, torch.arange(start, min(start + batch_size, len(val))))
            mixed_loss(model(normalize(images)), masks, config["focal_weight"], config["focal_gamma"])
    return dict(phases.seconds), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=120, help="synthetic images (default 120)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic DICOMs (default 256)")
    parser.add_argument("--image-size", type=int, help="protocol input size (default: the task's, 224)")
    parser.add_argument("--batch", type=int, help="batch size (default: the task's, 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    overrides = {key: value for key, value in (("image_size", args.image_size), ("batch_size", args.batch))
                 if value is not None}
    config = load_task("siim_seg").resolve(overrides)
    with tempfile.TemporaryDirectory() as folder:
        # A private image cache, so that the data phase is a cold fill every time.
        os.environ["VLPBENCH_CACHE"] = str(Path(folder) / "cache")
        root = Path(folder) / "siim"
        synth_siim(root, n=args.n, seed=0, size=args.source_size, progress=False)
        seconds, steps = run_epoch(root, config, device, precision)
    total = sum(seconds.values())
    print(f"siim_seg epoch on {device} ({precision}): {args.n} synthetic {args.source_size}px DICOMs, "
          f"{config['image_size']}px input, batch {config['batch_size']}, {steps} training steps")
    for name in ("data", "batch", "forward", "backward", "val"):
        print(f"{name:>9}: {seconds[name]:7.2f} s  ({seconds[name] / total:5.1%})")
    print(f"{'total':>9}: {total:7.2f} s")


if __name__ == "__main__":
    main()
