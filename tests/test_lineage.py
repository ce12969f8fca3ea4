"""Lineage and audit evidence on real stores: three requests processed in sequence by the
deletion service (a real temporary Prefect API, SQLite MLflow with its registry, a real DVC
repo), then ``unlearn lineage request | sample | model`` answered from MLflow and the ledger
alone, the evidence and certificate on each run, and a retention purge searched for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import fresh_cli, make_dvc_project
from tests.test_flow import tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "lineage-digits"
REQUESTS = [
    {
        "request_id": f"req-lin-{i}",
        "reason": f"erasure {i}",
        "forget": {"fraction": 0.04, "seed": i},
    }
    for i in (1, 2, 3)
]


@pytest.fixture(scope="module")
def service(prefect_api, tmp_path_factory, one_thread) -> dict:
    from flows.cli import main
    from flows.service import sweep_flow

    root = tmp_path_factory.mktemp("lineage") / "proj"
    params = tiny_params(root)
    params["service"].update(
        model_name=MODEL,
        oracle="always",
        gates={
            "max_forget_accuracy": None,
            "max_test_accuracy_drop": None,
            "mia_auc_band": None,
            "fallback": "keep-parent",
        },
    )
    params["evaluate"]["report_dir"] = "reports"
    make_dvc_project(root, yaml.safe_dump(params))
    files = []
    for req in REQUESTS:
        path = root / "requests" / f"{req['request_id']}.yaml"
        path.write_text(yaml.safe_dump(req))
        files.append(str(path))
    params_path = str(root / "params.yaml")
    # the run artifacts inside the project (a new SQLite store's default is ./mlruns of the cwd)
    from mlflow import MlflowClient

    from tasks.tracking import EXPERIMENT_KIND

    MlflowClient(params["tracking"]["mlflow_uri"]).create_experiment(
        params["tracking"]["experiment"],
        artifact_location=(root / "mlartifacts").as_uri(),
        tags=EXPERIMENT_KIND,
    )
    assert main(["submit", *files, "--params", params_path]) == 0
    result = sweep_flow(params_path=params_path)
    assert [r["status"] for r in result["processed"]] == ["done"] * 3, result
    return {
        "root": root,
        "params": params_path,
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "result": result,
    }


def _ledger(service):
    from tasks.ledger import Ledger

    return Ledger(service["uri"])


def _cli_json(capsys, *argv) -> dict:
    from flows.cli import main

    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_runs_carry_durable_evidence(service):
    from mlflow import MlflowClient

    from pipeline_lib.data.requests import load_manifests
    from pipeline_lib.service.evidence import ids_digest
    from tasks.lineage import read_forget_ids

    client = MlflowClient(service["uri"])
    for r in service["result"]["processed"]:
        run = client.get_run(r["run_id"])
        tags = run.data.tags
        man = load_manifests(service["root"] / "runs" / "image" / r["request_id"] / "manifests")
        # the forgotten ids live on the run: no DVC cache needed to read them back
        ids = read_forget_ids(service["uri"], r["run_id"])
        assert sorted(ids) == sorted(man.forget_ids.tolist())
        assert tags["forget_ids.count"] == str(len(ids))
        assert tags["forget_ids.sha256"] == ids_digest(man.forget_ids)
        assert tags["retain_ids.sha256"] == ids_digest(man.retain_ids)
        evidence = {a.path for a in client.list_artifacts(r["run_id"], "evidence")}
        assert evidence == {
            "evidence/forget_ids.parquet",
            "evidence/request.json",
            "evidence/retain_ids.json",
        }
        assert tags["prefect.flow_run_id"]
        assert {a.path for a in client.list_artifacts(r["run_id"], "certificate")} == {
            "certificate/certificate.html"
        }
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_certificate_shows_mia_spread_and_klom_of_an_oracle_ensemble(service, tmp_path):
    """The certificate gives each MIA as mean ± std over its seeded draws, and, once
    `unlearn evaluate` compared the method against an oracle ensemble on the request, is
    rendered again (refresh_certificate, what flows/evaluate.py calls after logging its
    comparison) with the KLoM per split beside the oracle-vs-oracle noise floor and the
    ensemble's MIA mean ± std (found on MLflow by request and method), keeping the request's
    outcome, and logged to MLflow again. The comparison here is logged the way
    flows/evaluate.py logs one, from KLoM computed on margins drawn at random."""
    import re
    import shutil

    import mlflow.artifacts
    import numpy as np
    from mlflow import MlflowClient

    from pipeline_lib.evaluation.klom import klom_report, noise_floor
    from tasks.lineage import ORACLE_ROW, refresh_certificate
    from tasks.tracking import _experiment_id, create_run, end_run, log_comparison

    second = service["result"]["processed"][1]
    client = MlflowClient(service["uri"])
    run = client.get_run(second["run_id"])
    report = json.loads((Path(second["report_dir"]) / "report.json").read_text())
    mia = report["models"]["unlearned"]
    assert len(mia["MIA_efficacy_draws"]) > 1
    page = Path(run.data.tags["certificate.path"]).read_text()
    assert f"{mia['MIA_efficacy']:.4g} ± {mia['MIA_efficacy_std']:.4g}" in page
    assert f"mean ± std, {len(mia['MIA_efficacy_draws'])} seeds" in page
    assert "KLoM" not in page  # no ensemble yet

    rng = np.random.default_rng(0)
    n, t = 8, 60
    oracle = rng.normal(size=(n, t))
    unlearned = oracle + rng.normal(0.5, 1.0, size=(n, t))
    splits = {"forget": np.arange(20), "retain": np.arange(20, 40), "validation": np.arange(40, t)}
    klom = klom_report(unlearned, oracle, splits)
    floor = noise_floor(oracle, splits)
    tags = run.data.tags
    uri, exp = service["uri"], client.get_experiment(run.info.experiment_id).name
    parent = create_run(
        client,
        _experiment_id(client, exp),
        f"evaluate-{tags['request_id']}",
        {"kind": "evaluation", "dvc.manifests_md5": tags["dvc.manifests_md5"]},
    )
    row = {"method": tags["method"], "n_models": n, "mia_seeds": 3}
    row.update({f"klom_{s}_{k}": v for s, d in klom.items() for k, v in d.items()})
    oracle_row = {"method": ORACLE_ROW, "n_models": n, "mia_seeds": 3}
    for r in (row, oracle_row):
        for key in ("MIA_efficacy", "loss_MIA_AUC", "avg_gap"):
            r[key], r[f"{key}_std"] = rng.uniform(0.1, 0.9), rng.uniform(0.01, 0.05)
    rows = [row, oracle_row]
    log_comparison.fn(uri, exp, parent, rows, {}, floor, [], {"request_id": tags["request_id"]})
    end_run(uri, parent, "FINISHED")

    def outcome(text: str) -> list[str]:
        return re.findall(r"<tr><th>(?:status|outcome)</th><td>[^<]*</td></tr>", text)

    before = outcome(page)
    assert before and "done" in before[0]
    out = refresh_certificate(uri, tags["request_id"])
    assert out == Path(run.data.tags["certificate.path"])
    page = out.read_text()
    assert "KLoM against the oracle ensemble" in page
    for split in splits:
        assert f"{klom[split]['p95']:.4g}" in page and f"{floor[split]['p95']:.4g}" in page
    assert f"MLflow run {parent}" in page and "this request&#x27;s" in page
    assert "Membership inference over the ensemble" in page
    for r in rows:
        for key in ("MIA_efficacy", "loss_MIA_AUC", "avg_gap"):
            assert f"{r[key]:.4g} ± {r[f'{key}_std']:.4g}" in page
    assert f"mean ± std over {n} models × 3 seeded draws" in page
    assert outcome(page) == before  # the request's status and outcome are kept
    # logged to the run again: the copy on MLflow is the new page
    logged = mlflow.artifacts.download_artifacts(
        run_id=second["run_id"],
        artifact_path="certificate/certificate.html",
        dst_path=str(tmp_path),
        tracking_uri=uri,
    )
    assert Path(logged).read_text() == page
    assert refresh_certificate(uri, "no-such-request") is None

    # on a machine without the report folder: the report is downloaded from the run
    report_dir = Path(second["report_dir"])
    away = report_dir.with_name(report_dir.name + ".away")
    report_dir.rename(away)
    try:
        again = refresh_certificate(uri, tags["request_id"]).read_text()
        assert (report_dir / "report.json").read_bytes() == (away / "report.json").read_bytes()
        assert f"{mia['MIA_efficacy']:.4g} ± {mia['MIA_efficacy_std']:.4g}" in again
        assert "KLoM against the oracle ensemble" in again and "data:image/png;base64" in again
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)
        away.rename(report_dir)


def test_lineage_request(service, capsys):
    out = _cli_json(capsys, "lineage", "request", "req-lin-2", "--params", service["params"])
    assert out["status"] == "done"
    assert [e["to"] for e in out["history"]] == ["pending", "processing", "done"]
    assert out["parent_version"] == "2" and out["produced_version"] == "3"
    assert out["method"] == "fisher_diagonal" and out["method_params"]
    assert out["data_version"]["prepared_md5"] and out["data_version"]["manifests_md5"]
    assert out["tombstones"]["md5"] and int(out["tombstones"]["count"]) > int(
        out["forget_ids"]["count"]
    )
    assert len(out["forget_ids"]["sha256"]) == 64
    assert out["gates"]["passed"] == "true"
    assert "unlearned.TA" in out["metrics"] and "oracle.TA" in out["metrics"]
    assert out["prefect"]["flow_run_id"]
    assert Path(out["certificate"]["path"]).is_file()
    # the table output names the same facts
    from flows.cli import main

    assert main(["lineage", "request", "req-lin-2", "--params", service["params"]]) == 0
    text = capsys.readouterr().out
    assert "v2 -> v3" in text and out["forget_ids"]["sha256"] in text


def test_lineage_sample(service, capsys):
    from tasks.lineage import read_forget_ids

    second = service["result"]["processed"][1]
    sample = read_forget_ids(service["uri"], second["run_id"])[0]
    out = _cli_json(capsys, "lineage", "sample", sample, "--params", service["params"])
    assert [f["request_id"] for f in out["forgotten_by"]] == ["req-lin-2"]
    # v1 exact (trained with it), v2 unlearned req-lin-1 (still derived from v1: with),
    # v3 unlearned req-lin-2 (approximately removed), v4 descends from v3
    assert out["trained_with"] == ["1", "2"]
    assert out["unlearned_in"] == ["3", "4"]
    assert out["trained_without"] == []
    assert out["holding_artifacts"] == ["1", "2"]
    # a sample nobody forgot: every version holds it, none is reported as holding deleted data
    kept = _cli_json(capsys, "lineage", "sample", "no-such-id", "--params", service["params"])
    assert kept["forgotten_by"] == [] and kept["holding_artifacts"] == []
    # the CLI read the service's registry from MLflow's SQLite tables (tasks/mlflow_sqlite.py):
    # exactly what the MLflow client reads (versions with their run ids, sources, tags)
    from tasks import mlflow_sqlite
    from tasks.lineage import PRODUCTION_ALIAS, registry_view

    direct = mlflow_sqlite.read_registry(service["uri"], MODEL, PRODUCTION_ALIAS, {})
    assert direct is not None and len(direct[0]) == 4
    assert direct == registry_view(service["uri"], MODEL, via="client")


def test_lineage_model(service, capsys):
    out = _cli_json(
        capsys, "lineage", "model", f"{MODEL}@production", "--params", service["params"]
    )
    assert out["version"] == "4"
    assert [s["version"] for s in out["chain"]] == ["4", "3", "2", "1"]
    assert [s["kind"] for s in out["chain"]] == ["approximate"] * 3 + ["exact"]
    assert [list(s["requests"]) for s in out["chain"][:3]] == [
        ["req-lin-3"],
        ["req-lin-2"],
        ["req-lin-1"],
    ]
    assert all(s["data_version"] for s in out["chain"])
    v2 = _cli_json(capsys, "lineage", "model", f"{MODEL}@2", "--params", service["params"])
    assert [s["version"] for s in v2["chain"]] == ["2", "1"]


def test_reindex_from_the_tombstone_file_matches_the_index(service, tmp_path, capsys):
    """Requests processed before the forgotten-id index existed: `unlearn lineage reindex`
    rebuilds it from the tombstone file, the same rows as the sweep wrote."""
    from pipeline_lib.service.tombstones import read_tombstones
    from tasks.ledger import Ledger
    from tasks.lineage import reindex_forgotten

    tombs = read_tombstones(service["root"] / "runs" / "image" / MODEL / "tombstones.parquet")
    fresh = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert reindex_forgotten(fresh, MODEL, tombs) == tombs.num_rows
    assert reindex_forgotten(fresh, MODEL, tombs) == 0

    def key(rows):
        return sorted((f.sample_id, f.request_id, f.tombstone_index, f.at) for f in rows)

    assert key(fresh.forgotten(MODEL)) == key(_ledger(service).forgotten(MODEL))
    from flows.cli import main

    capsys.readouterr()
    assert main(["lineage", "reindex", "--params", service["params"]]) == 0
    assert "0 forgotten id(s) indexed" in capsys.readouterr().out  # the sweep indexed them all


def test_sweep_with_purge_inside_the_window_deletes_nothing(service, capsys):
    from flows.cli import main

    capsys.readouterr()
    assert main(["sweep", "--purge", "--params", service["params"]]) == 0
    out = capsys.readouterr().out
    assert f"{MODEL}: nothing pending" in out
    assert "forgotten more than 30 day(s) ago" in out and "nothing to delete" in out


def test_exact_version_after_tombstones_is_trained_without(service):
    """An exact version's tombstones_count decides: ids tombstoned before it are out."""
    from tasks.lineage import WITH, WITHOUT, version_states

    class V:
        def __init__(self, **tags):
            self.tags = tags

    versions = {
        "1": V(kind="exact", tombstones_count="0"),
        "2": V(kind="approximate", parent_version="1", request_ids="a"),
        "3": V(kind="exact", tombstones_count="10"),
        "4": V(kind="approximate", parent_version="3", request_ids="b"),
    }
    states = version_states(versions, forgotten_index=4, forgotten_by={"a"})
    assert states == {"1": WITH, "2": "unlearned", "3": WITHOUT, "4": WITHOUT}
    late = version_states(versions, forgotten_index=12, forgotten_by={"b"})
    assert late == {"1": WITH, "2": WITH, "3": WITH, "4": "unlearned"}


