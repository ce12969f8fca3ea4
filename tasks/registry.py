"""The production model in the MLflow Model Registry.

One registered model per pipeline (e.g. ``unlearnflow-digits``); alias ``production`` names
the version in service. Every version's files are two run artifacts under ``model/``:
``weights.safetensors`` and ``architecture.json`` (the config that rebuilds the module).
Nothing is pickled, and nothing here loads a pickle: the weights are verified against the
version's ``weights_sha256`` tag before they are handed out.

Version tags carry the lineage that :func:`version_chain` follows:

- ``kind``: ``exact`` (trained from scratch on the data minus the tombstones) or
  ``approximate`` (unlearned from its parent);
- ``parent_version``: the version it was unlearned from (required for ``approximate``);
- ``request_ids``, ``method``, ``data_version``, ``gates``: what produced it;
- ``weights_sha256``: the content hash of ``weights.safetensors`` (set here, not by callers).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from safetensors import safe_open

from pipeline_lib.io import sha256_file

log = logging.getLogger(__name__)

PRODUCTION_ALIAS = "production"
ARTIFACT_DIR = "model"
WEIGHTS_FILE = "weights.safetensors"
ARCH_FILE = "architecture.json"
KINDS: tuple[str, ...] = ("exact", "approximate")


class RegistryError(ValueError):
    """A registry operation was refused: bad tags, a missing version, a broken lineage."""


class WeightsMismatch(RegistryError):
    """Downloaded weights do not hash to the version's ``weights_sha256`` tag."""


