"""The deletion service end to end on real components (issue 12, "Done when"): a temporary
Prefect API (the session's ``prefect_api``), MLflow on SQLite with its Model Registry, the
request ledger in the same SQLite file, and a real DVC repo, all in temporary directories.

Most tests share one project (module scope) and build on each other's state in file order:
three requests in one sweep (v1 exact, v2 -> v3 -> v4 approximate), then resubmissions, a
sweep with nothing pending, a sweep while another holds the model, failing requests, the
gates and their fallbacks. The others each make their own project: ``unlearn run`` twice on
a fresh one, three concurrent ``unlearn sweep`` processes (slow), and the language-model
pipeline. Three sweeps against the PostgreSQL-backed tracking server are in
tests/test_team_setup.py (cluster, slow), with this module's helpers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, make_dvc_project
from tests.test_flow import tiny_params
from tests.test_lm_flow import REQUEST as LM_REQUEST
from tests.test_lm_flow import lm_project  # noqa: F401  (a fixture, used by test_lm_request)

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "unlearnflow-service-test"
NO_GATES = {
    "max_forget_accuracy": None,
    "max_test_accuracy_drop": None,
    "mia_auc_band": None,
    "fallback": "keep-parent",
}
#: A gate no unlearned model here passes (it would have to get every forget sample wrong).
# gates no model passes: forget accuracy 0 alone is reachable (fisher_diagonal can forget a
# small request entirely), a loss-MIA AUC of exactly 0 with it is not
IMPOSSIBLE = {"service.gates.max_forget_accuracy": 0.0, "service.gates.mia_auc_band": [0.0, 0.0]}


def service_params(root: Path, model: str = MODEL) -> dict[str, Any]:
    """tests/test_flow.py's tiny digits project, run as a service: no oracle, no gates."""
    params = tiny_params(root)
    params["train"].update(epochs=2)
    params["tracking"]["experiment"] = "service-test"
    params["service"].update(
        model_name=model, ledger_url=None, oracle="never", gates=dict(NO_GATES)
    )
    return params


def cli(*argv: str) -> tuple[int, str, str]:
    """``unlearn ARGV...`` in this process: exit code, stdout, stderr."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def dvc_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@dataclass
class Project:
    root: Path
    model: str = MODEL
    modality: str = "image"
    params_file: str = "params.yaml"
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: MLflow tracking URI and ledger URL; None: the project's SQLite file for both
    tracking_uri: str | None = None
    ledger_url: str | None = None
    experiment: str = "service-test"

    @property
    def params(self) -> str:
        return str(self.root / self.params_file)

    @property
    def uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def tomb_rel(self) -> str:
        return f"runs/{self.modality}/{self.model}/tombstones.parquet"

    def write_request(self, rid: str, forget: dict[str, Any], name: str | None = None) -> str:
        content = {"request_id": rid, "reason": f"erasure test {rid}", "forget": forget}
        self.requests.setdefault(rid, content)
        path = self.root / "requests" / f"{name or rid}.yaml"
        path.write_text(yaml.safe_dump(content, sort_keys=False))
        return str(path)

    def ledger(self):
        from tasks.ledger import Ledger

        return Ledger(self.ledger_url or self.uri)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def versions(self) -> dict[str, Any]:
        found = self.client().search_model_versions(f"name = '{self.model}'")
        return {str(mv.version): mv for mv in found}

    def production(self) -> str:
        from tasks.registry import production_version

        mv = production_version(self.uri, self.model)
        assert mv is not None
        return str(mv.version)

    def runs(self, request_id: str | None = None) -> list[Any]:
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        where = f"tags.request_id = '{request_id}'" if request_id else ""
        return client.search_runs([exp.experiment_id], filter_string=where, max_results=1000)

    def manifests(self, rid: str) -> tuple[set[str], set[str], dict[str, Any]]:
        d = self.root / "runs" / self.modality / rid / "manifests"
        ids = lambda n: set(pq.read_table(d / n).column("sample_id").to_pylist())  # noqa: E731
        return (
            ids("forget_ids.parquet"),
            ids("retain_ids.parquet"),
            json.loads((d / "request.json").read_text()),
        )

    def tombstones(self) -> dict[str, str]:
        """sample id -> the request that forgot it."""
        table = pq.read_table(self.root / self.tomb_rel)
        return dict(
            zip(
                table.column("sample_id").to_pylist(),
                table.column("request_id").to_pylist(),
                strict=True,
            )
        )

    def tombstones_md5(self) -> str:
        meta = yaml.safe_load((self.root / f"{self.tomb_rel}.dvc").read_text())
        return str(meta["outs"][0]["md5"])

    def train_ids(self) -> set[str]:
        from pipeline_lib.data.images import load_prepared

        return set(load_prepared(self.root / "data" / "prepared").split_ids("train").tolist())

    def resolve(self, rid: str) -> set[str]:
        """The ids the request names in the prepared data (before any tombstone)."""
        from pipeline_lib.data.images import load_prepared
        from pipeline_lib.data.requests import extract_forget_set, parse_request

        data = load_prepared(self.root / "data" / "prepared")
        forget, _ = extract_forget_set(parse_request(self.requests[rid]), data)
        return set(forget.tolist())


def new_project(
    root: Path,
    model: str = MODEL,
    tracking_uri: str | None = None,
    ledger_url: str | None = None,
    experiment: str = "service-test",
) -> Project:
    """A fresh tiny digits project; MLflow and the ledger in its SQLite file unless given."""
    params = service_params(root, model)
    params["tracking"]["experiment"] = experiment
    if tracking_uri:
        params["tracking"]["mlflow_uri"] = tracking_uri
    params["service"]["ledger_url"] = ledger_url
    make_dvc_project(root, yaml.safe_dump(params))
    return Project(
        root, model, tracking_uri=tracking_uri, ledger_url=ledger_url, experiment=experiment
    )


def prepare(project: Project) -> None:
    """``dvc repro prepare`` by hand (the sweep finds it up to date), so that a test can name
    the ids of the prepared data in its requests."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "prepare"],
        cwd=project.root,
        env=dvc_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def dvc_cached_ids(project: Project, md5: str) -> set[str]:
    """The tombstoned ids of the tombstone file version ``md5`` in the DVC cache."""
    path = project.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    assert path.is_file(), f"tombstone version {md5} is not in the DVC cache"
    return set(pq.read_table(path).column("sample_id").to_pylist())


