"""Tables built from result records only."""
