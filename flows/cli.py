"""``unlearn``: the command line of unlearnflow.

    unlearn run [--params params.yaml] [--request FILE] [--method NAME] [--set KEY=VALUE ...]
    unlearn run --params params-lm.yaml [--request requests/forget-play.yaml] ...   (language models)
    unlearn submit FILE [FILE ...] [--params params.yaml]
    unlearn sweep [--params params.yaml] [--max N] [--purge] [--set KEY=VALUE ...]
    unlearn retrain-production [--params params.yaml] [--set KEY=VALUE ...]
    unlearn requests list [--status S] [--json] | show ID [--json] | retry ID [--params params.yaml]
    unlearn purge [--older-than DAYS] [--dry-run] [--json] [--params params.yaml]
    unlearn lineage request ID | sample ID | model NAME@VERSION|NAME@production [--json]
    unlearn experiment [--params params.yaml] [--request FILE] [--method NAME] [--set ...]
    unlearn attribute --models M [--alpha 0.5] [--params params.yaml] [--set KEY=VALUE ...]
    unlearn oracles --request FILE [--count N] [--params params.yaml] [--set KEY=VALUE ...]
    unlearn evaluate --request FILE [--methods a,b,...] [--models N] [--preset NAME] [--params ...] [--set ...]
    unlearn tune --method M --request FILE [--trials T] [--models K] [--objective O] [--name NAME] [--overwrite]
    unlearn requests validate FILE [FILE ...] [--params params.yaml]
    unlearn stats fisher|activations --split retain|forget [--request FILE] [--shards N] [--workers W] [--force]
    unlearn methods

Every argument is checked before any work starts: a wrong name fails at once and lists the
valid choices.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline_lib.schema import ConfigError

# pipeline_lib.data (numpy, pyarrow: a fifth of a second) is imported by the commands that
# read requests or data, not at start-up: `unlearn lineage` has no use for it.


def load_params(path: str, overrides: dict[str, Any] | None = None) -> Any:
    """:func:`pipeline_lib.config.load_params`, imported when a command needs the whole
    params (composing them imports every method and model, and so torch: seconds that
    ``unlearn lineage`` does without)."""
    from pipeline_lib.config import load_params as _load_params

    return _load_params(path, overrides)


def environment_overrides(environ: Any) -> dict[str, Any]:
    from pipeline_lib.config import environment_overrides as _environment_overrides

    return _environment_overrides(environ)


def _setup_env() -> None:
    """Defaults for the embedded single-machine mode; every one can be overridden by the
    environment (PREFECT_API_URL for a Prefect server, RAY_ADDRESS, MLFLOW_TRACKING_URI)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded API server starts in a subprocess; on a busy 2-core machine it can take
    # longer than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault(
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(".prefect-results").resolve())
    )
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline_lib")
    # What Prefect persists outside the cached tasks' own options (a failed flow's exception)
    # is JSON, never a pickle; cached records are read as JSON only (tasks/results.py).
    os.environ["PREFECT_RESULTS_DEFAULT_SERIALIZER"] = "json"
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Offline, MLflow's telemetry thread can race a request (KeyError on its session id).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=10")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set {item!r}: the key is empty; expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            why = str(exc).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({why})") from None
    return out


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = _parse_set(args.set or [])
    if args.request:
        overrides["request.file"] = str(Path(args.request).resolve())
    if args.method:
        overrides["unlearn.method"] = args.method
    if getattr(args, "preset", None):
        overrides["unlearn.preset"] = args.preset
    return overrides