def assert_events(project: Project, rid: str, *expected: tuple[str | None, str, str]) -> None:
    """The request's history is exactly these (from, to, reason substring) transitions."""
    ledger = project.ledger()
    events = ledger.events(rid)
    ledger.close()
    got = [(e.from_status, e.to_status) for e in events]
    assert got == [(f, t) for f, t, _ in expected], got
    for e, (_, _, reason) in zip(events, expected, strict=True):
        assert reason in e.reason, (rid, e.reason)


# ------------------------------------------------------------------ the shared project


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, prefect_api) -> Project:
    return new_project(tmp_path_factory.mktemp("service") / "proj")


@dataclass
class Sweep:
    project: Project
    ids: list[str]
    result: dict[str, Any]
    seconds: float


@pytest.fixture(scope="module")
def three(svc: Project) -> Sweep:
    """Requests A, B, C submitted through the CLI, then one sweep. B names five of A's forget
    ids and five others; C a whole class (which A's random ids touch too)."""
    prepare(svc)
    from pipeline_lib.data.images import load_prepared
    from pipeline_lib.data.requests import extract_forget_set, parse_request

    a = svc.write_request("svc-a", {"fraction": 0.1, "seed": 3})
    a_forget, a_retain = extract_forget_set(
        parse_request(svc.requests["svc-a"]), load_prepared(svc.root / "data" / "prepared")
    )
    named = [str(s) for s in (*a_forget[:5], *a_retain[:5])]
    b = svc.write_request("svc-b", {"sample_ids": sorted(named)})
    c = svc.write_request("svc-c", {"classes": [3]})
    rc, out, err = cli("submit", "--params", svc.params, a, b, c)
    assert rc == 0, err
    assert out.splitlines() == [f"svc-{x}: pending (submitted)" for x in "abc"]

    from flows.service import sweep_flow

    t0 = time.perf_counter()
    result = sweep_flow(params_path=svc.params)
    return Sweep(svc, ["svc-a", "svc-b", "svc-c"], result, time.perf_counter() - t0)


