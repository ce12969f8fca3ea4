"""The deletion service as pure building blocks, with no orchestration or store imports.

- :mod:`pipeline_lib.service.lifecycle`: request states, allowed transitions, ``Transition``.
- :mod:`pipeline_lib.service.gates`: acceptance gates (``GatesConfig``) and ``evaluate_gates``.
- :mod:`pipeline_lib.service.tombstones`: the cumulative, append-only tombstone table.

The stores that hold this state (the request ledger database, the MLflow Model Registry,
DVC) are reached from ``tasks/``; nothing here imports them. Import the submodules directly:
this package does not re-export them, so that reading lifecycle states does not load torch.
"""
