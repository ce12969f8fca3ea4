"""Modalities (image, text): what one pipeline needs to know about a kind of data: how to load
the splits, build and train a model, unlearn, and evaluate."""
