"""Frozen-encoder throughput: images/s of an smp encoder's forward pass, as the protocols run it.

The encoder is prepared by ``vlpbench.protocols.runtime.prepare_model`` (channels-last on CUDA, bf16
autocast for ``bf16``) and runs in eval mode under ``torch.inference_mode``, the way linear-probe
feature extraction and the frozen part of every protocol run it. On a GPU both fp32 and bf16 are
measured; on a CPU only fp32 (CPU bf16 autocast is a correctness check, not a speed-up). Random
weights: the numbers depend only on shapes.

    python perf/encoder_throughput.py --arch resnet50 --size 224 --batch 32 --steps 20 [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlpbench.api import resolve_device
from vlpbench.protocols.runtime import prepare_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(arch: str, precision: str, batch: int, size: int, steps: int, device: torch.device) -> float:
    """Images/s over ``steps`` forward passes of ``batch`` images at ``size``², after 3 warm-up passes."""
    import segmentation_models_pytorch as smp

    encoder = prepare_model(smp.encoders.get_encoder(arch, weights=None).eval(), device, precision)
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for step in range(steps + 3):
            if step == 3:
                _sync(device)
                started = time.perf_counter()
            encoder(x)
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="smp encoder name (default resnet50)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precisions = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.arch} encoder, eval + inference_mode, {args.size}px, batch {args.batch}, {args.steps} steps on {name}")
    rates = {p: images_per_second(args.arch, p, args.batch, args.size, args.steps, device) for p in precisions}
    for precision, rate in rates.items():
        print(f"{precision:>5}: {rate:9.1f} images/s   ({rate / rates['fp32']:.2f}x fp32)")


if __name__ == "__main__":
    main()