def _stores(service) -> list[Path]:
    """Every store the pipeline writes: the whole project (data/, artifacts/, runs/, reports/,
    .dvc/cache, the MLflow and ledger databases, mlartifacts/), the MLflow artifact roots
    and Prefect's result storage. The data source (the digits in the sklearn package) is
    outside them."""
    import os

    from mlflow import MlflowClient

    client = MlflowClient(service["uri"])
    roots = {
        Path(e.artifact_location.removeprefix("file://"))
        for e in client.search_experiments()
        if e.artifact_location.startswith(("file://", "/"))
    }
    return [service["root"], *roots, Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])]


def _patterns(row) -> list[bytes]:
    """How a feature vector may be stored: float32 and float64 bytes, JSON text."""
    import json as _json

    import numpy as np

    values = row.tolist()
    out = [
        np.asarray(row, "<f4").tobytes(),
        np.asarray(row, "<f8").tobytes(),
        _json.dumps(values).encode(),
        _json.dumps(values, separators=(",", ":")).encode(),
    ]
    if all(float(v).is_integer() for v in values):
        out.append(_json.dumps([int(v) for v in values]).encode())
    return out


def _files_holding_rows(stores: list[Path], rows: set[bytes]) -> set[Path]:
    """Files that contain one of ``rows`` (float32 feature vectors as bytes): Parquet files
    (the DVC cache stores them without extension) decoded column by column (every list
    column of the rows' width), anything else searched byte for byte in the forms of
    :func:`_patterns`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = len(next(iter(rows))) // 4
    patterns = [p for r in rows for p in _patterns(np.frombuffer(r, "<f4"))]
    found = set()
    seen = set()
    for store in stores:
        for path in (p for p in store.rglob("*") if p.is_file()):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            data = path.read_bytes()
            if data[:4] == b"PAR1":
                table = pq.read_table(path)
                for name in table.column_names:
                    col = table.column(name)
                    if not pa.types.is_list(col.type) and not pa.types.is_fixed_size_list(col.type):
                        continue
                    values = col.to_pylist()
                    if not values or len(values[0] or []) != width:
                        continue
                    feats = np.asarray(values, dtype=np.float32)
                    if any(r.tobytes() in rows for r in feats):
                        found.add(path)
            elif any(p in data for p in patterns):
                found.add(path)
    return found


def test_purge_leaves_no_forgotten_row_anywhere(service, capsys):
    """After the retention window: the data is re-versioned without the forgotten rows, and
    no store the pipeline writes holds one of them (prepared data, variants, DVC cache,
    artifacts, MLflow artifacts, Prefect results, reports, runs/); nothing trained with a
    forgotten id remains except the versions that unlearned it. A request after the purge
    runs on the new data version and brings no row back."""
    import subprocess
    import sys

    import numpy as np
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from flows.cli import main
    from tasks.lineage import sample_lineage
    from tasks.retention import _weights_digest
    from tasks.versioning import _dvc_env

    root, params_path = service["root"], service["params"]
    ledger = _ledger(service)
    forgotten = ledger.forgotten(MODEL)
    ids = {f.sample_id for f in forgotten}
    table = pq.read_table(root / "data" / "prepared" / "samples.parquet")
    feats = np.asarray(table.column("features").to_pylist(), dtype=np.float32)
    sid = table.column("sample_id").to_pylist()
    kept_rows = {feats[i].tobytes() for i, s in enumerate(sid) if s not in ids}
    rows = {feats[i].tobytes() for i, s in enumerate(sid) if s in ids} - kept_rows
    assert len(rows) >= len(ids) - 2  # digits has (almost) no duplicate images

    # the data is prepared again (fewer test rows): the version the runs used goes stale,
    # and a variant of other settings holds the rows as well
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["max_test"] = 100
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "-q", "prepare"],
        cwd=root,
        check=True,
        env=_dvc_env(),
    )
    before = _files_holding_rows(_stores(service), rows)
    live_ws = root / "data" / "prepared" / "samples.parquet"
    assert live_ws in before and len(before) >= 3  # live copy, live cache entry, stale entry

    # nothing is due inside the window
    assert main(["purge", "--params", params_path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == []
    assert main(["purge", "--older-than", "0", "--dry-run", "--params", params_path]) == 0
    assert "would write prepared-data" in capsys.readouterr().out
    assert _files_holding_rows(_stores(service), rows) == before  # a dry run deletes nothing

    assert main(["purge", "--older-than", "0", "--params", params_path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    kinds = {d["kind"] for d in out["deleted"]}
    assert {
        "registry-version",
        "mlflow-artifact",
        "local-weights",
        "prepared-data",
        "data-copy",
        "dvc-cache",
    } <= kinds
    purged = sorted(
        d["target"].split()[1] for d in out["deleted"] if d["kind"] == "registry-version"
    )
    assert purged == ["v1", "v2", "v3"]  # v4 is production; it unlearned every request
    new_data = out["prepared"]
    assert new_data["purged_ids"] == len(ids) and new_data["path"].startswith("runs/image/data-")
    meta = json.loads((root / new_data["path"] / "meta.json").read_text())
    assert meta["n_purged"] == len(ids) and meta["n_test"] == 100

    # lineage: no artifact still holds a forgotten id; each purge is recorded
    for f in forgotten[:: max(1, len(forgotten) // 5)]:
        assert sample_lineage(service["uri"], ledger, MODEL, f.sample_id)["holding_artifacts"] == []
    purges = ledger.purges(MODEL)
    assert len(purges) == len(out["deleted"]) and all(
        "retention 0 days" in p.reason for p in purges
    )
    assert any(p.kind == "prepared-data" and new_data["md5"] in p.target for p in purges)
    assert main(["lineage", "model", f"{MODEL}@production", "--params", params_path]) == 0
    assert capsys.readouterr().out.count("[weights purged") == 3  # v3, v2, v1 of the chain

    # no forgotten row in any store, and no weights of the purged versions
    assert _files_holding_rows(_stores(service), rows) == set()
    client = MlflowClient(service["uri"], registry_uri=service["uri"])
    gone = {client.get_model_version(MODEL, v).tags["state_digest"] for v in ("1", "2", "3")}
    for store in _stores(service):
        for path in store.rglob("*.safetensors"):
            assert _weights_digest(path) not in gone, path

    # a later request runs on the purged data version and brings no row back
    req = {
        "request_id": "req-lin-4",
        "reason": "after the purge",
        "forget": {"fraction": 0.04, "seed": 4},
    }
    (root / "requests" / "req-lin-4.yaml").write_text(yaml.safe_dump(req))
    assert main(["submit", str(root / "requests" / "req-lin-4.yaml"), "--params", params_path]) == 0
    assert main(["sweep", "--params", params_path]) == 0
    assert "req-lin-4: done (v4 -> v5)" in capsys.readouterr().out
    run = client.get_run(ledger.get("req-lin-4").mlflow_run_id)
    assert run.data.tags["dvc.prepared_md5"] == new_data["md5"]
    assert _files_holding_rows(_stores(service), rows) == set()
    # its ids are purged in turn: the purge list grows, the data is prepared again
    assert main(["purge", "--older-than", "0", "--params", params_path, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["prepared"]["purged_ids"] == len(ledger.forgotten(MODEL)) > len(ids)
    assert again["prepared"]["path"] == new_data["path"]


def test_ui_url_opens_the_model_training_view():
    """MLflow 3.17's UI picks its view from the URL parameter workflowType (or the browser's
    stored choice), not from the experiment tag: every link carries the parameter."""
    import glob
    import re

    import mlflow

    from tasks.lineage import UI_VIEW, ui_command, ui_url

    assert (
        ui_url("http://mlflow:5000/", "3", "abc")
        == "http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert ui_url("sqlite:///mlflow.db", "3") == (
        "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    )
    assert ui_command("sqlite:///mlflow.db") == "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    assert ui_command("https://mlflow.example") is None
    # the installed UI reads the parameter by that name and knows that value
    bundle = glob.glob(
        str(
            Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js" / "main.*.js"
        )
    )
    if bundle:
        text = Path(bundle[0]).read_text(errors="ignore")
        name, value = UI_VIEW.split("=")
        assert f'get("{name}")' in text and re.search(rf'"{value}"', text)


def test_light_settings_match_the_full_params(tmp_path):
    """`unlearn lineage` reads the tracking URI and the service section without composing
    Params: the same values as load_params, the same refusals."""
    from pipeline_lib.config import ConfigError, environment_overrides, load_params
    from pipeline_lib.service.settings import read_service_settings
    from tests.conftest import REPO

    for env in ({}, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"}):
        for text in ((REPO / "params.yaml").read_text(), "data: {name: digits}\n"):
            path = tmp_path / "p.yaml"
            path.write_text(text)
            full = load_params(path, environment_overrides(env))
            light = read_service_settings(path, env)
            assert light.mlflow_uri == full.tracking.mlflow_uri
            assert light.service == full.service
    path.write_text("service: {model_name: m, no_such_key: 1}\n")
    with pytest.raises(ConfigError, match="service.no_such_key"):
        read_service_settings(path, {})


def test_lineage_cli_imports_neither_torch_nor_prefect(tmp_path):
    """A fresh `unlearn lineage` process loads the MLflow client and SQLAlchemy only."""

    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                "service": {"model_name": "no-such-model"},
            }
        )
    )
    proc, flags = fresh_cli(
        ["lineage", "sample", "x", "--params", str(params)], ("torch", "prefect", "mlflow")
    )
    # no such registered model: refused with exit 2, after the stores were opened
    assert flags == [2, False, False, True], proc.stderr[-2000:]
    assert "no-such-model" in proc.stderr


# --------------------------------------------- the registry read from MLflow's SQLite tables

SMALL = {"n_requests": 24, "n_ids": 3, "retrain_every": 8}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    """A small generated history (benchmarks/lineage_query.py's generator: ledger rows, the
    forgotten-id index, a chain of registered versions with exact retrains), written by
    MLflow itself into a SQLite store; then one version deleted and a second alias set, so
    the reader has to leave out what MLflow's search leaves out."""
    from mlflow import MlflowClient

    from benchmarks.lineage_query import MODEL, generate

    root = tmp_path_factory.mktemp("lineage-sqlite")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    generate(uri, **SMALL)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.delete_model_version(MODEL, "5")
    client.set_registered_model_alias(MODEL, "staging", "7")
    client.set_model_version_tag(MODEL, "7", "note", "")
    params = root / "params.yaml"
    params.write_text(
        yaml.safe_dump({"tracking": {"mlflow_uri": uri}, "service": {"model_name": MODEL}})
    )
    return {"root": root, "uri": uri, "model": MODEL, "params": str(params)}


