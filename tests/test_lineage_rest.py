"""`unlearn lineage sample` against a real MLflow tracking server: the registry read over
MLflow's REST API with the standard library (tasks/mlflow_rest.py, no `import mlflow`) gives
exactly what the MLflow client gives, against the server and against its SQLite store.

One server for the module: ``infra/mlflow-server.sh`` with MLflow's basic-auth app on a
free port of 127.0.0.1, over a history generated as benchmarks/lineage_query.py generates
it (a small one); stopped at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, fresh_cli

pytestmark = pytest.mark.cluster

REQUESTS, IDS, RETRAIN_EVERY = 24, 3, 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from benchmarks.lineage_query import MODEL, generate, serve

    root = tmp_path_factory.mktemp("lineage-rest")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    generate(uri, REQUESTS, IDS, RETRAIN_EVERY)
    with serve(uri, root / "server", auth=True) as (url, creds):
        params = root / "params.yaml"
        params.write_text(
            yaml.safe_dump(
                {
                    "tracking": {"mlflow_uri": url},
                    "service": {"model_name": MODEL, "ledger_url": uri},
                }
            )
        )
        yield {"url": url, "sqlite": uri, "creds": creds, "params": str(params), "model": MODEL}


@pytest.fixture
def creds(server, monkeypatch):
    for key in list(os.environ):
        if key.startswith("MLFLOW_TRACKING_") and key != "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(key)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in server["creds"].items():
        monkeypatch.setenv(key, value)
    return server["creds"]


# samples: forgotten before the first exact retrain, forgotten mid-way, forgotten by the
# last request, never forgotten
SAMPLES = [f"digits-{i:06d}" for i in (1, (REQUESTS // 2) * IDS + 2, REQUESTS * IDS - 1)] + [
    "digits-999999"
]


def test_rest_and_client_answer_alike(server, creds):
    """The registry as REST reads it equals what the MLflow client reads from the server and
    from its SQLite store (versions, tags, times, run ids, production alias); and whole
    answers agree. Each server query costs the basic-auth app's password check, so the
    samples are compared over SQLite and one of them end to end over the server."""
    from tasks.ledger import Ledger
    from tasks.lineage import registry_view, sample_lineage

    model = server["model"]
    rest = registry_view(server["url"], model, via="rest")
    assert rest == registry_view(server["url"], model, via="client")
    assert rest == registry_view(server["sqlite"], model)
    versions, production = rest
    assert len(versions) == REQUESTS + 1 + (REQUESTS - 1) // RETRAIN_EVERY
    assert production == str(len(versions))
    kinds = {v.tags.get("kind") for v in versions.values()}
    assert kinds == {"exact", "approximate"}

    ledger = Ledger(server["sqlite"])
    try:
        answers = {s: sample_lineage(server["sqlite"], ledger, model, s) for s in SAMPLES}
        mid = SAMPLES[1]
        # auto picks REST for an http URI
        assert sample_lineage(server["url"], ledger, model, mid) == answers[mid]
        assert sample_lineage(server["url"], ledger, model, mid, via="client") == answers[mid]
    finally:
        ledger.close()
    for answer in answers.values():
        assert [v["production"] for v in answer["versions"]].count(True) == 1
        assert answer["versions"][-1]["production"]
    # trained with it before its request, unlearned by it and after, without it once an exact
    # retrain followed
    m = answers[mid]
    assert m["forgotten"] and m["trained_with"] and m["unlearned_in"]
    assert m["trained_without"] and m["holding_artifacts"]
    never = answers[SAMPLES[-1]]
    assert not never["forgotten"] and len(never["trained_with"]) == len(never["versions"])


def test_rest_pages_through_every_version(server, creds, monkeypatch):
    """Small pages: the versions are read through ``next_page_token`` to the last page."""
    from tasks import mlflow_rest

    remote = mlflow_rest.Server.from_env(server["url"], os.environ)
    whole = mlflow_rest.model_versions(remote, server["model"])
    monkeypatch.setattr(mlflow_rest, "PAGE", 8)
    pages = []
    real_get = mlflow_rest.Server.get

    def counted(self, endpoint, query):
        pages.append(query.get("page_token"))
        return real_get(self, endpoint, query)

    monkeypatch.setattr(mlflow_rest.Server, "get", counted)
    paged = mlflow_rest.model_versions(remote, server["model"])
    assert paged == whole and len(whole) > 3 * 8
    assert len(pages) == 4 and pages[0] is None and all(pages[1:])
    assert sorted(map(int, whole)) == list(range(1, len(whole) + 1))


def test_fresh_cli_against_the_server_does_not_import_mlflow(server, creds):
    from tasks.ledger import Ledger
    from tasks.lineage import sample_lineage

    sample = SAMPLES[1]
    proc, flags = fresh_cli(
        ["lineage", "sample", sample, "--json", "--params", server["params"]], ("mlflow", "numpy")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert flags == [0, False, False]
    answer = proc.stdout
    ledger = Ledger(server["sqlite"])
    try:
        expected = sample_lineage(server["sqlite"], ledger, server["model"], sample)
    finally:
        ledger.close()
    assert json.loads(answer) == json.loads(json.dumps(expected, default=str))


def _refusal(server, capsys, *extra: str) -> str:
    from flows.cli import main

    capsys.readouterr()
    rc = main(["lineage", "sample", SAMPLES[0], "--params", server["params"], *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_refusals_name_the_cause(server, creds, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    assert "set MLFLOW_TRACKING_USERNAME" in _refusal(server, capsys)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    err = _refusal(server, capsys)
    assert "401" in err and "were refused" in err
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", creds["MLFLOW_TRACKING_PASSWORD"])
    err = _refusal(server, capsys, "--model", "no-such-model")
    assert "'no-such-model'" in err and "not found" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert "cannot reach the MLflow server" in _refusal(server, capsys)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://127.0.0.1:1")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(Path(server["params"])))
    assert "cannot be used together" in _refusal(server, capsys)


def test_token_and_tls_settings_are_read_like_the_mlflow_client():
    import ssl

    from tasks.mlflow_rest import RestError, Server, use_rest

    assert use_rest("https://h", {}) and use_rest("http://127.0.0.1:5000", {})
    assert not use_rest("sqlite:///mlflow.db", {})
    assert not use_rest("https://h", {"MLFLOW_TRACKING_AUTH": "my_plugin"})
    assert not use_rest("https://h", {"MLFLOW_TRACKING_AWS_SIGV4": "true"})

    bearer = Server.from_env("https://h.example/mlflow/", {"MLFLOW_TRACKING_TOKEN": "t0k"})
    assert bearer.headers["Authorization"] == "Bearer t0k"
    assert bearer.uri == "https://h.example/mlflow" and bearer.context is not None
    assert bearer.context.verify_mode == ssl.CERT_REQUIRED
    insecure = Server.from_env("https://h", {"MLFLOW_TRACKING_INSECURE_TLS": "true"})
    assert insecure.context is not None and insecure.context.verify_mode == ssl.CERT_NONE
    with pytest.raises(RestError, match="MLFLOW_TRACKING_SERVER_CERT_PATH: cannot load"):
        Server.from_env("https://h", {"MLFLOW_TRACKING_SERVER_CERT_PATH": "/no/such/ca.pem"})
    with pytest.raises(RestError, match="MLFLOW_HTTP_REQUEST_TIMEOUT"):
        Server.from_env("http://h", {"MLFLOW_HTTP_REQUEST_TIMEOUT": "soon"})


def test_production_alias_is_the_registry_s():
    from tasks.lineage import PRODUCTION_ALIAS
    from tasks.registry import PRODUCTION_ALIAS as REGISTRY_ALIAS

    assert PRODUCTION_ALIAS == REGISTRY_ALIAS
