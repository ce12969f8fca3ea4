"""Prefect flows and the ``unlearn`` CLI that starts them."""
