"""Tools built on the harness's adapters and data: G2D's pseudo masks and CLIP fine-tuning."""
