"""Prefect tasks: thin, coarse wrappers (one per stage) around pipeline_lib, plus the DVC,
MLflow and Ray edges. A task takes paths, ids and config; it loads, calls pipeline_lib,
saves, and returns a small JSON-serialisable dict (so results persist without pickles)."""