def _check_preset_method(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """A run with a preset (``--preset`` or unlearn.preset): the selected method must be one
    the preset tuned, or the run would silently use the params' setting."""
    from pipeline_lib.config.presets import preset_dir, preset_methods
    from pipeline_lib.modalities import modality_for_params

    if modality_for_params(args.params).name != "image":
        return
    params = load_params(args.params, {**environment_overrides(os.environ), **overrides})
    name, method, root = params.unlearn.preset, params.unlearn.method, params.tracking.dvc_root
    if name and method not in preset_methods(root, name):
        raise ConfigError(
            f"unlearn.preset: {preset_dir(root, name)} has no {method}.yaml "
            f"(tuned there: {', '.join(preset_methods(root, name))})"
        )


def cmd_experiment(args: argparse.Namespace) -> int:
    """One request as a one-off experiment: a freshly trained original, the oracle, the
    method, the comparison (the params file's modality: ``pipeline: lm`` for language models).
    Nothing is registered and the ledger is not used."""
    from pipeline_lib.modalities import modality_for_params

    modality = modality_for_params(args.params)
    overrides = _overrides(args)
    params = modality.load_params(
        args.params, {**environment_overrides(os.environ), **overrides}
    )  # fails fast
    request = _request_pair(params)
    _check(modality, params, [request])  # every input, before any work
    _check_request_id_in_mlflow(params, *request)
    _setup_env()
    from flows.pipeline import unlearning_pipeline  # prefect import after env setup

    result = unlearning_pipeline(params_path=args.params, overrides=overrides)
    print()
    print(modality.format_table(result["report"]))
    print(
        f"\nMLflow run {result['run_id']} ({params.tracking.mlflow_uri}); report in {result['report_dir']}"
    )
    return 0


def _check(modality: Any, params: Any, requests: list | tuple = (), **kwargs: Any) -> dict:
    """Every input (params, data source, requests, counts) checked before any work:
    :func:`pipeline_lib.validation.check_inputs`; an error exits 2 naming the key or file."""
    from pipeline_lib.validation import check_inputs

    return check_inputs(modality, params, requests, **kwargs)


def _request_pair(params: Any) -> tuple[str, Any]:
    """(file, request) of ``request.file`` (``--request``), schema-checked; the params are
    checked first (the file is found under ``tracking.dvc_root``)."""
    from pipeline_lib.data.requests import load_request
    from pipeline_lib.validation import check_params

    check_params(params)
    file = str(params.resolve(params.request.file))
    return file, load_request(file)


def _check_request_id_in_mlflow(params: Any, source: str, request: Any) -> None:
    """A request id MLflow already holds for other content is refused up front (the flow
    would refuse it after the Prefect API started). A store that does not exist yet holds
    none, and is not created by looking."""
    uri = params.tracking.mlflow_uri
    if uri.startswith("sqlite:///"):
        if not Path(uri[len("sqlite:///") :].split("?", 1)[0]).is_file():
            return
    elif "://" not in uri or uri.startswith("file:"):
        if not Path(uri.removeprefix("file://").removeprefix("file:")).is_dir():
            return
    from pipeline_lib.data.requests import RequestError
    from tasks.tracking import DuplicateRequest, check_request_id

    try:
        check_request_id(uri, params.tracking.experiment, request.request_id, request.digest)
    except DuplicateRequest as exc:
        raise RequestError(f"{source}: {exc}") from None


def _service(
    args: argparse.Namespace,
    overrides: dict[str, Any] | None = None,
    *,
    check: str | None = None,
    requests: list | tuple = (),
):
    """The modality, params and ledger of ``--params``. ``check``: ``"data"`` checks every
    input, the data source and ``requests`` included, ``"params"`` the params alone; both
    before the ledger is opened (opening it may create its tables)."""
    from pipeline_lib.modalities import modality_for_params
    from tasks.ledger import Ledger, ledger_url

    modality = modality_for_params(args.params)
    params = modality.load_params(
        args.params, {**environment_overrides(os.environ), **(overrides or {})}
    )
    if check:
        _check(modality, params, requests, data=check == "data")
    try:
        url = ledger_url(params.tracking.mlflow_uri, params.service.ledger_url)
    except ValueError as exc:
        raise ConfigError(f"service.ledger_url: {exc}") from exc
    return modality, params, Ledger(url)


def _load_requests(files: list[str]) -> list[tuple[str, Any]]:
    from pipeline_lib.data.requests import check_unique_ids, load_request

    requests = [(f, load_request(f)) for f in files]
    check_unique_ids(requests)
    return requests


def _submit(ledger, params, requests: list[tuple[str, Any]]) -> list[tuple[str, str, bool]]:
    """Record requests already checked (:func:`_service` with ``requests``: a request whose
    ids are not in the data is refused at submit, not an hour later in the sweep)."""
    from pipeline_lib.data.requests import RequestError
    from tasks.ledger import LedgerConflict

    out = []
    for source, req in requests:
        try:
            status, created = ledger.submit(req, params.service.model_name)
        except LedgerConflict as exc:
            raise RequestError(f"{source}: {exc}") from exc
        out.append((req.request_id, status, created))
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    """Validate request files and record them in the ledger as ``pending``."""
    requests = _load_requests(args.files)
    _, params, ledger = _service(args, check="data", requests=requests)
    try:
        for rid, status, created in _submit(ledger, params, requests):
            note = "submitted" if created else "already submitted"
            print(f"{rid}: {status} ({note})")
    finally:
        ledger.close()
    return 0


def _row_dict(row, events=None) -> dict[str, Any]:
    import dataclasses

    d = dataclasses.asdict(row)
    if events is not None:
        d["events"] = [dataclasses.asdict(e) for e in events]
    return d


def cmd_requests_list(args: argparse.Namespace) -> int:
    import json

    _, params, ledger = _service(args)
    try:
        rows = ledger.list(status=args.status, model_name=params.service.model_name)
    finally:
        ledger.close()
    if args.json:
        print(json.dumps([_row_dict(r) for r in rows], indent=2, default=str))
        return 0
    print(f"{'#':>4}  {'request':<28} {'status':<14} {'parent':>6} {'version':>7}  updated")
    for r in rows:
        print(
            f"{r.seq:>4}  {r.request_id:<28} {r.status:<14} {r.parent_version or '-':>6} "
            f"{r.produced_version or '-':>7}  {r.updated_at}"
        )
    if not rows:
        print("(no requests" + (f" with status {args.status}" if args.status else "") + ")")
    return 0


def cmd_requests_show(args: argparse.Namespace) -> int:
    import json

    from pipeline_lib.data.requests import RequestError

    _, _, ledger = _service(args)
    try:
        row = ledger.get(args.request_id)
        if row is None:
            raise RequestError(f"request {args.request_id!r} is not in the ledger")
        events = ledger.events(args.request_id)
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(_row_dict(row, events), indent=2, default=str))
        return 0
    for key in ("request_id", "model_name", "status", "digest", "submitted_at", "updated_at"):
        print(f"{key:<17}{getattr(row, key)}")
    for key in ("parent_version", "produced_version", "mlflow_run_id", "error"):
        if getattr(row, key):
            print(f"{key:<17}{getattr(row, key)}")
    print("history:")
    for e in events:
        print(f"  {e.at}  {e.from_status or '-':>13} -> {e.to_status:<13} {e.reason}")
    return 0


