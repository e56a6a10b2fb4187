"""Cache checksums: what verifying a run file and its entries costs next to decoding its images.

Writes a synthetic SIIM set in the real layout (JPEG-Baseline DICOMs, ``--size``² like the real
1024² release) into a temp folder, fills the image cache at ``--image-size`` (uint8, as it stores them),
then measures on one core:

- decode:        reading and resizing every image (``source.image`` + ``resize_image``), the work the
                 cache saves;
- warm read:     copying the run file's pixels into memory, as ``segmentation.Images`` does on a hit;
- verify run:    the CRC-32 of the assembled run file, as every open of a run file computes;
- verify entries: reading and checking every entry, as assembling a new id list does;
- features:      the CRC-32 of a float32 (n, ``--channels``) feature array, as every feature-cache hit does;
- and for comparison blake2b and sha256 over the same run file.

Each line gives milliseconds per 1000 images and the ratio to decoding. Decoding is timed on a subset
(``--decode``) and scaled, since it is the slow part; the checksums run over the full run file, from the
page cache (a run file read from disk costs its read either way: training reads every pixel too).

    python perf/cache_checksum.py --n 1000 --size 1024 --image-size 224 [--decode 100]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vlpbench.checksum import content_checksum
from vlpbench.data.cache import _key_folder, _missing, cached_images, resize_image
from vlpbench.data.siim import SiimSource
from vlpbench.synthetic.siim import synth_siim


def best_of(repeat: int, work) -> float:
    """The fastest of ``repeat`` wall-clock timings of ``work()``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="images in the synthetic set and the run file")
    parser.add_argument("--size", type=int, default=1024, help="side of the synthetic DICOMs")
    parser.add_argument("--image-size", type=int, default=224, help="the protocol's input size (cached)")
    parser.add_argument("--channels", type=int, default=2048, help="feature width (ResNet-50: 2048)")
    parser.add_argument("--decode", type=int, default=100, help="images decoded to time decoding")
    parser.add_argument("--repeat", type=int, default=5, help="timings of each checksum; the best is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vlpbench-checksum-bench-") as tmp:
        os.environ["VLPBENCH_CACHE"] = str(Path(tmp) / "cache")  # never the user's own cache
        synth_siim(Path(tmp) / "siim", n=args.n, size=args.size, progress=False)
        source = SiimSource(Path(tmp) / "siim")
        ids = source.image_ids
        images = cached_images(source, "siim", ids, args.image_size, progress=False)
        print(f"{len(ids)} synthetic SIIM DICOMs at {args.size}px; run file {images.nbytes / 1e6:.1f} MB "
              f"at {args.image_size}px uint8; {os.cpu_count()} CPUs, timings on one core")

        sample = ids[: args.decode]
        decode = best_of(1, lambda: [resize_image(source.image(i), args.image_size) for i in sample])
        decode *= len(ids) / len(sample)
        folder = _key_folder(source, "siim", args.image_size, "antialias")
        # The entries' own names stand in for the ids, which _missing only uses in messages.
        entry_names = sorted(p.stem for p in (folder / "entries").rglob("*.u8"))
        features = np.random.default_rng(0).standard_normal((len(ids), args.channels), dtype=np.float32)
        buffer = memoryview(images).cast("B")
        timings = {
            "warm read (copy)": best_of(args.repeat, lambda: np.array(images)),
            "verify run (crc32)": best_of(args.repeat, lambda: content_checksum(images)),
            "verify entries": best_of(args.repeat, lambda: _missing(folder, entry_names, entry_names,
                                                                    args.image_size)),
            "verify features (crc32)": best_of(args.repeat, lambda: content_checksum(features)),
            "run file, blake2b": best_of(args.repeat, lambda: hashlib.blake2b(buffer).digest()),
            "run file, sha256": best_of(args.repeat, lambda: hashlib.sha256(buffer).digest()),
        }
        per_1000 = 1000 / len(ids)
        print(f"{'decode (scaled)':>24}: {1000 * decode * per_1000:9.1f} ms per 1000 images")
        for name, seconds in timings.items():
            print(f"{name:>24}: {1000 * seconds * per_1000:9.1f} ms per 1000 images, "
                  f"{100 * seconds / decode:6.2f} % of decoding")


if __name__ == "__main__":  # worker processes may re-import this file (spawn start method)
    main()
