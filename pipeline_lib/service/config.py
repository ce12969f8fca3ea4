"""The ``service`` section of a params file: how the deletion service runs against one
production model (registered-model name, ledger database, oracle policy, acceptance gates)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

from pipeline_lib.schema import Field, Float, Str, section
from pipeline_lib.service.gates import GatesConfig


@section("service")
class ServiceConfig:
    """The deletion service over one production model (``unlearn submit | sweep |
    retrain-production``).

    - ``model_name``: the registered model in the MLflow Model Registry (alias ``production``).
    - ``ledger_url``: the request ledger's database (SQLAlchemy URL); null: the MLflow tracking
      database when ``tracking.mlflow_uri`` is one (``sqlite:///`` or ``postgresql://``).
    - ``oracle``: when a request is compared against a model retrained without it:
      ``always``, ``never`` or ``sampled`` (a seeded ``oracle_sample_rate`` of requests,
      chosen by a hash of the request id, so the choice is reproducible).
    - ``gates``: acceptance checks; the alias moves only when they pass.
    - ``retention_days``: how long model artifacts trained with a forgotten id are kept after
      the id was tombstoned (``unlearn purge`` deletes them once the window has passed).
    """

    model_name: Str = "unlearnflow-digits"
    ledger_url: Str | None = None
    oracle: Literal["always", "never", "sampled"] = "sampled"
    oracle_sample_rate: Float = Field(0.25, ge=0.0, le=1.0)
    gates: GatesConfig = dataclasses.field(default_factory=GatesConfig)
    retention_days: Float = Field(30.0, ge=0.0)

    def evaluates_oracle(self, request_id: str) -> bool:
        """Whether the request ``request_id`` gets an oracle comparison."""
        if self.oracle != "sampled":
            return self.oracle == "always"
        h = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big")
        return h / 2**64 < self.oracle_sample_rate