def cmd_requests_retry(args: argparse.Namespace) -> int:
    """Put a ``failed`` request back in the queue (``failed -> pending``); the next sweep
    processes it again, in its original place."""
    from pipeline_lib.data.requests import RequestError

    _, _, ledger = _service(args)
    try:
        row = ledger.get(args.request_id)
        if row is None:
            raise RequestError(f"request {args.request_id!r} is not in the ledger")
        if row.status != "failed":
            raise RequestError(
                f"request {args.request_id!r} is {row.status}; only a failed request can be retried"
            )
        ledger.transition(args.request_id, "pending", args.reason, error=None)
    finally:
        ledger.close()
    print(f"{args.request_id}: pending (retry)")
    return 0


def _print_sweep(result: dict[str, Any]) -> None:
    for r in result["recovered"]:
        print(f"{r}: was left processing by a dead sweep; marked failed")
    for r in result["processed"]:
        line = f"{r['request_id']}: {r['status']}"
        if r.get("produced_version"):
            line += f" (v{r['parent_version']} -> v{r['produced_version']})"
        elif r.get("parent_version"):
            line += f" (production stays v{r['parent_version']})"
        if r.get("error"):
            line += f": {r['error']}"
        print(line)
    left = result.get("pending") or []
    names = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
    if left and not result["processed"]:
        # claim_next found a request of the model processing: requests run one at a time
        print(
            f"{result['model']}: another sweep is processing a request of this model; "
            f"{len(left)} pending left to it ({names})"
        )
    elif left:
        print(f"{result['model']}: {len(left)} still pending ({names})")
    elif not result["processed"]:
        print(f"{result['model']}: nothing pending")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Process every pending request now (what the scheduled deployment runs)."""
    if args.max is not None and args.max < 1:
        raise ConfigError(f"--max: must be >= 1, got {args.max}")
    overrides = _parse_set(args.set or [])
    _service(args, overrides, check="data")[2].close()  # every input checked before any work
    _setup_env()
    from flows.service import sweep_flow

    result = sweep_flow(params_path=args.params, overrides=overrides, max_requests=args.max)
    _print_sweep(result)
    if args.purge:
        from tasks.retention import summary_lines

        modality, params, ledger = _service(args, overrides)
        try:
            print("\n".join(summary_lines(_purge(modality, params, ledger, None, False))))
        finally:
            ledger.close()
    return 1 if any(r["status"] == "failed" for r in result["processed"]) else 0


def cmd_retrain(args: argparse.Namespace) -> int:
    overrides = _parse_set(args.set or [])
    _service(args, overrides, check="data")[2].close()  # every input checked before any work
    _setup_env()
    from flows.service import retrain_production_flow

    result = retrain_production_flow(params_path=args.params, overrides=overrides)
    print(f"exact version {result['version']} is production (MLflow run {result['run_id']})")
    for rid in result["closed"]:
        print(f"{rid}: done (needs-retrain closed)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The service in one command: submit the request (``--request`` or request.file), process
    the pending requests (training the first production version if there is none), print
    the request's summary table."""
    overrides = _overrides(args)
    _check_preset_method(args, overrides)
    from pipeline_lib.modalities import modality_for_params

    env = environment_overrides(os.environ)
    params = modality_for_params(args.params).load_params(args.params, {**env, **overrides})
    requests = [_request_pair(params)]
    modality, params, ledger = _service(args, overrides, check="data", requests=requests)
    try:
        ((rid, status, created),) = _submit(ledger, params, requests)
    finally:
        ledger.close()
    print(f"{rid}: {status} ({'submitted' if created else 'already submitted'})")
    if args.oracle:
        overrides["service.oracle"] = args.oracle
    _setup_env()
    from flows.service import sweep_flow

    result = sweep_flow(params_path=args.params, overrides=overrides)
    _print_sweep(result)
    mine = [r for r in result["processed"] if r["request_id"] == rid]
    report = mine[0].get("report") if mine else _stored_report(params, rid)
    if report:
        print()
        print(modality.format_table(report))
    if mine and mine[0].get("run_id"):
        print(
            f"\nMLflow run {mine[0]['run_id']} ({params.tracking.mlflow_uri}); report in {mine[0]['report_dir']}"
        )
    if mine and mine[0]["status"] in ("failed", "rejected"):
        return 1 if mine[0]["status"] == "failed" else 2
    return 0


def _stored_report(params: Any, request_id: str) -> dict | None:
    """The report an earlier run wrote for ``request_id`` (a done request is not rerun)."""
    import json

    path = params.resolve(params.evaluate.report_dir) / params.service.model_name / request_id
    file = path / "report.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _lineage_print(rows: list[tuple[str, Any]]) -> None:
    for key, value in rows:
        if value not in (None, "", [], {}):
            print(f"{key:<22}{value}")


