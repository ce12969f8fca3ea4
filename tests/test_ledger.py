"""The request ledger on a real SQLite database file: idempotent submission, conflicts,
arrival order, one request per model at a time, the lifecycle, recovery of requests left by a
dead process, and several processes claiming from one ledger at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from pipeline_lib.data.requests import DeletionRequest, parse_request
from pipeline_lib.service.lifecycle import InvalidTransition
from tasks.ledger import (
    Ledger,
    LedgerConflict,
    LedgerError,
    ledger_url,
    requests_table,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = "unlearnflow-digits"


def _req(rid: str, *ids: str, reason: str = "GDPR Art. 17") -> DeletionRequest:
    return parse_request(
        {"request_id": rid, "reason": reason, "forget": {"sample_ids": list(ids) or ["s1"]}}
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield led
    led.close()


def test_ledger_url_shares_a_database_tracking_store_and_refuses_a_server() -> None:
    assert ledger_url("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert ledger_url("postgresql://u@127.0.0.1/mlflow") == "postgresql://u@127.0.0.1/mlflow"
    assert ledger_url("http://127.0.0.1:5000", "sqlite:///l.db") == "sqlite:///l.db"
    with pytest.raises(ValueError, match="is a tracking server.*set the ledger URL"):
        ledger_url("https://mlflow.example.org")
    with pytest.raises(ValueError, match="set the ledger URL"):
        ledger_url("./mlruns")
    with pytest.raises(ValueError, match="needs a database URL"):
        ledger_url("sqlite:///mlflow.db", "mysql://u@h/db")


def test_submit_is_idempotent_and_records_the_canonical_request(ledger: Ledger) -> None:
    req = _req("req-1", "s1", "s2")
    assert ledger.submit(req, MODEL) == ("pending", True)
    assert ledger.submit(req, MODEL) == ("pending", False)
    row = ledger.get("req-1")
    assert row is not None
    assert (row.status, row.digest, row.model_name) == ("pending", req.digest, MODEL)
    assert row.content == req.to_dict()
    assert row.submitted_at == row.updated_at and row.submitted_at.endswith("+00:00")
    assert [(e.from_status, e.to_status, e.reason) for e in ledger.events("req-1")] == [
        (None, "pending", "submitted")
    ]
    # Resubmitting a finished request reports its status and does not re-queue it.
    ledger.claim_next(MODEL)
    ledger.transition("req-1", "done", "forgotten")
    assert ledger.submit(req, MODEL) == ("done", False)
    assert len(ledger.events("req-1")) == 3
    assert ledger.get("nope") is None and ledger.events("nope") == []


def test_same_id_with_other_content_is_a_conflict(ledger: Ledger) -> None:
    first = _req("req-1", "s1")
    other = _req("req-1", "s2")
    ledger.submit(first, MODEL)
    with pytest.raises(LedgerConflict) as info:
        ledger.submit(other, MODEL)
    msg = str(info.value)
    assert "'req-1'" in msg and first.digest[:12] in msg and other.digest[:12] in msg
    assert isinstance(info.value, ValueError)
    with pytest.raises(LedgerConflict, match="for model 'unlearnflow-digits', not 'other'"):
        ledger.submit(first, "other")
    assert [r.request_id for r in ledger.list()] == ["req-1"]


def test_list_is_in_arrival_order_and_filters(ledger: Ledger) -> None:
    for rid in ("req-c", "req-a", "req-b"):
        ledger.submit(_req(rid), MODEL)
    ledger.submit(_req("req-x"), "other-model")
    rows = ledger.list()
    assert [r.request_id for r in rows] == ["req-c", "req-a", "req-b", "req-x"]
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert [r.request_id for r in ledger.list(model_name=MODEL)] == ["req-c", "req-a", "req-b"]
    ledger.claim_next(MODEL)
    assert [r.request_id for r in ledger.list(status="processing")] == ["req-c"]
    assert [r.request_id for r in ledger.list(status="pending", model_name="other-model")] == [
        "req-x"
    ]
    with pytest.raises(ValueError, match="unknown request status 'queued'"):
        ledger.list(status="queued")
    # Another connection to the same file sees the same ledger.
    again = Ledger(ledger.url)
    assert [r.request_id for r in again.list()] == ["req-c", "req-a", "req-b", "req-x"]
    again.close()


def test_claims_one_request_per_model_at_a_time_in_arrival_order(ledger: Ledger) -> None:
    assert ledger.claim_next(MODEL) is None  # nothing submitted yet
    for rid in ("req-1", "req-2", "req-3"):
        ledger.submit(_req(rid), MODEL)
    ledger.submit(_req("req-o"), "other-model")
    first = ledger.claim_next(MODEL, owner="worker-a")
    assert first is not None and first.request_id == "req-1"
    assert (first.status, first.owner) == ("processing", "worker-a")
    assert first.claimed_at is not None
    assert ledger.claim_next(MODEL, owner="worker-b") is None  # req-1 is still processing
    other = ledger.claim_next("other-model")  # models do not block each other
    assert other is not None and other.request_id == "req-o"
    assert other.owner == f"{socket.gethostname()}:{os.getpid()}"
    done = ledger.transition("req-1", "done", "unlearned", produced_version="2", batch_id="b1")
    assert (done.status, done.produced_version, done.batch_id) == ("done", "2", "b1")
    second = ledger.claim_next(MODEL)
    assert second is not None and second.request_id == "req-2"


def test_a_failed_request_does_not_block_the_next_and_can_be_retried(ledger: Ledger) -> None:
    for rid in ("req-1", "req-2", "req-3"):
        ledger.submit(_req(rid), MODEL)
    ledger.claim_next(MODEL)
    failed = ledger.transition(
        "req-1", "failed", "unlearning raised", error="RuntimeError: boom", mlflow_run_id="r1"
    )
    assert (failed.error, failed.mlflow_run_id) == ("RuntimeError: boom", "r1")
    nxt = ledger.claim_next(MODEL)
    assert nxt is not None and nxt.request_id == "req-2"
    ledger.transition("req-2", "needs-retrain", "gates failed; parent kept", parent_version="1")
    # An explicit retry puts req-1 back in the queue at its original place.
    ledger.transition("req-1", "pending", "retry requested", error=None)
    retried = ledger.claim_next(MODEL)
    assert retried is not None and retried.request_id == "req-1" and retried.error is None
    ledger.transition("req-1", "rejected", "unknown sample ids")
    assert ledger.claim_next(MODEL).request_id == "req-3"  # type: ignore[union-attr]
    ledger.transition("req-2", "done", "exact retrain v5", produced_version="5")
    assert [(e.from_status, e.to_status) for e in ledger.events("req-1")] == [
        (None, "pending"),
        ("pending", "processing"),
        ("processing", "failed"),
        ("failed", "pending"),
        ("pending", "processing"),
        ("processing", "rejected"),
    ]
    assert [e.reason for e in ledger.events("req-2")][-2:] == [
        "gates failed; parent kept",
        "exact retrain v5",
    ]


def test_transitions_are_validated(ledger: Ledger) -> None:
    ledger.submit(_req("req-1"), MODEL)
    with pytest.raises(InvalidTransition, match="cannot go from 'pending' to 'done'"):
        ledger.transition("req-1", "done", "skip the work")
    with pytest.raises(InvalidTransition, match="use claim_next"):
        ledger.transition("req-1", "processing", "manual start")
    with pytest.raises(LedgerError, match="unknown ledger field\\(s\\) owner"):
        ledger.transition("req-1", "rejected", "x", owner="me")
    with pytest.raises(LedgerError, match="'req-9' is not in the ledger"):
        ledger.transition("req-9", "rejected", "x")
    ledger.transition("req-1", "rejected", "forget set is the whole training split")
    with pytest.raises(InvalidTransition, match="'rejected' is final"):
        ledger.transition("req-1", "pending", "again")
    assert len(ledger.events("req-1")) == 2  # refused transitions leave no event


def test_the_database_refuses_two_processing_requests_of_one_model(ledger: Ledger) -> None:
    for rid in ("req-1", "req-2"):
        ledger.submit(_req(rid), MODEL)
    ledger.claim_next(MODEL)
    with pytest.raises(IntegrityError), ledger.engine.begin() as conn:
        conn.execute(
            requests_table.update()
            .where(requests_table.c.request_id == "req-2")
            .values(status="processing")
        )


def test_recover_stale_fails_requests_of_dead_owners_on_this_host(ledger: Ledger) -> None:
    host = socket.gethostname()
    for rid in ("req-1", "req-2"):
        ledger.submit(_req(rid), MODEL)
    ledger.submit(_req("req-o"), "other-model")
    ledger.claim_next(MODEL, owner=f"{host}:4242")
    ledger.claim_next("other-model", owner="elsewhere:4242")
    assert ledger.recover_stale(MODEL, is_alive=lambda pid: True) == []
    assert ledger.recover_stale("other-model", is_alive=lambda pid: False) == []  # other host
    recovered = ledger.recover_stale(MODEL, is_alive=lambda pid: pid != 4242)
    assert [r.request_id for r in recovered] == ["req-1"]
    assert recovered[0].status == "failed" and "died" in (recovered[0].error or "")
    assert ledger.events("req-1")[-1].reason == "owner process died"
    assert ledger.claim_next(MODEL).request_id == "req-2"  # type: ignore[union-attr]


def test_recover_stale_with_a_real_dead_process(ledger: Ledger) -> None:
    ledger.submit(_req("req-1"), MODEL)
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(proc.stdout)
    ledger.claim_next(MODEL, owner=f"{socket.gethostname()}:{dead_pid}")
    assert [r.request_id for r in ledger.recover_stale(MODEL)] == ["req-1"]
    ledger.transition("req-1", "pending", "retry")
    ledger.claim_next(MODEL)  # this process: alive
    assert ledger.recover_stale(MODEL) == []


# A worker process: waits for the go signal, then claims and finishes requests until none is
# pending; prints the ids it processed.
WORKER = """
import json, sys, time
from pathlib import Path
from tasks.ledger import Ledger
url, model, go, ready = sys.argv[1:5]
ledger = Ledger(url)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
done = []
while True:
    row = ledger.claim_next(model)
    if row is None:
        if not ledger.list(status="pending", model_name=model):
            break
        time.sleep(0.002)
        continue
    time.sleep(0.02)  # the work
    ledger.transition(row.request_id, "done", "processed")
    done.append(row.request_id)
    time.sleep(0.05)  # let the others at the next claim (a busy machine favours the last one)
