"""Dataset readers (one module per on-disk format), split files and the image cache."""

from pathlib import Path

# Written by every `vlpbench synth` into the dataset folder; readers report it, records carry it.
SYNTHETIC_MARKER = "VLPBENCH_SYNTHETIC.json"


def is_synthetic(*folders: Path) -> bool:
    """True when any of ``folders`` holds the marker of a ``vlpbench synth`` output."""
    return any((Path(folder) / SYNTHETIC_MARKER).is_file() for folder in folders)
