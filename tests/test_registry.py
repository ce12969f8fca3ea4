"""The production model in a real MLflow Model Registry (SQLite store and artifacts in a temp
dir): exact and approximate versions with lineage tags, the production alias, verified
downloads, version chains, and the request ledger sharing MLflow's database."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline_lib.data.requests import parse_request
from pipeline_lib.io import load_weights, save_weights, sha256_file
from tasks.ledger import Ledger, ledger_url
from tasks.registry import (
    RegistryError,
    WeightsMismatch,
    download_version_weights,
    ensure_registered_model,
    production_version,
    register_version,
    set_production,
    version_chain,
)

ARCH = {"name": "mlp", "in_features": 64, "hidden": [32], "n_classes": 10}


@dataclass(frozen=True)
class Store:
    uri: str
    client: MlflowClient
    experiment_id: str
    root: Path

    def run(self) -> str:
        return self.client.create_run(self.experiment_id).info.run_id

    def weights(self, name: str, fill: float) -> Path:
        path = self.root / "weights" / f"{name}.safetensors"
        save_weights({"fc.weight": torch.full((3, 4), fill), "fc.bias": torch.zeros(3)}, path)
        return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # The ledger creates its tables first: MLflow must still initialise its own beside them.
    ledger = Ledger(ledger_url(uri))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("registry-test", artifact_location=str(root / "artifacts"))
    yield Store(uri, client, exp, root)
    ledger.close()


def _exact_tags(**extra: str) -> dict[str, object]:
    return {"kind": "exact", "method": "train", "data_version": "md5-abc", **extra}


def test_versions_chain_and_the_production_alias_moves_only_when_asked(store: Store) -> None:
    name = "unlearnflow-chain"
    assert production_version(store.uri, name) is None  # not registered yet
    ensure_registered_model(store.uri, name, "digits MLP in production")
    assert ensure_registered_model(store.uri, name).description == "digits MLP in production"
    assert production_version(store.uri, name) is None  # registered, no alias yet

    w1 = store.weights("v1", 1.0)
    run1 = store.run()
    v1 = register_version(store.uri, name, w1, ARCH, run1, _exact_tags(), set_production=True)
    assert v1 == "1"
    prod = production_version(store.uri, name)
    assert prod is not None and str(prod.version) == "1" and prod.run_id == run1
    assert prod.tags["weights_sha256"] == sha256_file(w1)
    assert prod.source.endswith(f"{run1}/artifacts/model")
    files = sorted(Path(a.path).name for a in store.client.list_artifacts(run1, "model"))
    assert files == ["architecture.json", "weights.safetensors"]

    v2 = register_version(
        store.uri,
        name,
        store.weights("v2", 2.0),
        ARCH,
        store.run(),
        {
            "kind": "approximate",
            "parent_version": v1,
            "request_ids": ["req-a", "req-b"],
            "method": "fisher_diagonal",
            "data_version": "md5-abc",
            "gates": {"passed": False, "forget_accuracy": 0.4},
        },
        set_production=False,
    )
    mv2 = store.client.get_model_version(name, v2)
    assert mv2.tags["parent_version"] == "1" and mv2.tags["request_ids"] == "req-a,req-b"
    assert mv2.tags["gates"] == '{"forget_accuracy": 0.4, "passed": false}'
    assert str(production_version(store.uri, name).version) == "1"  # type: ignore[union-attr]
    set_production(store.uri, name, v2)
    assert str(production_version(store.uri, name).version) == "2"  # type: ignore[union-attr]

    approx = {"kind": "approximate", "method": "ssd", "request_ids": "req-c"}
    v3 = register_version(
        store.uri,
        name,
        store.weights("v3", 3.0),
        ARCH,
        store.run(),
        {**approx, "parent_version": v2},
        set_production=True,
    )
    assert str(production_version(store.uri, name).version) == v3  # type: ignore[union-attr]
    assert [str(mv.version) for mv in version_chain(store.uri, name, v3)] == ["3", "2", "1"]
    assert [str(mv.version) for mv in version_chain(store.uri, name, v1)] == ["1"]

    # A periodic exact retrain ends the chain.
    v4 = register_version(
        store.uri,
        name,
        store.weights("v4", 4.0),
        ARCH,
        store.run(),
        _exact_tags(parent_version=v3),
        set_production=True,
    )
    v5 = register_version(
        store.uri,
        name,
        store.weights("v5", 5.0),
        ARCH,
        store.run(),
        {**approx, "parent_version": v4},
        set_production=False,
    )
    assert [str(mv.version) for mv in version_chain(store.uri, name, v5)] == ["5", "4"]
    assert str(production_version(store.uri, name).version) == "4"  # type: ignore[union-attr]
    with pytest.raises(RegistryError, match="has no version '9'"):
        set_production(store.uri, name, "9")


def test_download_returns_verified_weights_and_refuses_tampered_ones(store: Store) -> None:
    name = "unlearnflow-download"
    w = store.weights("dl", 7.0)
    v = register_version(store.uri, name, w, ARCH, store.run(), _exact_tags(), set_production=True)
    path, arch = download_version_weights(store.uri, name, v, store.root / "dl-1")
    assert arch == ARCH
    got, want = load_weights(path), load_weights(w)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # Tamper with the stored artifact: same size, other bytes.
    mv = store.client.get_model_version(name, v)
    stored = Path(mv.source) / "weights.safetensors"
    save_weights(load_weights(stored) | {"fc.bias": torch.ones(3)}, stored)
    with pytest.raises(WeightsMismatch, match="refusing the file"):
        download_version_weights(store.uri, name, v, store.root / "dl-2")

    # A version whose hash cannot be checked is refused too.
    store.client.delete_model_version_tag(name, v, "weights_sha256")
    with pytest.raises(RegistryError, match="no weights_sha256 tag"):
        download_version_weights(store.uri, name, v, store.root / "dl-3")


def test_registration_is_checked_and_idempotent_per_run(store: Store) -> None:
    name = "unlearnflow-checks"
    w = store.weights("c1", 1.0)
    run = store.run()
    with pytest.raises(RegistryError, match="tag 'kind' must be one of exact, approximate"):
        register_version(store.uri, name, w, ARCH, run, {"method": "x"}, set_production=False)
    with pytest.raises(RegistryError, match="needs tag 'parent_version'"):
        register_version(store.uri, name, w, ARCH, run, {"kind": "approximate"}, False)
    with pytest.raises(RegistryError, match="has no version '7'"):
        register_version(
            store.uri, name, w, ARCH, run, {"kind": "approximate", "parent_version": "7"}, False
        )
    with pytest.raises(RegistryError, match="does not match"):
        register_version(store.uri, name, w, ARCH, run, _exact_tags(weights_sha256="0" * 64), False)
    not_weights = store.root / "model.pkl"
    not_weights.write_bytes(b"\x80\x04\x95 definitely a pickle")
    with pytest.raises(RegistryError, match="not a safetensors file"):
        register_version(store.uri, name, not_weights, ARCH, run, _exact_tags(), False)
    with pytest.raises(RegistryError, match="not JSON-serialisable"):
        register_version(store.uri, name, w, {"act": torch.nn.ReLU}, run, _exact_tags(), False)

    v1 = register_version(store.uri, name, w, ARCH, run, _exact_tags(), set_production=False)
    # A retried task registering the same weights from the same run gets the same version.
    assert register_version(store.uri, name, w, ARCH, run, _exact_tags(), True) == v1
    assert str(production_version(store.uri, name).version) == v1  # type: ignore[union-attr]
    assert len(store.client.search_model_versions(f"name = '{name}'")) == 1
    # Other weights from that run would overwrite v1's files: refused.
    with pytest.raises(RegistryError, match="already registered"):
        register_version(store.uri, name, store.weights("c2", 2.0), ARCH, run, _exact_tags(), False)


def test_broken_chains_are_reported(store: Store) -> None:
    name = "unlearnflow-broken"
    v1 = register_version(
        store.uri, name, store.weights("b1", 1.0), ARCH, store.run(), _exact_tags(), False
    )
    v2 = register_version(
        store.uri,
        name,
        store.weights("b2", 2.0),
        ARCH,
        store.run(),
        {"kind": "approximate", "parent_version": v1},
        False,
    )
    store.client.set_model_version_tag(name, v1, "kind", "approximate")
    with pytest.raises(RegistryError, match="approximate version without parent_version"):
        version_chain(store.uri, name, v2)
    store.client.set_model_version_tag(name, v1, "parent_version", v2)
    with pytest.raises(RegistryError, match="cycle"):
        version_chain(store.uri, name, v2)
    store.client.set_model_version_tag(name, v1, "kind", "mystery")
    with pytest.raises(RegistryError, match="kind is 'mystery'"):
        version_chain(store.uri, name, v2)


def test_ledger_and_registry_share_the_tracking_database(store: Store) -> None:
    ledger = Ledger(ledger_url(store.uri))
    req = parse_request({"request_id": "req-shared", "reason": "r", "forget": {"fraction": 0.1}})
    assert ledger.submit(req, "unlearnflow-chain") == ("pending", True)
    assert store.client.get_registered_model("unlearnflow-chain").name == "unlearnflow-chain"
    ledger.close()
