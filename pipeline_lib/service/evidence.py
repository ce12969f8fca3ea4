"""Audit evidence of a deletion request, as pure functions (no stores, no servers).

- :func:`ids_digest`: the sha256 naming a set of sample ids (order-free), the digest logged on
  every request's MLflow run (``forget_ids.sha256``, ``retain_ids.sha256``) and shown by
  ``unlearn lineage``.
- :func:`render_certificate`: the per-request certificate, one self-contained HTML page (the
  report plot embedded as a base64 PNG) from a plain dict of facts gathered by ``tasks/``.
- :func:`retention_due`: whether a tombstone is older than the retention window.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any


def ids_digest(ids: Iterable[Any]) -> str:
    """sha256 of the sorted ids as a compact JSON list (the same encoding as
    :func:`pipeline_lib.service.tombstones.tombstone_digest`, so a request's forget-id digest
    and a tombstone set of the same ids agree)."""
    payload = json.dumps(sorted(str(i) for i in ids), separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def retention_due(forgotten_at: str | datetime, days: float, now: datetime | None = None) -> bool:
    """Whether an id forgotten at ``forgotten_at`` (aware time or ISO string) is past a
    retention window of ``days`` at ``now`` (default: the current UTC time)."""
    at = datetime.fromisoformat(forgotten_at) if isinstance(forgotten_at, str) else forgotten_at
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at + timedelta(days=days) <= (now or datetime.now(UTC))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _table(rows: Iterable[tuple[str, Any]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows
    )
    return f"<table class='kv'>{body}</table>"


def _metrics_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per model; a metric measured over seeded draws (``<k>_std`` beside ``<k>``,
    the draws in ``<k>_draws``: the MIAs) as ``mean ± std``, its column header naming the
    number of draws."""
    columns: list[str] = []
    for m in models.values():
        for k, v in m.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in columns:
                columns.append(k)
    spread = {c[: -len("_std")] for c in columns if c.endswith("_std")} & set(columns)
    columns = [c for c in columns if not (c.endswith("_std") and c[: -len("_std")] in spread)]

    # a spread without draws of its own (avg_gap: one gap per MIA draw) is over the same seeds
    seeds = max(
        (len(v) for m in models.values() for k, v in m.items() if k.endswith("_draws")),
        default=0,
    )

    def header(c: str) -> str:
        if c not in spread:
            return html.escape(c)
        n = max((len(m.get(f"{c}_draws") or []) for m in models.values()), default=0) or seeds
        return f"{html.escape(c)}<br><small>mean ± std, {n} seed{'s' if n != 1 else ''}</small>"

    def cell(m: Mapping[str, Any], c: str) -> str:
        if c in spread and isinstance(m.get(f"{c}_std"), int | float) and c in m:
            return f"{_fmt(m[c])} ± {_fmt(m[f'{c}_std'])}"
        return _fmt(m.get(c, ""))

    return _grid(
        "model", [header(c) for c in columns], models, lambda m: [cell(m, c) for c in columns]
    )


def _grid(
    corner: str,
    heads_html: list[str],
    rows: Mapping[str, Mapping[str, Any]],
    cells: Callable[[Mapping[str, Any]], list[str]],
) -> str:
    """An HTML grid: one row per ``rows`` entry (its name as the row header), the column
    headers already HTML, the cells plain text (escaped here)."""
    head = "".join(f"<th>{h}</th>" for h in heads_html)
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td>{html.escape(c)}</td>" for c in cells(row))
        + "</tr>"
        for name, row in rows.items()
    )
    return f"<table class='grid'><tr><th>{corner}</th>{head}</tr>{body}</table>"


def _klom_section(klom: Mapping[str, Any]) -> list[str]:
    """KLoM of the request's method against an oracle ensemble (``unlearn evaluate``), with
    the oracle-vs-oracle noise floor beside each figure."""
    splits = klom.get("splits") or {}
    floor = klom.get("noise_floor") or {}
    rows = "".join(
        f"<tr><th>{html.escape(split)}</th>"
        + "".join(
            f"<td>{html.escape(_fmt((d or {}).get(stat, '')))}</td>"
            for d in (stats, floor.get(split))
            for stat in ("p95", "mean")
        )
        + "</tr>"
        for split, stats in splits.items()
    )
    match = klom.get("manifests_match")
    note = (
        f"{klom.get('method', '')} applied to {klom.get('n_models', '?')} originals against "
        f"{klom.get('n_models', '?')} oracles retrained without the forgotten ids (`unlearn "
        f"evaluate`, MLflow run {klom.get('run_id', '?')}): the method's KLoM on this "
        "request, not that of the "
        "production model alone (one model gives no distribution of margins). "
        + (
            "Its forget and retain sets are this request's."
            if match
            else "Its forget/retain manifests differ from this request's (other tombstones "
            "or data version): read it as an estimate."
            if match is not None
            else ""
        )
    )
    return [
        "<h2>KLoM against the oracle ensemble</h2>",
        "<table class='grid'><tr><th>split</th><th>KLoM P95</th><th>KLoM mean</th>"
        f"<th>noise floor P95</th><th>noise floor mean</th></tr>{rows}</table>",
        f"<p class='note'>{html.escape(note)}</p>",
        *_ensemble_mia_section(klom.get("mia") or {}, klom.get("n_models")),
    ]


