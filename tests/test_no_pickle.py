"""No pickle anywhere we load (issue 14, item 7): Prefect result records of the cached tasks are
JSON, a record edited to name another serializer is refused and the task recomputes (the
payload is never decoded), and failed runs leave no pickled exception behind."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.results import READABLE_TYPES, STRICT_TYPE, RefusedRecord, check_record

REPO = Path(__file__).resolve().parents[1]
MARKER_ENV = "UNLEARNFLOW_TEST_MARKER"


class _Payload:
    """Unpickling this creates the file it names."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def touch_marker(obj: dict) -> dict:
    """An object hook a tampered ``json`` record names: leaves a marker when called."""
    Path(os.environ[MARKER_ENV]).write_text("called")
    return obj


def results_dir() -> Path:
    return Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])


def records_of(token: str) -> tuple[Path, Path]:
    """(cache record naming the serializer, result file) of the cached result holding
    ``token``."""
    hits = [p for p in results_dir().rglob("*") if p.is_file() and token in p.read_text()]
    assert len(hits) == 1, hits
    meta = results_dir() / "cache-keys" / hits[0].name
    assert json.loads(meta.read_text())["storage_key"] == str(hits[0])
    return meta, hits[0]


def serializer_of(record: object) -> str | None:
    """The serializer type a JSON file names (a record, or its metadata), or None."""
    if not isinstance(record, dict):
        return None
    meta = record["metadata"] if isinstance(record.get("metadata"), dict) else record
    kind = meta.get("serializer")
    return kind.get("type") if isinstance(kind, dict) else kind


def test_check_record_accepts_json_only():
    good = {"metadata": {"serializer": {"type": STRICT_TYPE}}, "result": "{}"}
    assert json.loads(check_record(json.dumps(good).encode())) == good
    prefect_json = {
        "metadata": {
            "serializer": {"type": "json", "object_decoder": "builtins.exec", "jsonlib": "x"}
        },
        "result": "{}",
    }
    out = json.loads(check_record(json.dumps(prefect_json).encode()))
    assert out["metadata"]["serializer"] == {"type": STRICT_TYPE}  # decoder and library dropped
    for kind in ("pickle", "compressed/pickle", "my.module.Serializer", None):
        bad = {"metadata": {"serializer": {"type": kind}}, "result": "gASVAAAA"}
        with pytest.raises(RefusedRecord, match="refused"):
            check_record(json.dumps(bad).encode())
    with pytest.raises(RefusedRecord, match="not a JSON result record"):
        check_record(pickle.dumps({"a": 1}))
    assert set(READABLE_TYPES) == {STRICT_TYPE, "json"}


def test_a_record_naming_pickle_is_refused_and_the_task_recomputes(prefect_api, tmp_path):
    from prefect import flow, task
    from prefect.serializers import PickleSerializer

    from tasks import compute
    from tasks.compute import CACHED

    calls, marker = tmp_path / "calls", tmp_path / "unpickled"
    token = f"token-{tmp_path.name}"

    # the payload is live: Prefect's pickle serializer would create the marker
    control = tmp_path / "control"
    payload = base64.encodebytes(pickle.dumps(_Payload(control))).decode()
    PickleSerializer(picklelib="pickle").loads(payload.encode())
    assert control.exists()
    payload = base64.encodebytes(pickle.dumps(_Payload(marker))).decode()

    @task(name="no-pickle-step", **CACHED)
    def step(value: str) -> dict:
        with calls.open("a") as fh:
            fh.write("x")
        return {"value": value}

    @flow(name="no-pickle-flow")
    def run(value: str) -> dict:
        return step(value)

    assert compute.train_model.result_serializer is CACHED["result_serializer"]
    assert compute.train_model.cache_policy.key_storage is CACHED["cache_policy"].key_storage
    assert run(token) == {"value": token} and calls.read_text() == "x"
    meta_path, result_path = records_of(token)
    assert serializer_of(json.loads(meta_path.read_text())) == STRICT_TYPE
    assert run(token) == {"value": token} and calls.read_text() == "x"  # a cache hit

    meta = json.loads(meta_path.read_text())
    meta["serializer"] = {"type": "pickle", "picklelib": "pickle"}
    meta_path.write_text(json.dumps(meta))
    result_path.write_text(payload)
    assert run(token) == {"value": token}
    assert not marker.exists()  # never unpickled
    assert calls.read_text() == "xx"  # recomputed
    assert serializer_of(json.loads(meta_path.read_text())) == STRICT_TYPE
    assert json.loads(result_path.read_text()) == {"value": token}

    # a JSON record whose result file was replaced by a pickle: refused, recomputed
    result_path.write_bytes(pickle.dumps(_Payload(marker)))
    assert run(token) == {"value": token}
    assert not marker.exists() and calls.read_text() == "xxx"