def cmd_lineage(args: argparse.Namespace) -> int:
    """``unlearn lineage request ID | sample ID | model NAME@VERSION``: what the tracking
    store, the registry and the ledger record (tasks/lineage.py); ``--json`` for machines."""
    import json

    if args.lineage_command == "reindex":
        from pipeline_lib.service.tombstones import read_tombstones
        from tasks.lineage import reindex_forgotten
        from tasks.service import tombstones_path

        modality, params, ledger = _service(args)
        path = Path(params.tracking.dvc_root).resolve() / tombstones_path(modality, params)
        try:
            added = reindex_forgotten(ledger, params.service.model_name, read_tombstones(path))
        finally:
            ledger.close()
        print(f"{params.service.model_name}: {added} forgotten id(s) indexed from {path}")
        return 0
    # the queries read only the tracking URI and the service section: no Params, no torch,
    # no Prefect, no pipeline_lib.data; `lineage sample` against a tracking server reads the
    # registry over REST without importing MLflow (tasks/mlflow_rest.py)
    from pipeline_lib.service.settings import read_service_settings
    from tasks.ledger import Ledger, ledger_url
    from tasks.lineage import LineageError, model_lineage, request_lineage, sample_lineage

    settings = read_service_settings(args.params, os.environ)
    uri, model = settings.mlflow_uri, settings.service.model_name
    try:
        ledger = Ledger(ledger_url(uri, settings.service.ledger_url))
    except ValueError as exc:
        raise ConfigError(f"service.ledger_url: {exc}") from exc
    try:
        if args.lineage_command == "request":
            out = request_lineage(uri, ledger, args.id)
        elif args.lineage_command == "sample":
            out = sample_lineage(uri, ledger, args.model or model, args.id)
        else:
            name, _, version = (args.id or "production").partition("@")
            if not version:
                name, version = model, name or "production"
            out = model_lineage(uri, ledger, name, version)
    except LineageError as exc:
        from pipeline_lib.data.requests import RequestError

        raise RequestError(str(exc)) from exc
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    if args.lineage_command == "request":
        _print_request_lineage(out)
    elif args.lineage_command == "sample":
        _print_sample_lineage(out)
    else:
        _print_model_lineage(out)
    return 0


def _print_request_lineage(out: dict[str, Any]) -> None:
    ml = out.get("mlflow") or {}
    data = out.get("data_version") or {}
    ids = out.get("forget_ids") or {}
    gates = out.get("gates") or {}
    prefect = out.get("prefect") or {}
    _lineage_print(
        [
            ("request", out["request_id"]),
            ("model", out["model_name"]),
            ("status", out["status"]),
            (
                "versions",
                f"v{out['parent_version']} -> v{out['produced_version']}"
                if out.get("produced_version")
                else f"parent v{out['parent_version']}, none produced"
                if out.get("parent_version")
                else None,
            ),
            ("method", out.get("method")),
            (
                "method params",
                ", ".join(
                    f"{k.split('.', 2)[-1]}={v}"
                    for k, v in (out.get("method_params") or {}).items()
                ),
            ),
            (
                "forgotten ids",
                f"{ids.get('count')} (sha256 {ids.get('sha256')})" if ids.get("count") else None,
            ),
            (
                "data version",
                f"prepared {data.get('prepared_md5')}, manifests {data.get('manifests_md5')}"
                if data
                else None,
            ),
            (
                "tombstones",
                f"{(out.get('tombstones') or {}).get('count')} ids, md5 "
                f"{(out.get('tombstones') or {}).get('md5')}"
                if out.get("tombstones")
                else None,
            ),
            (
                "gates",
                f"{gates.get('summary')} (passed: {gates.get('passed')})"
                if gates.get("summary")
                else None,
            ),
            ("mlflow run", ml.get("run_id")),
            (
                "mlflow ui",
                f"{ml.get('ui_url')}  (served by `{ml['ui_command']}`)"
                if ml.get("ui_command")
                else ml.get("ui_url"),
            ),
            (
                "prefect flow run",
                " ".join(v for v in (prefect.get("flow_run_id"), prefect.get("flow_run_url")) if v),
            ),
            ("certificate", (out.get("certificate") or {}).get("path")),
            ("error", out.get("error")),
        ]
    )
    metrics = out.get("metrics") or {}
    models = [m for m in ("original", "oracle", "unlearned") if f"{m}.TA" in metrics]
    if models:
        cols = sorted({k.split(".", 1)[1] for k in metrics if k.split(".", 1)[0] in models})
        # a metric over seeded draws (the MIAs, the gap) as mean±std in one column
        spread = {c for c in cols if f"{c}_std" in cols}
        cols = [c for c in cols if not (c.endswith("_std") and c[: -len("_std")] in spread)]

        def cell(m: str, c: str) -> str:
            v = metrics.get(f"{m}.{c}", float("nan"))
            std = metrics.get(f"{m}.{c}_std") if c in spread else None
            return f"{v:.4f}" if std is None else f"{v:.4f}±{std:.4f}"

        width = {c: 2 + max(len(c), *(len(cell(m, c)) for m in models)) for c in cols}
        print("metrics:   " + "".join(f"{c:>{width[c]}}" for c in cols))
        for m in models:
            print(f"  {m:<9}" + "".join(f"{cell(m, c):>{width[c]}}" for c in cols))
    cost = {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("cost.")}
    if cost:
        print("cost:     " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cost.items())))
    print("history:")
    for e in out["history"]:
        print(f"  {e['at']}  {e['from'] or '-':>13} -> {e['to']:<13} {e['reason']}")


def _print_sample_lineage(out: dict[str, Any]) -> None:
    print(f"sample {out['sample_id']} of {out['model_name']}")
    if out["forgotten_by"]:
        for f in out["forgotten_by"]:
            print(
                f"  forgotten by {f['request_id']} at {f['at']} (tombstone #{f['tombstone_index']})"
            )
    else:
        print("  not forgotten by any request")
    print(f"{'version':>7}  {'kind':<12} {'parent':>6}  {'state':<10} {'requests':<28} purged")
    for v in out["versions"]:
        mark = "*" if v["production"] else " "
        print(
            f"{v['version']:>6}{mark}  {v['kind'] or '-':<12} {v['parent_version'] or '-':>6}  "
            f"{v['state']:<10} {v['request_ids'] or '-':<28} {v['purged_at'] or '-'}"
        )
    print(
        "(* production; with: trained with it, or derived from weights that were; unlearned: "
        "removed approximately; without: trained without it)"
    )
    if out["forgotten"]:
        held = out["holding_artifacts"]
        print(
            "artifacts still holding it: "
            + (", ".join(f"v{v} weights" for v in held) if held else "none")
        )


