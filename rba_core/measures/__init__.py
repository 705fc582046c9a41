"""Statistics and measures over block outputs: the token statistics a pass accumulates, the block-similarity metrics, the cheap block scores (one registry) and the linear probe."""
