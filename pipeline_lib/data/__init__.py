"""Datasets and deletion requests: image sources (digits, Fashion-MNIST, Parquet), text corpora,
the prepared tables with their ``sample_id`` column, and request parsing/extraction."""
