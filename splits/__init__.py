"""Versioned split files (one folder per dataset and version, each with a MANIFEST.json)."""

from pathlib import Path

SPLITS_DIR = Path(__file__).resolve().parent