#: Column titles of the ensemble's membership-inference table.
_MIA_COLUMNS = {
    "MIA_efficacy": "MIA efficacy",
    "loss_MIA_AUC": "loss-MIA AUC",
    "avg_gap": "Avg. Gap",
}


def _ensemble_mia_section(mia: Mapping[str, Mapping[str, Any]], n_models: Any) -> list[str]:
    """Membership inference over the ensemble of ``unlearn evaluate`` (one row per model
    kind: the method, the oracles), each figure ``mean ± std`` over N models x S seeds."""
    columns = [c for c in _MIA_COLUMNS if any(c in row for row in mia.values())]
    if not columns:
        return []
    seeds = max((int(r.get("seeds") or 0) for r in mia.values()), default=0)

    def cell(row: Mapping[str, Any], c: str) -> str:
        d = row.get(c)
        if not d:
            return ""
        std = d.get("std")
        return _fmt(d.get("mean")) + ("" if std is None else f" ± {_fmt(std)}")

    heads = [html.escape(_MIA_COLUMNS[c]) for c in columns]
    return [
        "<h3>Membership inference over the ensemble</h3>",
        _grid("models", heads, mia, lambda row: [cell(row, c) for c in columns]),
        f"<p class='note'>mean ± std over {html.escape(str(n_models or '?'))} models × "
        f"{seeds or '?'} seeded draws each; the oracles' row is what exact unlearning gives "
        "(Avg. Gap: the mean distance of UA, RA, TA and MIA efficacy to the oracles').</p>",
    ]


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.5em;border-bottom:2px solid #444}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #bbb;padding:.25em .6em;
text-align:left;font-size:.92em}table.kv th{background:#f3f3f3;width:16em}
table.grid th{background:#f3f3f3}.pass{color:#070;font-weight:bold}.fail{color:#a00;
font-weight:bold}code{font-size:.9em}img{max-width:100%;border:1px solid #ddd}
.note{color:#555;font-size:.9em}
"""


def render_certificate(facts: Mapping[str, Any], plot_png: Path | bytes | None = None) -> str:
    """The certificate of one processed request as a self-contained HTML page.

    ``facts`` keys (missing ones are left out): ``request`` (id, reason, kind, digest),
    ``ids`` (forget count and digest, retain count and digest), ``versions`` (model, parent,
    produced, data version, tombstone version), ``method`` and ``method_params``, ``gates``
    (summary, passed), ``report`` (the evaluation report: ``models`` and ``cost``),
    ``oracle_evaluated``, ``klom`` (KLoM of the method against an oracle ensemble: ``splits``
    and ``noise_floor`` ({split: {p95, mean}}), ``n_models``, ``method``, ``run_id``,
    ``manifests_match``, ``mia``: {row: {metric: {mean, std}, seeds}}), ``mlflow`` (tracking
    URI, run id), ``prefect`` (flow
    run id, URL), ``issued_at``.
    """
    req = facts.get("request", {})
    title = f"Deletion certificate: {req.get('request_id', '?')}"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>issued {html.escape(str(facts.get('issued_at', '')))} by unlearnflow; "
        "every value below is also on the request's MLflow run.</p>",
        "<h2>Request</h2>",
        _table(req.items()),
        "<h2>Forgotten and retained ids</h2>",
        _table(facts.get("ids", {}).items()),
        "<h2>Model versions and data</h2>",
        _table(facts.get("versions", {}).items()),
        "<h2>Method</h2>",
        _table([("method", facts.get("method", "")), *facts.get("method_params", {}).items()]),
    ]
    gates = facts.get("gates")
    if gates:
        cls = "pass" if gates.get("passed") else "fail"
        verdict = "passed" if gates.get("passed") else "failed"
        parts += [
            "<h2>Acceptance gates</h2>",
            f"<p class='{cls}'>{verdict}</p>",
            _table([("gates", gates.get("summary", "")), ("outcome", gates.get("outcome", ""))]),
        ]
    report = facts.get("report") or {}
    if report.get("models"):
        oracle = facts.get("oracle_evaluated")
        parts += [
            "<h2>Metrics" + (" against the oracle" if oracle else "") + "</h2>",
            _metrics_table(report["models"]),
        ]
        if not oracle:
            parts.append(
                "<p class='note'>No oracle (a model retrained without the forgotten ids) was "
                "trained for this request (service.oracle).</p>"
            )
        if any(k.endswith("_draws") for m in report["models"].values() for k in m):
            parts.append(
                "<p class='note'>Membership-inference figures are random (the attack's "
                "subsample and folds depend on a seed): each is the mean ± standard deviation "
                "of seeded draws (evaluate.seed, seed + 1, …; evaluate.mia_seeds).</p>"
            )
    if facts.get("klom"):
        parts += _klom_section(facts["klom"])
    if report.get("cost"):
        parts += ["<h2>Cost</h2>", _table(report["cost"].items())]
    if plot_png is not None:
        data = plot_png if isinstance(plot_png, bytes) else Path(plot_png).read_bytes()
        b64 = base64.b64encode(data).decode()
        parts += [
            "<h2>Evaluation plot</h2>",
            f"<img alt='report plot' src='data:image/png;base64,{b64}'>",
        ]
    trace = {**facts.get("mlflow", {}), **facts.get("prefect", {})}
    if trace:
        parts += ["<h2>Trace</h2>", _table(trace.items())]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