def test_three_requests_chain_versions_from_the_first_exact_one(three: Sweep) -> None:
    from tasks.registry import version_chain

    p = three.project
    processed = [
        (r["request_id"], r["status"], r["parent_version"], r["produced_version"])
        for r in three.result["processed"]
    ]
    assert processed == [
        ("svc-a", "done", "1", "2"),
        ("svc-b", "done", "2", "3"),
        ("svc-c", "done", "3", "4"),
    ]
    versions = p.versions()
    assert sorted(versions, key=int) == ["1", "2", "3", "4"]
    v1 = versions["1"]
    assert v1.tags["kind"] == "exact" and "parent_version" not in v1.tags
    assert v1.tags["tombstones_count"] == "0"
    for n, rid in zip(("2", "3", "4"), three.ids, strict=True):
        tags = versions[n].tags
        assert tags["kind"] == "approximate"
        assert tags["parent_version"] == str(int(n) - 1)
        assert tags["request_ids"] == rid
        assert tags["method"] == "fisher_diagonal"
    assert p.production() == "4"
    chain = version_chain(p.uri, p.model, "4")
    assert [str(mv.version) for mv in chain] == ["4", "3", "2", "1"]
    assert chain[-1].tags["kind"] == "exact"

    # the ledger: each done once, with its run and versions; one FINISHED MLflow run each,
    # and the version was registered from that run
    ledger = p.ledger()
    rows = {r.request_id: r for r in ledger.list(model_name=p.model)}
    ledger.close()
    for n, rid in zip(("2", "3", "4"), three.ids, strict=True):
        row = rows[rid]
        assert (row.status, row.parent_version, row.produced_version) == (
            "done",
            str(int(n) - 1),
            n,
        )
        (run,) = p.runs(rid)
        assert run.info.run_id == row.mlflow_run_id == versions[n].run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["service.parent_version"] == str(int(n) - 1)
        assert run.data.tags["service.produced_version"] == n
        assert run.data.tags["service.gates_passed"] == "true"
        assert_events(
            p,
            rid,
            (None, "pending", "submitted"),
            ("pending", "processing", "claimed by"),
            ("processing", "done", "gates passed"),
        )


def test_later_retain_sets_exclude_earlier_tombstones(three: Sweep) -> None:
    p = three.project
    train = p.train_ids()
    forgotten: set[str] = set()  # tombstoned before the request
    tombs = p.tombstones()
    for rid in three.ids:
        forget, retain, summary = p.manifests(rid)
        named = p.resolve(rid)
        # The request forgets what it names less what is gone already; its retain set is the
        # training data less its own forget set and every earlier tombstone.
        assert forget == named - forgotten and forget
        assert not retain & forgotten
        assert retain == train - forget - forgotten
        assert summary.get("n_already_forgotten", 0) == len(named & forgotten)
        # its rows of the tombstone file are exactly its forget set
        assert {s for s, r in tombs.items() if r == rid} == forget
        forgotten |= forget
    # not vacuous: B named five of A's ids, and class 3 overlaps A's random ids
    assert p.manifests("svc-b")[2]["n_already_forgotten"] == 5
    assert p.manifests("svc-c")[2]["n_already_forgotten"] > 0
    assert set(tombs) == forgotten

    # The tombstone file is DVC-versioned: its .dvc md5 is the file's, and each request's run
    # names the version it appended (in the DVC cache: every id forgotten up to it).
    data = (p.root / p.tomb_rel).read_bytes()
    assert p.tombstones_md5() == hashlib.md5(data).hexdigest()
    upto: set[str] = set()
    md5s = []
    for rid in three.ids:
        upto |= {s for s, r in tombs.items() if r == rid}
        (run,) = p.runs(rid)
        md5 = run.data.tags["tombstones.md5"]
        assert dvc_cached_ids(p, md5) == upto
        assert run.data.tags["tombstones.count"] == str(len(upto))
        md5s.append(md5)
    assert md5s[-1] == p.tombstones_md5() and len(set(md5s)) == 3
    versions = p.versions()
    assert [versions[n].tags["tombstones_md5"] for n in ("2", "3", "4")] == md5s
    # Each request's DVC record stays valid as the tombstones grow: a hand-run `dvc status`
    # (or `dvc repro`) of the whole project has nothing to do.
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"],
        cwd=p.root,
        env=dvc_env(),
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr


def test_resubmission_is_idempotent_and_other_content_is_refused(three: Sweep) -> None:
    p = three.project
    ledger = p.ledger()
    before = [(r.request_id, r.status, r.digest) for r in ledger.list()]
    rc, out, err = cli("submit", "--params", p.params, str(p.root / "requests" / "svc-a.yaml"))
    assert (rc, out) == (0, "svc-a: done (already submitted)\n"), err
    assert ledger.list(status="pending") == []
    assert len(ledger.events("svc-a")) == 3  # nothing recorded for the resubmission

    changed = p.write_request("svc-a", {"fraction": 0.2, "seed": 3}, name="svc-a-changed")
    rc, out, err = cli("submit", "--params", p.params, changed)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("unlearn: error: ") and "'svc-a'" in lines[0]
    assert "other content" in lines[0]
    assert [(r.request_id, r.status, r.digest) for r in ledger.list()] == before
    # `unlearn requests list | show` read the same ledger
    rc, out, _ = cli("requests", "list", "--json", "--params", p.params)
    assert rc == 0 and [(r["request_id"], r["status"]) for r in json.loads(out)] == [
        (rid, "done") for rid in three.ids
    ]
    rc, out, _ = cli("requests", "show", "svc-b", "--json", "--params", p.params)
    shown = json.loads(out)
    assert rc == 0 and (shown["produced_version"], len(shown["events"])) == ("3", 3)
    ledger.close()