def _client(uri: str) -> MlflowClient:
    # The registry lives in the tracking store (the SQLite file or the tracking server).
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _missing(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def ensure_registered_model(uri: str, name: str, description: str = "") -> RegisteredModel:
    """Return the registered model ``name``, creating it (with ``description``) if absent.

    Safe against a concurrent creator: if another process creates it between our read and
    our create, theirs is returned.
    """
    client = _client(uri)
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _missing(exc):
            raise
    try:
        model = client.create_registered_model(name, description=description or None)
        log.info("registered model %s created in %s", name, uri)
        return model
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_registered_model(name)


def _tag_value(key: str, value: Any) -> str:
    """Registry tags are strings: sequences are comma-joined (``request_ids``), mappings are
    canonical JSON (``gates``), anything else ``str()``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, Sequence):
        return ",".join(str(v) for v in value)
    if value is None:
        raise RegistryError(f"tag {key!r} is None; leave it out instead")
    return str(value)


def _check_safetensors(path: Path) -> None:
    """Refuse a file that is not safetensors (reading the header only)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            fh.keys()
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise RegistryError(f"{path}: not a safetensors file ({exc})") from exc


def _existing_version_for_run(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(found, key=lambda mv: int(mv.version)) if found else None


def register_version(
    uri: str,
    name: str,
    weights_path: str | Path,
    arch_config: Mapping[str, Any],
    run_id: str,
    tags: Mapping[str, Any],
    set_production: bool,
) -> str:
    """Log a model's weights and architecture under ``model/`` of run ``run_id``, register
    them as a new version of ``name`` and return the version number (a string).

    ``tags`` must contain ``kind`` (``exact`` or ``approximate``); an approximate version
    must name an existing ``parent_version``. ``weights_sha256`` is computed here from the
    file (a caller-given value must agree). The ``production`` alias moves to the new version
    only when ``set_production`` is true (after the gates passed).

    Idempotent per run: if ``run_id`` already produced a version of ``name`` with the same
    weights hash (a retried task), that version is returned instead of a duplicate; other
    weights from the same run are refused (they would overwrite that version's files).
    """
    weights_path = Path(weights_path)
    _check_safetensors(weights_path)
    digest = sha256_file(weights_path)
    str_tags = {k: _tag_value(k, v) for k, v in tags.items()}
    kind = str_tags.get("kind")
    if kind not in KINDS:
        raise RegistryError(f"tag 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    if str_tags.get("weights_sha256", digest) != digest:
        raise RegistryError(
            f"tag weights_sha256={str_tags['weights_sha256'][:12]}… does not match "
            f"{weights_path} ({digest[:12]}…)"
        )
    str_tags["weights_sha256"] = digest
    try:
        arch_text = json.dumps(dict(arch_config), indent=2, sort_keys=True) + "\n"
    except TypeError as exc:
        raise RegistryError(f"arch_config is not JSON-serialisable: {exc}") from exc

    client = _client(uri)
    ensure_registered_model(uri, name)
    parent = str_tags.get("parent_version")
    if kind == "approximate" and not parent:
        raise RegistryError("an approximate version needs tag 'parent_version'")
    if parent:
        _get_version(client, name, parent)

    previous = _existing_version_for_run(client, name, run_id)
    if previous is not None:
        if previous.tags.get("weights_sha256") != digest:
            # Logging again would overwrite the files that version's source points at.
            raise RegistryError(
                f"run {run_id} already registered {name} v{previous.version} with other weights "
                f"({previous.tags.get('weights_sha256', '?')[:12]}… vs {digest[:12]}…); "
                "register new weights from a new run"
            )
        log.info("run %s already registered %s v%s; reusing it", run_id, name, previous.version)
        if set_production:
            client.set_registered_model_alias(name, PRODUCTION_ALIAS, str(previous.version))
        return str(previous.version)

    run = client.get_run(run_id)  # raises a clear MlflowException for an unknown run
    with tempfile.TemporaryDirectory(prefix="unlearnflow-register-") as tmp:
        staging = Path(tmp)
        shutil.copyfile(weights_path, staging / WEIGHTS_FILE)
        (staging / ARCH_FILE).write_text(arch_text)
        client.log_artifacts(run_id, str(staging), artifact_path=ARTIFACT_DIR)
    source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=str_tags)
    log.info("registered %s v%s (%s) from run %s", name, mv.version, kind, run_id)
    if set_production:
        client.set_registered_model_alias(name, PRODUCTION_ALIAS, str(mv.version))
        log.info("%s@%s -> v%s", name, PRODUCTION_ALIAS, mv.version)
    return str(mv.version)


def _get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _missing(exc):
            raise RegistryError(f"registered model {name!r} has no version {version!r}") from exc
        raise


def production_version(uri: str, name: str) -> ModelVersion | None:
    """The version that alias ``production`` points at; ``None`` when the model is not
    registered yet or has no production version.

    Note: MLflow's stores return ``ModelVersion.version`` as an ``int`` or a ``str``
    depending on the backend; compare ``str(mv.version)``.
    """
    client = _client(uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise
    version = model.aliases.get(PRODUCTION_ALIAS)
    return None if version is None else client.get_model_version(name, str(version))


def get_version(uri: str, name: str, version: str) -> ModelVersion:
    """Version ``version`` of ``name`` (RegistryError when it does not exist)."""
    return _get_version(_client(uri), name, version)


def set_production(uri: str, name: str, version: str) -> None:
    """Point alias ``production`` of ``name`` at ``version`` (which must exist)."""
    client = _client(uri)
    _get_version(client, name, version)
    client.set_registered_model_alias(name, PRODUCTION_ALIAS, str(version))
    log.info("%s@%s -> v%s", name, PRODUCTION_ALIAS, version)


def download_version_weights(
    uri: str, name: str, version: str, dest_dir: str | Path
) -> tuple[Path, dict[str, Any]]:
    """Download version ``version``'s weights and architecture into ``dest_dir``.

    Returns ``(weights_path, arch_config)``. Raises :class:`WeightsMismatch` when the
    downloaded file does not hash to the version's ``weights_sha256`` tag (a tampered or
    corrupted artifact), and :class:`RegistryError` when the tag is absent, so weights that
    cannot be verified are never used.
    """
    client = _client(uri)
    mv = _get_version(client, name, version)
    expected = mv.tags.get("weights_sha256")
    if not expected:
        raise RegistryError(f"{name} v{version} has no weights_sha256 tag; cannot verify it")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    source = mv.source.rstrip("/")
    weights = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source}/{WEIGHTS_FILE}", dst_path=str(dest), tracking_uri=uri
        )
    )
    actual = sha256_file(weights)
    if actual != expected:
        raise WeightsMismatch(
            f"{name} v{version}: {WEIGHTS_FILE} has sha256 {actual[:12]}…, the version's "
            f"weights_sha256 tag says {expected[:12]}…; refusing the file (tampered or corrupt)"
        )
    arch_path = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source}/{ARCH_FILE}", dst_path=str(dest), tracking_uri=uri
        )
    )
    return weights, json.loads(arch_path.read_text())


def version_chain(uri: str, name: str, version: str) -> list[ModelVersion]:
    """``version`` and its ancestors through ``parent_version`` tags, newest first, ending
    at the nearest exact version (included).

    Raises :class:`RegistryError` when the chain is broken: a version without a valid
    ``kind`` tag, an approximate version without a parent, a missing parent, or a cycle.
    (``ModelVersion.version`` may be an ``int``: compare ``str(mv.version)``.)
    """
    client = _client(uri)
    chain: list[ModelVersion] = []
    seen: set[str] = set()
    current: str | None = str(version)
    while current is not None:
        if current in seen:
            raise RegistryError(f"{name}: parent_version tags form a cycle at v{current}")
        seen.add(current)
        mv = _get_version(client, name, current)
        chain.append(mv)
        kind = mv.tags.get("kind")
        if kind == "exact":
            return chain
        if kind != "approximate":
            raise RegistryError(f"{name} v{current}: tag kind is {kind!r}, not exact/approximate")
        current = mv.tags.get("parent_version") or None
        if current is None:
            raise RegistryError(f"{name} v{mv.version}: approximate version without parent_version")
    return chain
