"""Data attribution: the subset-model store, datamodels (DM-Direct, LDS) and the matching
targets built from them."""
