"""Downstream protocols: each trains a head on a frozen (or tuned) encoder and returns metrics."""
