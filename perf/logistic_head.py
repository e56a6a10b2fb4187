"""Cost of the linear protocol's ``lbfgs`` head on RSNA-size features: the whole penalty grid
(``select_logistic``) on synthetic encoder-like features with a planted logistic rule.

The features mimic pooled encoder features where they matter to L-BFGS: correlated channels whose variances
follow a power law (eigenvalue k ~ k^-1.5) on a common offset. Labels are drawn from a logistic rule on them,
one binary label (RSNA) or 14 independent ones (a CheXpert-like multi-label task). Prints, per penalty, the
L-BFGS iterations and the validation loss, then the grid's wall time and the penalty chosen.

    python perf/logistic_head.py [--n 16000] [--val 5300] [--channels 2048] [--labels 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlpbench.protocols import logistic


def planted_problem(n: int, channels: int, labels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 features ``(n, channels)`` and 0/1 labels ``(n, labels)``; the basis, spectrum and rule are
    fixed (their own seeds), ``seed`` draws the images."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(channels, channels, generator=torch.Generator().manual_seed(11)))
    spread = torch.arange(1, channels + 1, dtype=torch.float64).pow(-0.75).float() * 3
    features = (torch.randn(n, channels, generator=generator) * spread) @ basis.T + 0.5
    rule = torch.randn(channels, labels, generator=torch.Generator().manual_seed(7))
    logits = (features - 0.5) @ rule
    logits = logits / logits.std(dim=0) * 2.5 - 1.0  # a strong signal, about 30 % positives
    return features, (torch.rand(n, labels, generator=generator) < torch.sigmoid(logits)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16000, help="training images (RSNA's training part: 16,010)")
    parser.add_argument("--val", type=int, default=5300, help="validation images")
    parser.add_argument("--channels", type=int, default=2048, help="feature channels (ResNet-50: 2048)")
    parser.add_argument("--labels", type=int, default=1, help="1: binary; more: multi-label")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    kind = "binary" if args.labels == 1 else "multilabel"
    train = [t.to(device) for t in planted_problem(args.n, args.channels, args.labels, seed=0)]
    val = [t.to(device) for t in planted_problem(args.val, args.channels, args.labels, seed=1)]
    logistic.fit_logistic(kind, train[0][:64], train[1][:64], args.labels, 1.0)  # warm-up: lazy initialisation
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    head = logistic.select_logistic(kind, *train, *val, args.labels)
    seconds = time.perf_counter() - started
    print(f"{kind}, {args.labels} label(s), {args.n:,} x {args.channels} training features, {args.val:,} validation, "
          f"device {device}, {torch.get_num_threads()} CPU threads")
    for row in head.grid:
        print(f"  l2 {row['l2']:7.0e}: {row['iterations']:4d} L-BFGS iterations, val loss {row['val_loss']:.6f}")
    print(f"whole grid: {seconds:.2f} s, {sum(row['iterations'] for row in head.grid)} iterations; "
          f"l2 chosen {head.l2:g} (val loss {head.val_loss:.6f})")


if __name__ == "__main__":
    main()