def test_a_json_record_naming_a_decoder_runs_no_code(prefect_api, tmp_path, monkeypatch):
    from prefect import flow, task

    from tasks.compute import CACHED

    marker = tmp_path / "decoder-called"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    token = f"token-{tmp_path.name}"

    calls = tmp_path / "calls"

    @task(name="no-decoder-step", **CACHED)
    def step(value: str) -> dict:
        with calls.open("a") as fh:
            fh.write("x")
        return {"value": value}

    @flow(name="no-decoder-flow")
    def run(value: str) -> dict:
        return step(value)

    run(token)
    meta_path, _ = records_of(token)
    meta = json.loads(meta_path.read_text())
    meta["serializer"] = {"type": "json", "object_decoder": f"{__name__}.touch_marker"}
    meta_path.write_text(json.dumps(meta))
    assert run(token) == {"value": token}
    assert not marker.exists() and calls.read_text() == "x"  # a cache hit, decoded strictly


def test_failed_tasks_and_flows_persist_no_pickles(prefect_api, tmp_path):
    from prefect import flow, task

    from tasks.compute import CACHED

    @task(name="failing-step", **CACHED)
    def step(value: str) -> dict:
        raise ValueError(f"refused {value}")

    @flow(name="failing-flow")
    def run(value: str) -> dict:
        return step(value)

    before = {p for p in results_dir().rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="refused"):
        run(tmp_path.name)
    written = [p for p in results_dir().rglob("*") if p.is_file() and p not in before]
    assert written, "the failure wrote no record at all: nothing was checked"
    for path in sorted(results_dir().rglob("*")):
        if path.is_file():
            record = json.loads(path.read_bytes())  # not a pickle: JSON
            assert serializer_of(record) in (*READABLE_TYPES, None), path


def test_the_cli_sets_json_as_prefects_default_serializer():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_RESULTS")}
    code = (
        "from flows.cli import _setup_env; _setup_env()\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().results.default_serializer)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "json"


def test_every_persisted_task_reads_its_records_as_json_only(tmp_path):
    """The tasks whose results are read back as a cache: strict JSON results, records under the
    JSON-only key storage (a plain cache_key_fn= would give them Prefect's own storage)."""
    import numpy as np

    from flows.service import process_request_task
    from pipeline_lib.data.requests import parse_request, write_manifests
    from tasks import compute
    from tasks.results import RECORD_STORAGE, STRICT_JSON
    from tasks.service import oracle_task

    req = parse_request({"request_id": "r1", "reason": "x", "forget": {"sample_ids": ["a"]}})
    meta = {"content_hash": "h", "dataset": "d"}
    write_manifests(tmp_path / "man", req, np.array(["a"]), np.array(["z"]), meta)
    data = {"prepared_dir": "p", "prepared_md5": "m", "manifests_dir": str(tmp_path / "man")}
    oracle = oracle_task(tmp_path, "tombstones.parquet", data)
    tasks = [compute.train_model, compute.unlearn, process_request_task, oracle]
    tasks.append(compute.train_model.with_options(refresh_cache=True))  # with_files' retry
    for t in tasks:
        assert t.persist_result is True, t.name
        assert t.result_serializer is STRICT_JSON, t.name
        assert t.cache_policy.key_storage is RECORD_STORAGE, t.name
