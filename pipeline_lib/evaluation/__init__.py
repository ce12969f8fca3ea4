"""Evaluation: accuracy and MIA metrics, KLoM, LM influence. The many-model method comparison
that uses them is :mod:`pipeline_lib.comparison`."""