print(json.dumps(done))
"""


def test_three_processes_process_each_request_exactly_once_in_order(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ledger = Ledger(url)
    ids = [f"req-{i}" for i in range(6)]
    for rid in ids:
        ledger.submit(_req(rid, f"s{rid}"), MODEL)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, MODEL, str(go), str(r)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready):  # all three connected, on the same start line
        assert time.monotonic() < deadline, "workers did not start"
        assert all(p.poll() is None for p in procs), "a worker exited before the start"
        time.sleep(0.01)
    go.touch()
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    processed = [rid for out in outputs for rid in out]
    assert sorted(processed) == ids  # each exactly once
    assert all(r.status == "done" for r in ledger.list())
    claims, finishes = [], []
    for rid in ids:
        events = ledger.events(rid)
        assert [(e.from_status, e.to_status) for e in events] == [
            (None, "pending"),
            ("pending", "processing"),
            ("processing", "done"),
        ]
        claims.append(events[1].at)
        finishes.append(events[2].at)
    # Strictly one at a time, in arrival order: each claim follows the previous finish.
    assert claims == sorted(claims)
    assert all(claims[i + 1] >= finishes[i] for i in range(len(ids) - 1))
    owners = {r.owner for r in ledger.list()}
    assert len(owners) >= 2, f"the workers did not contend (owners {owners})"
    ledger.close()


def test_ledger_tables_are_prefixed(ledger: Ledger) -> None:
    names = set(sa.inspect(ledger.engine).get_table_names())
    assert names == {
        "unlearnflow_requests",
        "unlearnflow_request_events",
        "unlearnflow_models",
        "unlearnflow_forgotten_ids",
        "unlearnflow_purges",
    }


def test_forgotten_index_is_idempotent_and_indexed(ledger: Ledger) -> None:
    at = "2026-01-01T00:00:00+00:00"
    assert ledger.record_forgotten("m", "r1", {"a": 0, "b": 1}, at) == 2
    assert ledger.record_forgotten("m", "r1", {"a": 0, "b": 1}, at) == 0  # a retry adds nothing
    assert ledger.record_forgotten("m", "r2", {"c": 2}, at) == 1
    assert [f.request_id for f in ledger.forgotten("m", "b")] == ["r1"]
    assert [f.sample_id for f in ledger.forgotten("m", request_id="r2")] == ["c"]
    assert ledger.forgotten("other", "a") == []
    p = ledger.record_purge("m", "local-weights", "artifacts/x.safetensors", "retention 30 days")
    assert ledger.purges("m") == [p]


@pytest.mark.cluster
def test_forgotten_index_and_purges_on_postgres(postgres_url: str) -> None:
    """The two lineage tables on the team set-up's database (PostgreSQL)."""
    led = Ledger(postgres_url)
    at = "2026-01-01T00:00:00+00:00"
    assert led.record_forgotten("pg-model", "r1", {"a": 0, "b": 1}, at) == 2
    assert led.record_forgotten("pg-model", "r1", {"a": 0, "b": 1}, at) == 0
    assert [f.request_id for f in led.forgotten("pg-model", "b")] == ["r1"]
    p = led.record_purge("pg-model", "local-weights", "x.safetensors", "retention 30 days")
    assert led.purges("pg-model")[-1] == p
    led.close()
