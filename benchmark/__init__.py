"""vlpbench: benchmark chest X-ray vision-language pre-training models on standard downstream protocols."""

__version__ = "0.1.0"