def test_a_second_sweep_with_nothing_pending_does_nothing(three: Sweep) -> None:
    from flows.service import sweep_flow

    p = three.project
    runs, versions, md5 = len(p.runs()), sorted(p.versions()), p.tombstones_md5()
    t0 = time.perf_counter()
    empty = {"model": p.model, "processed": [], "recovered": [], "pending": []}
    assert sweep_flow(params_path=p.params) == empty
    overhead = time.perf_counter() - t0
    assert (len(p.runs()), sorted(p.versions()), p.tombstones_md5()) == (runs, versions, md5)
    assert p.production() == "4"
    print(f"empty sweep: {overhead:.2f}s; sweep of 3 requests (v1 included): {three.seconds:.1f}s")


def test_a_sweep_while_another_holds_the_model_claims_nothing(three: Sweep) -> None:
    """X is processing (claimed by a sweep on another host), Y pending: a sweep claims
    nothing, says so (not "nothing pending"), and leaves both as they are."""
    p = three.project
    x = p.write_request("svc-x", {"fraction": 0.05, "seed": 31})
    y = p.write_request("svc-y", {"fraction": 0.05, "seed": 32})
    assert cli("submit", "--params", p.params, x, y)[0] == 0
    ledger = p.ledger()
    assert ledger.claim_next(p.model, owner="elsewhere:4242").request_id == "svc-x"
    runs = len(p.runs())
    rc, out, err = cli("sweep", "--params", p.params)
    assert rc == 0, err
    assert out == (
        f"{p.model}: another sweep is processing a request of this model; "
        "1 pending left to it (svc-y)\n"
    )
    assert [r.request_id for r in ledger.list(status="processing")] == ["svc-x"]
    assert [r.request_id for r in ledger.list(status="pending")] == ["svc-y"]
    assert len(p.runs()) == runs
    # withdraw both, so the later tests see the queue empty
    ledger.transition("svc-x", "rejected", "test: withdrawn")
    ledger.transition("svc-y", "rejected", "test: withdrawn")
    ledger.close()


