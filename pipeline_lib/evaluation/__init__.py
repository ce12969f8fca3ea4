"""Evaluation: accuracy and MIA metrics, KLoM, the many-model comparison, LM influence."""