def _print_model_lineage(out: dict[str, Any]) -> None:
    print(f"{out['model_name']}@{out['version']}: chain back to the last exact version")
    print(
        f"{'version':>7}  {'kind':<12} {'parent':>6}  {'method':<16} {'data version':<36} "
        f"{'tombstones':>10}  requests"
    )
    for s in out["chain"]:
        reqs = ", ".join(f"{r} ({st})" for r, st in s["requests"].items()) or "-"
        purged = f"  [weights purged {s['purged_at']}]" if s.get("purged_at") else ""
        print(
            f"{s['version']:>7}  {s['kind'] or '-':<12} {s['parent_version'] or '-':>6}  "
            f"{s['method'] or '-':<16} {s['data_version'] or '-':<36} "
            f"{s['tombstones_count'] or '-':>10}  {reqs}{purged}"
        )


def _purge(
    modality: Any, params: Any, ledger: Any, older_than: float | None, dry_run: bool
) -> dict[str, Any]:
    from tasks.retention import purge, results_dir_from_env

    tr = params.tracking
    days = params.service.retention_days if older_than is None else older_than
    stores = [params.resolve(modality.prepared_out(params))] + [
        params.resolve(getattr(params, s).out_dir)
        for s in ("stats", "attribution")
        if hasattr(params, s)
    ]
    return purge(
        tr.mlflow_uri,
        ledger,
        params.service.model_name,
        days,
        params.resolve(tr.artifacts_dir),
        Path(tr.dvc_root).resolve(),
        results_dir_from_env(),
        dry_run=dry_run,
        modality=modality,
        params=params,
        data_stores=stores,
    )


def cmd_purge(args: argparse.Namespace) -> int:
    """Delete model artifacts and every stored row of ids forgotten more than the retention
    window ago (the data is re-versioned without them first); every deletion is recorded in
    the ledger."""
    import json

    from tasks.retention import summary_lines

    if args.older_than is not None and args.older_than < 0:
        raise ConfigError(f"--older-than must be >= 0 days, got {args.older_than}")
    modality, params, ledger = _service(args, check="params")  # output paths inside the project
    _setup_env()
    try:
        out = _purge(modality, params, ledger, args.older_than, args.dry_run)
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print("\n".join(summary_lines(out)))
    return 0


def _run_attribution(args: argparse.Namespace, kind: str, overrides: dict[str, Any]) -> int:
    from pipeline_lib.modalities import modality_for_params

    modality = modality_for_params(args.params)
    params = load_params(
        args.params, {**environment_overrides(os.environ), **overrides}
    )  # fails fast
    requests = [_request_pair(params)] if kind == "oracles" else []
    count = (
        ("attribution.n_models (--models)", params.attribution.n_models, True)
        if kind == "subsets"
        else ("attribution.oracles (--count)", params.attribution.oracles, False)
    )
    _check(modality, params, requests, store=count)  # every input, the store's size included
    _setup_env()
    from flows.attribution import attribution_flow

    result = attribution_flow(params_path=args.params, overrides=overrides, kind=kind)
    stats = result["stats"]
    print(f"\nstore {result['store']}")
    if stats.get("models_trained"):
        print(
            f"trained {stats['models_trained']} models in {stats['wall_seconds']:.1f}s "
            f"({stats['models_per_second']:.2f} models/s on {len(stats['nodes'])} node(s), "
            f"orchestration overhead {100 * stats['overhead_fraction']:.1f}%)"
        )
    else:
        print("all models already in the store")
    for key, value in result.get("lds", {}).items():
        print(f"{key}: {value:.4f}")
    print(f"MLflow run {result['run_id']}")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    overrides["attribution.n_models"] = args.models
    if args.alpha is not None:
        overrides["attribution.alpha"] = args.alpha
    return _run_attribution(args, "subsets", overrides)


