"""The deletion service's pure building blocks: lifecycle transitions, acceptance gates and
the append-only tombstone table (no stores, no servers)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_lib.schema import ConfigError, parse_section
from pipeline_lib.service.gates import GatesConfig, evaluate_gates
from pipeline_lib.service.lifecycle import (
    STATUSES,
    TERMINAL,
    InvalidTransition,
    Transition,
    allowed_targets,
    check_transition,
)
from pipeline_lib.service.tombstones import (
    SCHEMA,
    TombstoneError,
    append_tombstones,
    empty_tombstones,
    exclude,
    read_tombstones,
    tombstone_digest,
    tombstoned_ids,
    write_tombstones,
)

# ------------------------------------------------------------------------------ lifecycle

ALLOWED = {
    ("pending", "processing"),
    ("pending", "rejected"),
    ("processing", "done"),
    ("processing", "failed"),
    ("processing", "rejected"),
    ("processing", "needs-retrain"),
    ("failed", "pending"),
    ("needs-retrain", "done"),
}


def test_every_pair_of_states_follows_the_table() -> None:
    assert set(STATUSES) == {"pending", "processing", "done", "rejected", "failed", "needs-retrain"}
    for a in STATUSES:
        for b in STATUSES:
            if (a, b) in ALLOWED:
                check_transition(a, b, "req-1")
            else:
                with pytest.raises(
                    InvalidTransition, match=f"req-1: cannot go from '{a}' to '{b}'"
                ):
                    check_transition(a, b, "req-1")
    for state in TERMINAL:
        assert allowed_targets(state) == frozenset()


def test_refused_transition_lists_valid_targets_and_unknown_states_are_named() -> None:
    with pytest.raises(InvalidTransition, match="valid from 'pending': processing, rejected"):
        check_transition("pending", "done", "r")
    with pytest.raises(InvalidTransition, match="'done' is final"):
        check_transition("done", "pending", "r")
    with pytest.raises(ValueError, match="unknown request status 'finished'; valid: pending"):
        check_transition("processing", "finished")


def test_transition_record_is_checked_and_stamped_in_utc() -> None:
    t = Transition.make("req-1", "processing", "done", "unlearned; gates passed")
    assert (t.request_id, t.from_status, t.to_status) == ("req-1", "processing", "done")
    at = datetime.fromisoformat(t.at)
    assert at.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - at).total_seconds()) < 60
    assert Transition.make("req-1", None, "pending", "submitted").from_status is None
    with pytest.raises(InvalidTransition, match="starts as 'pending'"):
        Transition.make("req-1", None, "processing", "x")
    with pytest.raises(InvalidTransition):
        Transition.make("req-1", "done", "failed", "x")
    with pytest.raises(AttributeError):
        t.reason = "changed"  # type: ignore[misc]


# ------------------------------------------------------------------------------ gates

# Metrics as the evaluation step reports them: accuracies in percent, AUC in [0, 1].
PARENT = {"forget_acc": 99.0, "TA": 96.0, "loss_MIA_AUC": 0.71}


def test_gates_config_is_strict_frozen_and_range_checked() -> None:
    cfg = GatesConfig(max_forget_accuracy=0.5, mia_auc_band=(0.4, 0.6))
    assert cfg.fallback == "keep-parent" and cfg.max_test_accuracy_drop is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_forget_accuracy = 0.9  # type: ignore[misc]
    with pytest.raises(ConfigError, match="max_forget_acc"):
        GatesConfig(max_forget_acc=0.5)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"max_test_accuracy_drop: must be in \[0, 1\], got 2"):
        GatesConfig(max_test_accuracy_drop=2.0)
    with pytest.raises(ConfigError, match="max_forget_accuracy: must be in"):
        GatesConfig(max_forget_accuracy=-0.1)
    with pytest.raises(ConfigError, match="lower bound 0.7 is above upper bound 0.3"):
        GatesConfig(mia_auc_band=(0.7, 0.3))
    with pytest.raises(ConfigError, match="fallback"):
        GatesConfig(fallback="delete-everything")  # type: ignore[arg-type]
    assert parse_section(GatesConfig, {"fallback": "retrain"}).fallback == "retrain"
    assert not GatesConfig().configured and cfg.configured


def test_all_gates_pass_and_values_are_on_the_unit_scale() -> None:
    cfg = GatesConfig(max_forget_accuracy=0.5, max_test_accuracy_drop=0.02, mia_auc_band=(0.4, 0.6))
    res = evaluate_gates(cfg, {"forget_acc": 40.0, "TA": 95.0, "loss_MIA_AUC": 0.52}, PARENT)
    assert res.passed and not res.failures()
    by_name = {c.name: c for c in res.checks}
    assert by_name["forget_accuracy"].value == pytest.approx(0.40)
    assert by_name["test_accuracy_drop"].value == pytest.approx(0.01)
    assert by_name["test_accuracy_drop"].threshold == 0.02
    assert by_name["mia_auc_band"].threshold == (0.4, 0.6)
    assert "FAILED" not in res.summary()


def test_each_gate_fails_on_its_own_and_bounds_are_inclusive() -> None:
    cfg = GatesConfig(max_forget_accuracy=0.5, max_test_accuracy_drop=0.02, mia_auc_band=(0.4, 0.6))
    at_bounds = {"forget_acc": 50.0, "TA": 94.0, "loss_MIA_AUC": 0.6}
    assert evaluate_gates(cfg, at_bounds, PARENT).passed
    for key, bad, gate in (
        ("forget_acc", 51.0, "forget_accuracy"),
        ("TA", 93.0, "test_accuracy_drop"),
        ("loss_MIA_AUC", 0.61, "mia_auc_band"),
        ("loss_MIA_AUC", 0.39, "mia_auc_band"),
    ):
        res = evaluate_gates(cfg, {**at_bounds, key: bad}, PARENT)
        assert not res.passed
        assert [c.name for c in res.failures()] == [gate]
        assert res.failures()[0].reason
    assert evaluate_gates(cfg, at_bounds, PARENT).fallback == "keep-parent"


def test_missing_metric_fails_its_gate_instead_of_raising() -> None:
    cfg = GatesConfig(max_forget_accuracy=0.5, max_test_accuracy_drop=0.02)
    res = evaluate_gates(cfg, {"TA": 95.0}, {})
    assert not res.passed
    reasons = {c.name: c.reason for c in res.checks}
    assert reasons["forget_accuracy"] == "metric forget_acc missing"
    assert reasons["test_accuracy_drop"] == "metric TA missing (parent version)"
    assert all(c.value is None for c in res.checks)
    nan = evaluate_gates(cfg, {"forget_acc": float("nan"), "TA": 95.0}, PARENT)
    assert [c.name for c in nan.failures()] == ["forget_accuracy"]


def test_no_configured_gate_passes_and_unconfigured_metrics_are_ignored() -> None:
    res = evaluate_gates(GatesConfig(fallback="retrain"), {}, {})
    assert res.passed and res.checks == () and res.fallback == "retrain"
    assert res.summary() == "no gates configured"
    # Fractions instead of percent: accuracy_scale=1.
    res = evaluate_gates(GatesConfig(max_forget_accuracy=0.5), {"forget_acc": 0.3}, {}, 1.0)
    assert res.passed and res.checks[0].value == pytest.approx(0.3)


# ------------------------------------------------------------------------------ tombstones

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_append_is_append_only_and_keeps_the_first_entry() -> None:
    t1 = append_tombstones(empty_tombstones(), "req-a", ["s3", "s1", "s1"], T0)
    assert t1.schema == SCHEMA
    assert t1.column("sample_id").to_pylist() == ["s3", "s1"]
    later = T0 + timedelta(days=1)
    t2 = append_tombstones(t1, "req-b", ["s2", "s1"], later.isoformat())
    # The first rows are unchanged, in place; s1 keeps req-a and its time.
    assert t2.slice(0, t1.num_rows).equals(t1)
    rows = t2.to_pylist()
    assert [(r["sample_id"], r["request_id"]) for r in rows] == [
        ("s3", "req-a"),
        ("s1", "req-a"),
        ("s2", "req-b"),
    ]
    assert rows[1]["forgotten_at"] == T0 and rows[2]["forgotten_at"] == later
    # A retried request appends nothing; the input table is never mutated.
    assert append_tombstones(t2, "req-b", ["s2"], later).equals(t2)
    assert t1.num_rows == 2


def test_times_are_utc_and_naive_times_are_refused() -> None:
    plus2 = timezone(timedelta(hours=2))
    t = append_tombstones(empty_tombstones(), "r", ["x"], datetime(2026, 5, 1, 12, tzinfo=plus2))
    assert t.column("forgotten_at").to_pylist()[0] == datetime(2026, 5, 1, 10, tzinfo=UTC)
    with pytest.raises(TombstoneError, match="time zone"):
        append_tombstones(empty_tombstones(), "r", ["x"], datetime(2026, 5, 1))
    with pytest.raises(TombstoneError, match="time zone"):
        append_tombstones(empty_tombstones(), "r", ["x"], "2026-05-01T00:00:00")
    with pytest.raises(TombstoneError, match="not an ISO-8601 time"):
        append_tombstones(empty_tombstones(), "r", ["x"], "yesterday")
    with pytest.raises(TombstoneError, match="request_id"):
        append_tombstones(empty_tombstones(), "", ["x"], T0)


def test_exclude_and_ids() -> None:
    t = append_tombstones(empty_tombstones(), "req-a", ["s3", "s1"], T0)
    ids = np.array(["s0", "s1", "s2", "s3", "s4"])
    kept = exclude(ids, t)
    assert kept.tolist() == ["s0", "s2", "s4"] and kept.dtype.kind == "U"
    assert exclude(["s9", "s1"], t).tolist() == ["s9"]
    assert exclude(ids, empty_tombstones()).tolist() == ids.tolist()
    assert exclude([], t).tolist() == []
    got = tombstoned_ids(t)
    assert got.tolist() == ["s1", "s3"] and got.dtype.kind == "U"
    assert tombstoned_ids(empty_tombstones()).tolist() == []


def test_digest_names_the_set_of_ids_only() -> None:
    a = append_tombstones(empty_tombstones(), "req-a", ["s1", "s2"], T0)
    b = append_tombstones(
        append_tombstones(empty_tombstones(), "req-x", ["s2"], T0 + timedelta(hours=1)),
        "req-y",
        ["s1"],
        T0,
    )
    assert tombstone_digest(a) == tombstone_digest(b)
    c = append_tombstones(a, "req-c", ["s3"], T0)
    assert tombstone_digest(c) != tombstone_digest(a)
    # Stable across processes and releases: a fixed value for a fixed set.
    assert tombstone_digest(empty_tombstones()) == (
        "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"
    )
    # No id can run into the next.
    ab = append_tombstones(empty_tombstones(), "r", ["a\nb"], T0)
    a_b = append_tombstones(empty_tombstones(), "r", ["a", "b"], T0)
    assert tombstone_digest(ab) != tombstone_digest(a_b)


def test_write_read_round_trip_is_parquet_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "tombstones" / "tombstones.parquet"
    assert read_tombstones(path).num_rows == 0
    t = append_tombstones(empty_tombstones(), "req-a", ["s1", "s2"], T0)
    write_tombstones(t, path)
    assert path.read_bytes()[:4] == b"PAR1"  # Parquet, not a pickle
    back = read_tombstones(path)
    assert back.equals(t)
    t2 = append_tombstones(back, "req-b", ["s3"], T0)
    write_tombstones(t2, path)
    assert read_tombstones(path).num_rows == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["tombstones.parquet"]


def test_malformed_tombstone_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sample_id": ["s1"], "request": ["r"]}), bad)
    with pytest.raises(TombstoneError, match="missing \\['request_id', 'forgotten_at'\\]"):
        read_tombstones(bad)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(["s1", None], pa.string()),
                "request_id": ["r", "r"],
                "forgotten_at": pa.array([T0, T0], pa.timestamp("us", tz="UTC")),
            }
        ),
        nulls,
    )
    with pytest.raises(TombstoneError, match="sample_id has null values"):
        read_tombstones(nulls)
    with pytest.raises(TombstoneError, match="found a directory"):
        read_tombstones(tmp_path)