def _samples(n_requests: int, n_ids: int, **_) -> list[str]:
    return [f"digits-{i:06d}" for i in (1, (n_requests // 2) * n_ids + 2, n_requests * n_ids - 1)]


def test_sqlite_reader_answers_as_the_mlflow_client_without_writing(generated):
    """tasks/mlflow_sqlite.py reads exactly the versions, tags, times, run ids, sources and
    production alias the MLflow client returns, on a registry the installed MLflow wrote
    (so an MLflow upgrade to an unverified schema revision fails here); whole sample answers
    agree; the database file is not touched (same bytes, same mtime, no journal left)."""
    import hashlib

    from tasks import mlflow_sqlite
    from tasks.ledger import Ledger
    from tasks.lineage import PRODUCTION_ALIAS, registry_view, sample_lineage

    uri, model = generated["uri"], generated["model"]
    db = generated["root"] / "mlflow.db"
    before = (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns)
    direct = mlflow_sqlite.read_registry(uri, model, PRODUCTION_ALIAS, {})
    assert direct is not None, "the installed MLflow's schema revision is not verified"
    client = registry_view(uri, model, via="client")
    assert direct == client
    versions, production = direct
    n = SMALL["n_requests"] + 1 + (SMALL["n_requests"] - 1) // SMALL["retrain_every"]
    assert "5" not in versions and len(versions) == n - 1
    assert production == str(n) and versions["7"].tags["note"] == ""
    assert mlflow_sqlite.read_registry(uri, model, "staging", {})[1] == "7"
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns) == before
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith("mlflow.db")) == [
        "mlflow.db"
    ]
    ledger = Ledger(uri)
    try:
        for sample in [*_samples(**SMALL), "digits-999999"]:
            assert sample_lineage(uri, ledger, model, sample) == sample_lineage(
                uri, ledger, model, sample, via="client"
            )
    finally:
        ledger.close()


def test_sqlite_reader_declines_what_it_has_not_verified(generated, tmp_path):
    """Another schema revision, workspaces on, a model in another workspace, an unknown
    model, a URI with options or in memory, a file that is not a database: ``None`` (the
    caller asks the MLflow client), never a guess."""
    import shutil
    import sqlite3

    from tasks import mlflow_sqlite

    uri, model = generated["uri"], generated["model"]
    read = mlflow_sqlite.read_registry
    assert read(uri, model, "production", {"MLFLOW_ENABLE_WORKSPACES": "true"}) is None
    assert read(uri, "no-such-model", "production", {}) is None
    assert read(f"{uri}?timeout=5", model, "production", {}) is None
    assert read("sqlite:///:memory:", model, "production", {}) is None
    assert read(f"sqlite:///{tmp_path / 'absent.db'}", model, "production", {}) is None
    assert not (tmp_path / "absent.db").exists()
    (tmp_path / "junk.db").write_text("not a database")
    assert read(f"sqlite:///{tmp_path / 'junk.db'}", model, "production", {}) is None

    def altered(name: str, sql: str) -> str:
        copy = tmp_path / name
        shutil.copy(generated["root"] / "mlflow.db", copy)
        with sqlite3.connect(copy) as conn:
            conn.execute(sql)
        conn.close()
        return f"sqlite:///{copy}"

    assert (
        read(
            altered("a.db", "UPDATE alembic_version SET version_num = 'ffffffffffff'"),
            model,
            "production",
            {},
        )
        is None
    )
    other = altered("b.db", "INSERT INTO registered_models (name, workspace) VALUES ('m', 'ws')")
    assert read(other, model, "production", {}) is None


def test_fresh_lineage_sample_on_sqlite_does_not_import_mlflow(generated):
    """A fresh `unlearn lineage sample` process on the SQLite store answers from MLflow's
    tables without importing MLflow (nor torch, nor Prefect), with the client's answer."""

    from tasks.ledger import Ledger
    from tasks.lineage import sample_lineage

    sample = _samples(**SMALL)[1]
    proc, flags = fresh_cli(
        ["lineage", "sample", sample, "--json", "--params", generated["params"]],
        ("torch", "prefect", "mlflow"),
    )
    assert flags == [0, False, False, False], proc.stderr[-2000:]
    ledger = Ledger(generated["uri"])
    try:
        expected = sample_lineage(
            generated["uri"], ledger, generated["model"], sample, via="client"
        )
    finally:
        ledger.close()
    assert json.loads(proc.stdout) == json.loads(json.dumps(expected, default=str))
    assert expected["forgotten_by"] and expected["trained_with"] and expected["unlearned_in"]