def test_failing_requests_do_not_block_the_next(three: Sweep, monkeypatch) -> None:
    """D names only ids A forgot (rejected at extraction); F's method raises (failed); E,
    submitted after both, is still done, from the same parent. E's summary log line raises
    after its outcome was recorded: the outcome stands and the sweep ends normally."""
    import dataclasses

    import pipeline_lib.modalities.image as image_modality

    p = three.project
    a_forget = sorted(p.manifests("svc-a")[0])
    d = p.write_request("svc-d", {"sample_ids": [str(s) for s in a_forget[:3]]})
    f = p.write_request("svc-f", {"fraction": 0.05, "seed": 11})
    e = p.write_request("svc-e", {"fraction": 0.05, "seed": 12})
    assert cli("submit", "--params", p.params, d, f, e)[0] == 0
    import tasks.method_inputs as method_inputs

    real = method_inputs.method_extras

    def method_extras(*args: Any, **kwargs: Any) -> Any:
        request_data = args[5]
        if "/svc-f/" in request_data["manifests_dir"]:
            raise RuntimeError("forced failure of svc-f (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(method_inputs, "method_extras", method_extras)
    modality = image_modality.MODALITY

    def summary_line(report: dict[str, Any]) -> str:
        if report.get("request_id") == "svc-e":
            raise KeyError("summary of svc-e (test)")
        return modality.summary_line(report)

    monkeypatch.setattr(
        image_modality, "MODALITY", dataclasses.replace(modality, summary_line=summary_line)
    )
    before = p.tombstones()
    rc, out, err = cli("sweep", "--params", p.params)
    assert rc == 1, out + err  # a failed request: the sweep says so
    lines = out.splitlines()
    assert lines[0].startswith("svc-d: rejected: StageFailed: ")
    assert "every id of the request was forgotten by an earlier request" in lines[0]
    assert lines[1] == "svc-f: failed: RuntimeError: forced failure of svc-f (test)"
    assert lines[2] == "svc-e: done (v4 -> v5): KeyError: 'summary of svc-e (test)'"

    ledger = p.ledger()
    rows = {r.request_id: r for r in ledger.list()}
    ledger.close()
    assert (rows["svc-d"].status, rows["svc-d"].mlflow_run_id) == ("rejected", None)
    assert "forgotten by an earlier request" in (rows["svc-d"].error or "")
    assert rows["svc-f"].status == "failed"
    assert rows["svc-f"].error == "RuntimeError: forced failure of svc-f (test)"
    assert (rows["svc-e"].status, rows["svc-e"].parent_version) == ("done", "4")
    assert rows["svc-e"].produced_version == "5" and p.production() == "5"
    assert_events(
        p,
        "svc-d",
        (None, "pending", "submitted"),
        ("pending", "processing", "claimed by"),
        ("processing", "rejected", "every id of the request was forgotten by an earlier"),
    )
    assert_events(
        p,
        "svc-f",
        (None, "pending", "submitted"),
        ("pending", "processing", "claimed by"),
        ("processing", "failed", "RuntimeError: forced failure of svc-f"),
    )
    assert_events(
        p,
        "svc-e",
        (None, "pending", "submitted"),
        ("pending", "processing", "claimed by"),
        ("processing", "done", "gates passed"),
    )
    assert rows["svc-e"].error is None
    # D and F left no version and no tombstone; F's MLflow run says FAILED; E's ids are gone
    assert p.runs("svc-d") == []
    (f_run,) = p.runs("svc-f")
    assert f_run.info.status == "FAILED"
    after = p.tombstones()
    e_forget = p.manifests("svc-e")[0]
    assert set(after) == set(before) | e_forget
    assert not (set(after) - set(before)) & (p.resolve("svc-f") - set(before))
    assert sorted(p.versions(), key=int) == ["1", "2", "3", "4", "5"]


def test_an_interrupted_request_is_recorded_failed_at_once(three: Sweep, monkeypatch) -> None:
    """A signal (KeyboardInterrupt, as tasks/interruption.py raises it) while H is processed
    ends the sweep, and H is failed right away with a retry hint, not left processing for
    the next sweep's dead-owner check; no version, no tombstone; a retry completes it."""
    import tasks.method_inputs as method_inputs

    p = three.project
    h = p.write_request("svc-int", {"fraction": 0.05, "seed": 23})
    assert cli("submit", "--params", p.params, h)[0] == 0
    real = method_inputs.method_extras

    def method_extras(*args: Any, **kwargs: Any) -> Any:
        if "/svc-int/" in args[5]["manifests_dir"]:
            raise KeyboardInterrupt("SIGTERM (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(method_inputs, "method_extras", method_extras)
    versions, tombstones = p.versions(), p.tombstones()
    from flows.service import sweep_flow

    with pytest.raises(KeyboardInterrupt):
        sweep_flow(params_path=p.params)
    ledger = p.ledger()
    row = ledger.get("svc-int")
    ledger.close()
    assert (row.status, row.error) == ("failed", "interrupted")
    assert_events(
        p,
        "svc-int",
        (None, "pending", "submitted"),
        ("pending", "processing", "claimed by"),
        ("processing", "failed", "interrupted by a signal"),
    )
    assert p.versions() == versions and p.tombstones() == tombstones
    monkeypatch.setattr(method_inputs, "method_extras", real)
    assert cli("requests", "retry", "--params", p.params, "svc-int")[0] == 0
    rc, out, err = cli("sweep", "--params", p.params)
    assert rc == 0 and out.startswith("svc-int: done"), out + err


def test_gates_keep_the_parent_then_the_exact_retrain_finishes_the_request(
    three: Sweep, tmp_path: Path
) -> None:
    from flows.service import retrain_production_flow, sweep_flow
    from pipeline_lib.config import load_params, to_dict
    from pipeline_lib.modalities import get_modality
    from pipeline_lib.service.tombstones import read_tombstones, tombstone_digest

    p = three.project
    parent, versions = p.production(), sorted(p.versions(), key=int)
    g = p.write_request("svc-g", {"fraction": 0.05, "seed": 21})
    assert cli("submit", "--params", p.params, g)[0] == 0
    result = sweep_flow(params_path=p.params, overrides=IMPOSSIBLE)
    ((out,),) = [result["processed"]]
    assert (out["status"], out["parent_version"], out["produced_version"]) == (
        "needs-retrain",
        parent,
        None,
    )
    assert p.production() == parent and sorted(p.versions(), key=int) == versions
    # the ids are deleted whatever the gates said
    g_forget = p.manifests("svc-g")[0]
    assert {s for s, r in p.tombstones().items() if r == "svc-g"} == g_forget
    (run,) = p.runs("svc-g")
    assert run.data.tags["service.gates_passed"] == "false"
    assert "forget_accuracy" in run.data.tags["service.gates"]
    assert run.data.tags["tombstones.md5"] == p.tombstones_md5()

    retrained = retrain_production_flow(params_path=p.params)
    exact = retrained["version"]
    assert retrained["closed"] == ["svc-g"]
    assert int(exact) == int(versions[-1]) + 1 and p.production() == exact
    ledger = p.ledger()
    row = ledger.get("svc-g")
    ledger.close()
    assert (row.status, row.produced_version) == ("done", exact)
    assert_events(
        p,
        "svc-g",
        (None, "pending", "submitted"),
        ("pending", "processing", "claimed by"),
        ("processing", "needs-retrain", "gates failed: forget_accuracy="),
        ("needs-retrain", "done", f"forgotten by exact version {exact}"),
    )
    # The exact version trained on the data less every tombstone: its manifests (the
    # tombstones as one synthetic request) and the weights, reproduced from them.
    tombs = p.tombstones()
    mv = p.versions()[exact]
    assert mv.tags["kind"] == "exact" and "parent_version" not in mv.tags
    assert mv.tags["tombstones_md5"] == p.tombstones_md5()
    assert mv.tags["tombstones_count"] == str(len(tombs))
    digest = tombstone_digest(read_tombstones(p.root / p.tomb_rel))
    forget, retain, _ = p.manifests(f"exact-{p.model}-{digest[:12]}")
    assert forget == set(tombs) and retain == p.train_ids() - set(tombs)
    modality = get_modality("image")
    params = load_params(p.params)
    prepared = p.root / "data" / "prepared"
    manifests = p.root / "runs" / "image" / f"exact-{p.model}-{digest[:12]}" / "manifests"
    again = modality.train(
        {"prepared_dir": str(prepared), "manifests_dir": str(manifests)},
        "exact",
        modality.train_sections(to_dict(params)),
        params.train.seed,
        str(tmp_path),
    )
    assert again["n_train"] == len(retain)
    assert again["digest"] == mv.tags["state_digest"]

    # fallback `retrain`: a failing request gets an exact version at once
    h = p.write_request("svc-h", {"fraction": 0.05, "seed": 22})
    assert cli("submit", "--params", p.params, h)[0] == 0
    result = sweep_flow(
        params_path=p.params, overrides={**IMPOSSIBLE, "service.gates.fallback": "retrain"}
    )
    ((out,),) = [result["processed"]]
    new = out["produced_version"]
    assert (out["status"], out["parent_version"], new) == ("done", exact, str(int(exact) + 1))
    assert p.production() == new
    tags = p.versions()[new].tags
    assert tags["kind"] == "exact" and tags["reason"] == "gates failed for svc-h"
    h_forget = p.manifests("svc-h")[0]
    assert h_forget <= set(p.tombstones())
    assert tags["tombstones_count"] == str(len(p.tombstones()))
    assert_events(
        p,
        "svc-h",
        (None, "pending", "submitted"),
        ("pending", "processing", "claimed by"),
        ("processing", "done", "exact retrain"),
    )


# ------------------------------------------------------------------ projects of their own


def test_run_twice_on_a_fresh_project(prefect_api, tmp_path: Path) -> None:
    """`make run`: the first `unlearn run` trains the production model (absent), submits the
    request and processes it; the second finds it done and changes nothing. The request is
    svc-a of the shared project, same content: another ledger's outcome must not be reused."""
    p = new_project(tmp_path / "proj")
    req = p.write_request("svc-a", {"fraction": 0.1, "seed": 3})
    rc, out, err = cli("run", "--params", p.params, "--request", req)
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[:2] == ["svc-a: pending (submitted)", "svc-a: done (v1 -> v2)"]
    assert "forget_acc" in out and "MLflow run" in out  # the summary table and the run
    versions = p.versions()
    assert sorted(versions) == ["1", "2"] and p.production() == "2"
    (run,) = p.runs("svc-a")
    assert versions["2"].run_id == run.info.run_id
    assert run.data.metrics["oracle.avg_gap"] == 0.0  # `run` compares with an oracle

    rc, out, err = cli("run", "--params", p.params, "--request", req)
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[:2] == ["svc-a: done (already submitted)", f"{p.model}: nothing pending"]
    assert "forget_acc" in out  # the stored report's table
    assert sorted(p.versions()) == ["1", "2"] and len(p.runs("svc-a")) == 1


def test_the_request_task_cache_key_names_the_ledger_entry(tmp_path: Path) -> None:
    """The same request (id and content) in two ledgers, or submitted again after a ledger was
    reset, is another entry: it must not be served from the other's cached outcome."""
    from flows.service import _request_key
    from pipeline_lib.data.requests import parse_request
    from tasks.ledger import Ledger

    req = parse_request({"request_id": "r1", "reason": "x", "forget": {"sample_ids": ["s1"]}})
    keys = []
    for name in ("one", "two"):
        url = f"sqlite:///{tmp_path / name}.db"
        ledger = Ledger(url)
        ledger.submit(req, MODEL)
        row = ledger.claim_next(MODEL)
        keys.append(_request_key(None, {"row": row, "ledger_db": url}))
        # the same entry claimed again (a replay) has the same key
        assert keys[-1] == _request_key(None, {"row": ledger.get("r1"), "ledger_db": url})
        ledger.close()
    assert keys[0] != keys[1]
    assert all("/" not in k and MODEL in k and "r1" in k for k in keys)


def test_the_oracle_is_cached_per_tombstone_set(tmp_path: Path) -> None:
    """Two requests that leave the same ids out of the data (tombstones so far plus their own
    forget set) get the same oracle cache key; another id set gets another key."""
    import numpy as np

    from pipeline_lib.data.requests import parse_request, write_manifests
    from pipeline_lib.service.tombstones import append_tombstones, read_tombstones, write_tombstones
    from tasks.service import oracle_task

    tomb_rel = "tombstones.parquet"
    write_tombstones(
        append_tombstones(
            read_tombstones(tmp_path / tomb_rel), "r0", ["a"], "2026-01-01T00:00:00+00:00"
        ),
        tmp_path / tomb_rel,
    )
    meta = {"content_hash": "h", "dataset": "d"}

    def key(rid: str, forget: list[str]) -> str:
        req = parse_request({"request_id": rid, "reason": "x", "forget": {"sample_ids": forget}})
        out = tmp_path / rid
        write_manifests(out, req, np.array(forget), np.array(["z"]), meta)
        data = {"prepared_dir": "p", "prepared_md5": "m", "manifests_dir": str(out)}
        task = oracle_task(tmp_path, tomb_rel, data)
        params = {
            "modality": "image",
            "data": data,
            "role": "oracle",
            "sections": {"model": {}, "train": {}},
            "seed": 1,
            "artifacts_dir": "art",
            "code": "c",
        }
        return task.cache_policy.cache_key_fn(None, params)

    # {a} tombstoned: forgetting b, or a and b, leaves out the same set {a, b}
    assert key("r1", ["b"]) == key("r2", ["a", "b"])
    assert key("r1", ["b"]) != key("r3", ["c"])


def _forget_digest(ids: list[str]) -> str:
    import mlflow
    import pandas as pd

    return mlflow.data.from_pandas(pd.DataFrame({"sample_id": sorted(ids)})).digest


def concurrent_sweeps(p: Project, workdir: Path, n: int = 3) -> list[str]:
    """``unlearn sweep --params P`` in ``n`` processes started at once, each with its own
    Prefect home and results (each starts its own temporary Prefect API, as ``unlearn`` does
    on a machine without a Prefect server); returns their outputs (all must exit 0).

    The sweeps' flow runs (read back from each process's Prefect database) must have run
    at the same time, or the test would not have tested concurrency."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    procs = []
    for i in range(n):
        home = workdir / f"sweeper-{i}"
        home.mkdir(parents=True)
        penv = {
            **env,
            "PYTHONPATH": str(REPO),
            "PREFECT_HOME": str(home / "prefect-home"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "prefect-results"),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "sweep", "--params", p.params],
                cwd=home,
                env=penv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-5000:]
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Every sweep's flow run overlapped another's: the ones that found a request processing
    # (and claimed nothing) ran while the sweep that holds the model was working.
    spans = [
        _flow_run_span(workdir / f"sweeper-{i}" / "prefect-home" / "prefect.db") for i in range(n)
    ]
    for i, (start, end) in enumerate(spans):
        assert any(s < end and start < e for j, (s, e) in enumerate(spans) if j != i), spans
    return outputs


def _flow_run_span(db: Path) -> tuple[Any, Any]:
    """Start and end of the one flow run in a Prefect API database."""
    import sqlite3
    from datetime import datetime

    con = sqlite3.connect(db)
    try:
        ((start, end),) = con.execute("SELECT start_time, end_time FROM flow_run").fetchall()
    finally:
        con.close()
    return datetime.fromisoformat(str(start)), datetime.fromisoformat(str(end))


def assert_each_processed_once(p: Project, ids: list[str], outputs: list[str]) -> None:
    """Every request done by exactly one sweep and one MLflow run; one first (exact)
    version and a linear chain after it; each run logged its own request's forget ids."""
    from pipeline_lib.data.requests import parse_request

    done_lines = [ln for out in outputs for ln in out.splitlines() if ": done (" in ln]
    assert sorted(ln.split(":")[0] for ln in done_lines) == sorted(ids), outputs
    ledger = p.ledger()
    rows = {r.request_id: r for r in ledger.list(model_name=p.model)}
    ledger.close()
    assert sorted(rows) == sorted(ids) and all(rows[rid].status == "done" for rid in ids)

    n = len(ids) + 1
    versions = p.versions()
    assert sorted(versions, key=int) == [str(v) for v in range(1, n + 1)]
    assert versions["1"].tags["kind"] == "exact"
    later = [str(v) for v in range(2, n + 1)]
    assert all(versions[v].tags["kind"] == "approximate" for v in later)
    # linear: each version's parent is the one before it, so no two share a parent
    assert [versions[v].tags["parent_version"] for v in later] == [str(v) for v in range(1, n)]
    assert p.production() == str(n)

    earlier: set[str] = set()
    for rid in sorted(ids, key=lambda r: int(rows[r].produced_version)):
        (run,) = p.runs(rid)  # processed exactly once
        assert run.info.status == "FINISHED" and run.info.run_id == rows[rid].mlflow_run_id
        assert versions[rows[rid].produced_version].run_id == run.info.run_id
        expected = p.resolve(rid) - earlier
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        forget = inputs[f"{rid}-forget"]
        tags = {t.key: t.value for t in forget.tags}
        assert tags["request_digest"] == parse_request(p.requests[rid]).digest
        assert forget.dataset.digest == _forget_digest(sorted(expected))
        assert p.manifests(rid)[0] == expected
        earlier |= expected


@pytest.mark.slow  # about 100 s on 2 busy cores: each process starts its own Prefect API
def test_three_concurrent_sweeps_process_each_request_once(tmp_path: Path) -> None:
    """Three `unlearn sweep` processes started at once on three pending requests (SQLite
    ledger and MLflow, a fresh model): one first version, each request processed once, the
    versions one linear chain, and each run logged its own request's forget set."""
    p = new_project(tmp_path / "proj")
    prepare(p)
    files = [p.write_request(f"conc-{i}", {"fraction": 0.1, "seed": 40 + i}) for i in range(3)]
    assert cli("submit", "--params", p.params, *files)[0] == 0
    outputs = concurrent_sweeps(p, tmp_path)
    assert_each_processed_once(p, [f"conc-{i}" for i in range(3)], outputs)


def test_lm_request_through_the_service(prefect_api, lm_project: Path) -> None:  # noqa: F811
    """The language-model pipeline through the same service: v1 exact, v2 approximate."""
    from flows.service import sweep_flow

    params_file = lm_project / "params-lm.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["service"].update(oracle="never", gates=dict(NO_GATES))
    params["train"]["epochs"] = 3  # no gate reads the LM's quality here
    params["tracking"]["experiment"] = "service-test"
    params_file.write_text(yaml.safe_dump(params))
    p = Project(lm_project, params["service"]["model_name"], "text", "params-lm.yaml")
    p.requests[LM_REQUEST["request_id"]] = LM_REQUEST
    rid = LM_REQUEST["request_id"]
    rc, out, err = cli("submit", "--params", p.params, str(lm_project / "requests" / "req.yaml"))
    assert (rc, out) == (0, f"{rid}: pending (submitted)\n"), err

    result = sweep_flow(params_path=p.params)
    ((r,),) = [result["processed"]]
    assert (r["request_id"], r["status"], r["parent_version"], r["produced_version"]) == (
        rid,
        "done",
        "1",
        "2",
    )
    versions = p.versions()
    assert sorted(versions) == ["1", "2"] and p.production() == "2"
    assert versions["1"].tags["kind"] == "exact"
    assert versions["2"].tags["kind"] == "approximate"
    assert versions["2"].tags["parent_version"] == "1"
    assert versions["2"].tags["method"] == "gradient_ascent"
    (run,) = p.runs(rid)
    assert run.data.tags["pipeline"] == "lm" and run.info.status == "FINISHED"
    forget, retain, _ = p.manifests(rid)
    assert forget and set(p.tombstones()) == forget and not retain & forget
    from tasks.registry import download_version_weights

    _, arch = download_version_weights(p.uri, p.model, "2", lm_project / "dl")
    assert arch["modality"] == "text" and "n_embd" in arch["model"]
