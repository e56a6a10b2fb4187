"""Throughput of the siim_seg protocol's model: frozen-encoder training vs full fine-tuning vs inference.

Prints images/s for each mode, measured in the same run, and the ratio against full fine-tuning
(the cost the frozen-encoder protocol avoids). Random weights; the numbers depend only on shapes.

    python perf/segmentation_throughput.py --size 224 --batch 8 --steps 10 [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlpbench.api import resolve_device
from vlpbench.protocols.segmentation import UNet, mixed_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(model: UNet, mode: str, batch: int, size: int, steps: int, device: torch.device) -> float:
    """Time ``steps`` iterations (after 2 warm-up ones) of ``mode``: frozen, full or eval."""
    encoder = model.unet.encoder
    for parameter in encoder.parameters():
        parameter.requires_grad_(mode == "full")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, size, size, device=device)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.9).float()
    for step in range(steps + 2):
        if step == 2:
            _sync(device)
            started = time.perf_counter()
        if mode == "eval":
            model.eval()
            with torch.inference_mode():
                model(x)
            continue
        model.train()
        if mode == "frozen":
            encoder.eval()
        loss = mixed_loss(model(x), target, 10.0, 2.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    import segmentation_models_pytorch as smp

    model = UNet(smp.encoders.get_encoder("resnet50", weights=None)).to(device)
    print(f"device {device}, {torch.get_num_threads()} CPU threads, {args.size}px, batch {args.batch}")
    rates = {mode: images_per_second(model, mode, args.batch, args.size, args.steps, device)
             for mode in ("full", "frozen", "eval")}
    for mode, rate in rates.items():
        print(f"{mode:>6}: {rate:8.1f} images/s   ({rate / rates['full']:.2f}x full fine-tuning)")


if __name__ == "__main__":
    main()
