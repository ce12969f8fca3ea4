"""Statistics of a model on a split: Fisher diagonals, activation Gram matrices, shards, and
the store that keys them by identity."""
