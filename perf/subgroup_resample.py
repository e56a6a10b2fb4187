"""Subgroup bootstrap cost: a subgroup's statistic over all test items with zero weights versus over the
subgroup's own evidence (``Evidence.subset``), as :mod:`vlpbench.metrics.subgroups` now runs it.

Builds a synthetic multi-label classification evidence of ChestX-ray14's size (``--n`` images, ``--classes``
classes, labels at ~10 % prevalence, scores that separate them a little), splits the images into ``--groups``
equal subgroups and, per subgroup, times ``--resamples`` bootstrap resamples of ``--metric``:

- full:   the statistic of the whole evidence on a length-N weight vector (the resample's counts on the
          subgroup's items, 0 elsewhere): what every resample cost before subsets;
- subset: the statistic of ``evidence.subset(members)`` on a length-n_g weight vector (the subset's
          statistics are built once per subgroup; that build is timed separately).

Both give the same values (checked on every resample). Times are wall-clock milliseconds per resample per
subgroup; the ratio is full / subset.

    python perf/subgroup_resample.py --n 25000 --classes 14 --groups 8 --resamples 20 [--metric auc]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vlpbench.evidence import classification_evidence


def synthetic_evidence(n: int, n_classes: int, seed: int = 0):
    """A multi-label classification evidence of ``n`` images and ``n_classes`` classes, with calibration."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, n_classes)) < 0.1).astype(np.int64)
    probabilities = np.clip(0.3 * labels + 0.7 * rng.random((n, n_classes)), 0.0, 1.0)
    classes = [f"class{k}" for k in range(n_classes)]
    return classification_evidence("multilabel", classes, [f"i{k}" for k in range(n)], labels, probabilities,
                                   ["auc"], None, "ge", calibration=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=25000, help="test images (default 25000, ChestX-ray14's test set)")
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--resamples", type=int, default=20, help="resamples per subgroup and way (default 20)")
    parser.add_argument("--metric", default="auc", help="auc (macro AUC), ece, adaptive_ece or brier")
    args = parser.parse_args()

    evidence = synthetic_evidence(args.n, args.classes)
    full = evidence.statistics()[args.metric]
    groups = np.random.default_rng(1).integers(0, args.groups, args.n)
    timings = {"full": 0.0, "subset": 0.0, "build": 0.0}
    largest = 0.0
    for g in range(args.groups):
        members = np.flatnonzero(groups == g)
        started = time.perf_counter()
        subset = evidence.subset(members).statistics()[args.metric]
        timings["build"] += time.perf_counter() - started
        rng = np.random.default_rng(g)
        for _ in range(args.resamples):
            counts = np.bincount(rng.integers(0, len(members), len(members)), minlength=len(members))
            weights = np.zeros(args.n)
            weights[members] = counts
            started = time.perf_counter()
            a = full(weights)
            timings["full"] += time.perf_counter() - started
            started = time.perf_counter()
            b = subset(counts.astype(np.float64))
            timings["subset"] += time.perf_counter() - started
            largest = max(largest, abs(a - b))
    per = args.groups * args.resamples
    print(f"{args.metric} of a {args.n} x {args.classes} multi-label evidence, {args.groups} subgroups, "
          f"{args.resamples} resamples each")
    print(f"  full:   {1000 * timings['full'] / per:8.2f} ms per resample per subgroup")
    print(f"  subset: {1000 * timings['subset'] / per:8.2f} ms per resample per subgroup "
          f"(+ {1000 * timings['build'] / args.groups:.1f} ms once per subgroup to build its statistics)")
    print(f"  ratio:  {timings['full'] / timings['subset']:.1f}x; largest |full - subset| = {largest:.3g}")


if __name__ == "__main__":
    main()