def cmd_oracles(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    if args.count is not None:
        overrides["attribution.oracles"] = args.count
    return _run_attribution(args, "oracles", overrides)


def cmd_evaluate(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    if args.models is not None:
        overrides["evaluate.n_models"] = args.models
    params = load_params(args.params, {**environment_overrides(os.environ), **overrides})
    from pipeline_lib.methods import get_method
    from pipeline_lib.modalities import modality_for_params

    methods = None
    if args.methods is not None:  # '' is no method, not every method
        methods = [m.strip() for m in args.methods.split(",")]
        if not all(methods):
            raise ConfigError(f"--methods: an empty method name in {args.methods!r}")
        for m in methods:
            get_method(m)  # an unknown name lists the valid ones
    n = params.evaluate.n_models
    request = _request_pair(params)
    _check(
        modality_for_params(args.params),
        params,
        [request],
        store=("evaluate.n_models (--models)", 2 * n, False),
    )
    _check_request_id_in_mlflow(params, *request)

    _setup_env()
    from flows.evaluate import check_methods, default_methods, evaluate_flow

    methods = methods if methods is not None else default_methods()

    check_methods(methods, params)  # fails before any work
    from pipeline_lib.comparison import markdown_table

    result = evaluate_flow(params_path=args.params, overrides=overrides, methods=methods)
    print()
    print(markdown_table(result["rows"]))
    print(f"files: {', '.join(result['files'].values())}")
    print(f"MLflow parent run {result['run_id']} ({params.tracking.mlflow_uri})")
    if result.get("certificate"):
        print(f"the request's certificate, rendered again: {result['certificate']}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Ray Tune search of one method's hyper-parameters on a validation request; the best
    setting becomes a named preset (presets/<dataset>-<model>/<method>.yaml)."""
    overrides = _overrides(args)
    for key, value in (
        ("tune.trials", args.trials),
        ("tune.models", args.models),
        ("tune.objective", args.objective),
    ):
        if value is not None:
            overrides[key] = value
    params = load_params(args.params, {**environment_overrides(os.environ), **overrides})
    from pipeline_lib.modalities import modality_for_params

    request = _request_pair(params)
    _check(
        modality_for_params(args.params),
        params,
        [request],
        store=("evaluate.n_models", 2 * params.evaluate.n_models, False),
    )
    _check_request_id_in_mlflow(params, *request)
    _setup_env()
    from flows.tune import check_tune, tune_flow

    check_tune(args.tune_method, params, args.name, args.overwrite)  # fails before any work

    result = tune_flow(
        params_path=args.params,
        overrides=overrides,
        method=args.tune_method,
        name=args.name,
        overwrite=args.overwrite,
    )
    objective = params.tune.objective
    keys = sorted({k for t in result["trials"] for k in t["config"]})
    print()
    print("| trial | " + " | ".join(keys) + f" | {objective} | KLoM forget P95 | Avg. Gap |")
    print("|---|" + "---|" * (len(keys) + 3))
    for i, t in enumerate(result["trials"]):
        values = [t["config"].get(k) for k in keys]
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
        m = t["metrics"]
        cells += [
            f"{m[x]:.3f}" if x in m else "failed" for x in (objective, "klom_forget_p95", "avg_gap")
        ]
        mark = " (best)" if i == result["best_index"] else (" (start)" if i == 0 else "")
        print(f"| {i}{mark} | " + " | ".join(cells) + " |")
    tuning = result["preset"]["tuning"]
    print(
        f"\nbest {objective} {tuning['score']:.4f} (start setting: {tuning['start_score']}) on "
        f"{tuning['request_id']}; preset written: {result['preset_file']}"
    )
    print(f"use it: unlearn run --preset {result['preset']['preset']} --method {args.tune_method}")
    print(f"MLflow parent run {result['run_id']} ({params.tracking.mlflow_uri})")
    return 0


def _validate_text(args: argparse.Namespace, requests: list) -> int:
    """Text requests (``--params`` an LM params file): resolve each against the corpus the
    params describe: the prepared one under the DVC root when it is there, else the corpus
    prepared afresh in a temporary folder (cheap, and nothing is left behind)."""
    import tempfile

    from pipeline_lib.config.text import load_lm_params
    from pipeline_lib.data.text import (
        PREPARED_DIR,
        extract_forget_docs,
        load_corpus,
        prepare_corpus,
    )

    params = load_lm_params(args.params)
    prepared = params.resolve(PREPARED_DIR)
    with tempfile.TemporaryDirectory(prefix="unlearn-validate-") as tmp:
        if (prepared / "meta.json").is_file():
            corpus, where = load_corpus(prepared), str(prepared)
        else:
            prepare_corpus(params.text, Path(tmp) / "prepared")
            corpus, where = load_corpus(Path(tmp) / "prepared"), f"{params.text.name} (text.*)"
        for source, req in requests:
            forget, retain = extract_forget_docs(req, corpus)
            print(
                f"{source}: ok ({req.request_id}, forget by {req.kind}); {len(forget)} forget / "
                f"{len(retain)} retain documents in {where}"
            )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Schema-check request files; check ids against prepared data when it exists (image
    params), or against the text corpus (LM params: ``pipeline: lm``)."""
    from pipeline_lib.data.requests import check_unique_ids, extract_forget_set, load_request
    from pipeline_lib.modalities import modality_for_params

    requests = [(f, load_request(f)) for f in args.files]
    check_unique_ids(requests)
    if Path(args.params).is_file() and modality_for_params(args.params).name == "text":
        return _validate_text(args, requests)
    prepared = None
    try:
        params = load_params(args.params)
        prepared_dir = params.resolve(params.data.out_dir)
        if (prepared_dir / "meta.json").is_file():
            from pipeline_lib.data.images import load_prepared

            prepared = load_prepared(prepared_dir)
    except ConfigError:
        if args.params != "params.yaml":
            raise
    for source, req in requests:
        line = f"{source}: ok ({req.request_id}, forget by {req.kind})"
        if prepared is not None:
            forget, retain = extract_forget_set(req, prepared)
            line += f"; {len(forget)} forget / {len(retain)} retain in {prepared.meta['dataset']}"
        print(line)
    if prepared is None:
        print(
            "(no prepared data found: ids not checked against the dataset; run `unlearn run` or `dvc repro prepare`)"
        )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Sharded statistics of the original model on a request's split (Ray), saved as
    safetensors with config and content hash."""
    overrides = _overrides(args)
    if args.shards is not None:
        overrides["stats.n_shards"] = args.shards
    if args.workers is not None:
        overrides["stats.workers"] = args.workers
    params = load_params(args.params, {**environment_overrides(os.environ), **overrides})
    from pipeline_lib.modalities import modality_for_params

    _check(modality_for_params(args.params), params, [_request_pair(params)])
    _setup_env()
    from flows.stats import statistics_flow

    result = statistics_flow(
        params_path=args.params,
        overrides=overrides,
        statistic=args.statistic,
        split=args.split,
        force=args.force,
    )
    head = f"\n{args.statistic} statistics of {result['split']} ({result['request_id']}): "
    if result["reused"]:
        print(head + f"{result['n']} samples, already stored (--force recomputes them)")
    else:
        print(
            head + f"{result['n']} samples in {result['shards']} shards, {result['workers']} "
            f"workers, {result['wall_seconds']:.2f}s ({result['samples_per_second']:.1f} samples/s)"
        )
    print(f"MLflow run {result['mlflow_run_id']}")
    print(f"{result['path']} (content hash {result['digest'][:16]})")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from pipeline_lib.methods import METHODS

    for m in METHODS.values():
        needs = "  [needs Fisher statistics]" if m.needs_fisher else ""
        if m.needs_targets:
            needs = f"  [needs an attribution store of {m.needs_targets}]"
        if not m.needs_data:
            needs += "  [reads no training data]"
        if m.class_only:
            needs += "  [class requests]"
        print(f"{m.name:<18} {m.summary}{needs}")
    from pipeline_lib.methods.text import LM_METHODS

    print("\nlanguage models (params-lm.yaml):")
    for m in LM_METHODS.values():
        print(f"{m.name:<18} {m.summary}")
    return 0


#: placeholders for the registered method names in help texts, filled in by _MethodsHelp
_METHODS, _METHODS_SORTED = "<methods>", "<sorted methods>"


class _MethodsHelp(argparse.HelpFormatter):
    """Fills the method names into help texts when help is printed: importing the methods
    (torch) to build the parser would cost every command, ``lineage`` included, seconds."""

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        if _METHODS in text or _METHODS_SORTED in text:
            from pipeline_lib.methods import METHODS

            text = text.replace(_METHODS_SORTED, ", ".join(sorted(METHODS)))
            text = text.replace(_METHODS, ",".join(METHODS))
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints its usage first): exit 2."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unlearn", description="unlearnflow: audited machine unlearning pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="submit a deletion request and process the pending ones against the production model",
        formatter_class=_MethodsHelp,
    )
    exp = sub.add_parser(
        "experiment",
        help="one request as a one-off experiment: fresh original, oracle, method, comparison",
        formatter_class=_MethodsHelp,
    )
    for p in (run, exp):
        p.add_argument(
            "--params", default="params.yaml", help="parameter file (default: params.yaml)"
        )
        p.add_argument("--request", help="deletion request YAML (overrides request.file)")
        p.add_argument(
            "--method",
            help=f"unlearning method (overrides unlearn.method): {_METHODS_SORTED}",
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override any parameter for this run only, e.g. train.epochs=10",
        )
    run.add_argument(
        "--oracle",
        choices=("always", "never", "sampled"),
        default="always",
        help="compare against a retrained oracle (default here: always; service.oracle for sweeps)",
    )
    for p in (run, exp):
        p.add_argument(
            "--preset",
            help="tuned preset (presets/NAME/<method>.yaml, `unlearn tune`); sets unlearn.preset",
        )
    run.set_defaults(func=cmd_run)
    exp.set_defaults(func=cmd_experiment)
    sm = sub.add_parser("submit", help="validate deletion requests and queue them in the ledger")
    sm.add_argument("files", nargs="+")
    sm.add_argument("--params", default="params.yaml")
    sm.set_defaults(func=cmd_submit)
    sw = sub.add_parser("sweep", help="process every pending request now, oldest first")
    sw.add_argument("--max", type=int, help="process at most this many requests")
    sw.add_argument(
        "--purge",
        action="store_true",
        help="then purge artifacts past the retention window (unlearn purge)",
    )
    rt = sub.add_parser(
        "retrain-production",
        help="train the production model from scratch on the data minus the tombstones",
    )
    for p in (sw, rt):
        p.add_argument("--params", default="params.yaml")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter")
    sw.set_defaults(func=cmd_sweep)
    rt.set_defaults(func=cmd_retrain)
    att = sub.add_parser(
        "attribute", help="train M subset models on Ray (datamodels), then measure LDS"
    )
    att.add_argument("--models", type=int, required=True, help="number of subset models M")
    att.add_argument("--alpha", type=float, help="subset fraction (default: attribution.alpha)")
    orc = sub.add_parser("oracles", help="train N oracles on a request's retain set, on Ray")
    orc.add_argument("--request", help="deletion request YAML (overrides request.file)")
    orc.add_argument("--count", type=int, help="number of oracles (default: attribution.oracles)")
    for p in (att, orc):
        p.add_argument("--params", default="params.yaml")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any parameter")
    att.set_defaults(func=cmd_attribute, request=None, method=None)
    orc.set_defaults(func=cmd_oracles, method=None)
    ev = sub.add_parser(
        "evaluate",
        help="compare unlearning methods on a request: N originals vs N oracles (KLoM, accuracy, MIA, cost)",
        formatter_class=_MethodsHelp,
    )
    ev.add_argument("--request", help="deletion request YAML (overrides request.file)")
    ev.add_argument(
        "--methods",
        help=f"comma-separated methods (default: all): {_METHODS}",
    )
    ev.add_argument(
        "--models", type=int, help="N originals and N oracles (default: evaluate.n_models)"
    )
    ev.add_argument("--params", default="params.yaml")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any parameter")
    ev.add_argument(
        "--preset", help="tuned preset: every method it holds runs with its tuned setting"
    )
    ev.set_defaults(func=cmd_evaluate, method=None)
    tu = sub.add_parser(
        "tune",
        help="tune a method's hyper-parameters with Ray Tune on a validation request; "
        "the best setting becomes a preset",
    )
    tu.add_argument(
        "--method", dest="tune_method", metavar="M", required=True, help="the method to tune"
    )
    tu.add_argument("--request", help="validation request YAML (overrides request.file)")
    tu.add_argument("--trials", type=int, help="Ray Tune trials (default: tune.trials)")
    tu.add_argument("--models", type=int, help="originals per trial (default: tune.models)")
    tu.add_argument(
        "--objective",
        # tune.objective's values (pipeline_lib.config.presets.OBJECTIVES, not imported here:
        # the config package is heavy for a parser every command builds)
        choices=("klom_forget_mean", "klom_forget_p95", "avg_gap"),
        help="default: tune.objective",
    )
    tu.add_argument("--name", help="preset name (default: <dataset>-<model>)")
    tu.add_argument(
        "--overwrite", action="store_true", help="replace the method's existing preset file"
    )
    tu.add_argument("--params", default="params.yaml")
    tu.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any parameter")
    tu.set_defaults(func=cmd_tune, method=None, preset=None)
    req = sub.add_parser("requests", help="deletion requests")
    req_sub = req.add_subparsers(dest="requests_command", required=True)
    val = req_sub.add_parser(
        "validate", help="check request files (schema, unique ids, ids in the data)"
    )
    val.add_argument("files", nargs="+")
    val.add_argument("--params", default="params.yaml")
    val.set_defaults(func=cmd_validate)
    ls = req_sub.add_parser("list", help="the ledger: requests and their status")
    ls.add_argument("--status", help="only this status (pending, processing, done, ...)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--params", default="params.yaml")
    ls.set_defaults(func=cmd_requests_list)
    sh = req_sub.add_parser("show", help="one request: status, versions, history")
    sh.add_argument("request_id")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--params", default="params.yaml")
    sh.set_defaults(func=cmd_requests_show)
    rt_req = req_sub.add_parser("retry", help="put a failed request back in the queue")
    rt_req.add_argument("request_id")
    rt_req.add_argument("--reason", default="retry requested", help="recorded in its history")
    rt_req.add_argument("--params", default="params.yaml")
    rt_req.set_defaults(func=cmd_requests_retry)
    pg = sub.add_parser(
        "purge",
        help="delete model artifacts that hold ids forgotten longer ago than the retention window",
    )
    pg.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="retention window in days (default: service.retention_days)",
    )
    pg.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    pg.add_argument("--json", action="store_true")
    pg.add_argument("--params", default="params.yaml")
    pg.set_defaults(func=cmd_purge)
    lin = sub.add_parser(
        "lineage", help="what produced a request, a sample's history, a model version's chain"
    )
    lin_sub = lin.add_subparsers(dest="lineage_command", required=True)
    for name, help_text, metavar in (
        ("request", "a request: history, data and tombstone versions, versions, gates", "ID"),
        ("sample", "a sample: requests that forgot it, versions trained with it", "ID"),
        ("model", "a version's chain of requests back to the last exact version", "NAME@VERSION"),
    ):
        p = lin_sub.add_parser(name, help=help_text)
        p.add_argument("id", metavar=metavar, **({"nargs": "?"} if name == "model" else {}))
        p.add_argument("--json", action="store_true")
        p.add_argument("--params", default="params.yaml")
        if name == "sample":
            p.add_argument("--model", help="registered model (default: service.model_name)")
        p.set_defaults(func=cmd_lineage)
    rx = lin_sub.add_parser(
        "reindex",
        help="index the forgotten ids of the tombstone file (requests done before the index)",
    )
    rx.add_argument("--params", default="params.yaml")
    rx.set_defaults(func=cmd_lineage, json=False)
    st = sub.add_parser("stats", help="sharded statistics of the original model on Ray")
    st.add_argument("statistic", choices=("fisher", "activations"))
    st.add_argument("--split", choices=("retain", "forget"), required=True)
    st.add_argument("--request", help="deletion request YAML (overrides request.file)")
    st.add_argument("--shards", type=int, help="number of Parquet shards (stats.n_shards)")
    st.add_argument("--workers", type=int, help="shard tasks in flight (stats.workers)")
    st.add_argument(
        "--force", action="store_true", help="recompute even if the statistics are stored"
    )
    st.add_argument("--params", default="params.yaml")
    st.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any parameter")
    st.set_defaults(func=cmd_stats, method=None)
    methods = sub.add_parser("methods", help="list the registered unlearning methods")
    methods.set_defaults(func=cmd_methods)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What :func:`main` reports as one line with exit 2: bad parameters, requests or data.
    The request and data errors are those of their modules if loaded (evaluated when an
    error propagates: one whose module was never imported cannot have been raised)."""
    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    for module, name in (
        ("pipeline_lib.data.images", "DataError"),
        ("pipeline_lib.data.requests", "RequestError"),
    ):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "matplotlib", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from tasks import interruption

    try:
        if getattr(args, "params", None):
            from pipeline_lib.params_file import check_params_file

            check_params_file(args.params)  # UTF-8 text, size limit (before any parsing)
        with interruption.interruptible():  # SIGTERM/SIGINT: runs KILLED, Prefect API stopped
            return args.func(args)
    except _user_errors() as exc:
        # one line, whatever the message (a YAML parser's points at the column below)
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"unlearn: error: {message}", file=sys.stderr)
        return 2
    except BaseException as exc:
        if not interruption.is_interruption(exc):
            raise
        print(f"unlearn: {interruption.describe(exc)}; stopped", file=sys.stderr)
        return interruption.exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
