"""Dataset readers (one module per on-disk format), split files and synthetic datasets."""
