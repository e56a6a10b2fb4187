"""Image cache throughput: decoding the source DICOMs versus reading the cache, in one run.

Writes a synthetic SIIM set in the real layout (JPEG-Baseline DICOMs, ``--size``² like the real
1024² release) into a temp folder, then measures images/s for:

- direct: decode and resize every image, in threads, as the segmentation protocol did before the cache;
- cold:   ``cached_images`` on an empty cache (decode in worker processes, store, assemble);
- warm:   ``cached_images`` again (stat the files, map the assembled array) plus copying every pixel
          into memory, as ``segmentation.Images`` does; best of ``--repeat``.

Each line gives wall-clock images/s (the ratio is against direct) and CPU milliseconds per image,
this process and its workers together; on a shared machine the CPU column is the steadier one.

    python perf/image_cache.py --n 200 --size 1024 --image-size 224 [--workers 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlpbench.data.cache import cached_images, resize_image
from vlpbench.data.siim import SiimSource
from vlpbench.synthetic.siim import synth_siim


class Timer:
    """Record (wall s, CPU s of this process and its reaped workers) under ``name``; keep the fastest."""

    def __init__(self, timings: dict[str, tuple[float, float]], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()

    def __exit__(self, *exc_info) -> None:
        taken = (time.perf_counter() - self.wall, _cpu_seconds() - self.cpu)
        self.timings[self.name] = min(self.timings.get(self.name, taken), taken)


def _cpu_seconds() -> float:
    children = os.times()  # clock-tick resolution, enough for a whole cache fill
    return time.process_time() + children.children_user + children.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="images in the synthetic set")
    parser.add_argument("--size", type=int, default=1024, help="side of the synthetic DICOMs")
    parser.add_argument("--image-size", type=int, default=224, help="the protocol's input size (cached)")
    parser.add_argument("--workers", type=int, default=None, help="cache fill processes (default: CPUs, max 16)")
    parser.add_argument("--repeat", type=int, default=5, help="warm reads; the best is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vlpbench-cache-bench-") as tmp:
        os.environ["VLPBENCH_CACHE"] = str(Path(tmp) / "cache")  # never the user's own cache

        started = time.perf_counter()
        synth_siim(Path(tmp) / "siim", n=args.n, size=args.size, progress=False)
        source = SiimSource(Path(tmp) / "siim")
        ids = source.image_ids
        print(f"{len(ids)} synthetic SIIM DICOMs at {args.size}px written in {time.perf_counter() - started:.1f} s; "
              f"cache at {args.image_size}px; {os.cpu_count()} CPUs")

        threads = min(8, os.cpu_count() or 1)
        timings = {}
        with Timer(timings, f"direct ({threads} threads)"), ThreadPoolExecutor(threads) as pool:
            direct = np.stack(list(pool.map(lambda i: resize_image(source.image(i), args.image_size), ids)))
        with Timer(timings, "cold fill"):
            cached_images(source, "siim", ids, args.image_size, workers=args.workers, progress=False)
        for _ in range(args.repeat):
            with Timer(timings, "warm read"):
                images = np.array(cached_images(source, "siim", ids, args.image_size, progress=False))
        if not np.array_equal(images, direct):
            raise SystemExit("cached images differ from direct decoding")

        base = len(ids) / timings[next(iter(timings))][0]
        for name, (wall, cpu) in timings.items():
            rate = len(ids) / wall
            print(f"{name:>20}: {rate:10.1f} images/s ({rate / base:8.2f}x direct), "
                  f"{1000 * cpu / len(ids):7.3f} CPU ms/image")
        print("cached images are bit-identical to direct decoding")


if __name__ == "__main__":  # worker processes may re-import this file (spawn start method)
    main()
