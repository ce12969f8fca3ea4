"""Bad inputs are refused up front: exit 2, one line naming the file and the column or key,
and nothing written.

Data tables go through the DVC stage entry (``python -m pipeline_lib.stages prepare``) with a
params file pointing ``data.name: parquet`` at the bad table; request files go through
``unlearn requests validate``. Each case starts from a valid input and breaks one thing; the
valid inputs themselves are checked to pass, so every refusal is the defect's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main as cli_main
from pipeline_lib.data.requests import MAX_REASON_CHARS, MAX_REQUEST_BYTES
from pipeline_lib.stages import main as stage_main

N = 12  # rows of a valid table: labels 0, 1, 2, each four times


def _columns() -> dict[str, list]:
    return {
        "sample_id": [f"s{i:02d}" for i in range(N)],
        "label": [i % 3 for i in range(N)],
        "features": [[float(i), 0.5, -1.0] for i in range(N)],
    }


def _set(column: str, row: int, value: object) -> Callable[[dict], None]:
    def edit(cols: dict) -> None:
        cols[column][row] = value

    return edit


def _drop(column: str) -> Callable[[dict], None]:
    return lambda cols: cols.pop(column)


def _replace(column: str, values: Callable[[list], list]) -> Callable[[dict], None]:
    def edit(cols: dict) -> None:
        cols[column] = values(cols[column])

    return edit


def _numeric_columns_with(value: float) -> Callable[[dict], None]:
    def edit(cols: dict) -> None:
        cols.pop("features")
        cols["width"] = [1.0] * N
        cols["height"] = [2.0] * N
        cols["height"][5] = value

    return edit


# (case id, edit of the valid columns (bytes: the whole file; "truncate", "zero-rows": the
# valid table cut short or emptied), expected parts of the message)
TABLE_CASES: list[tuple[str, Callable[[dict], None] | bytes | str, tuple[str, ...]]] = [
    ("missing-label-column", _drop("label"), ("missing required column", "label")),
    ("missing-sample_id-column", _drop("sample_id"), ("missing required column", "sample_id")),
    ("ragged-features", _set("features", 4, [1.0, 2.0]), ("column features", "ragged", "row 4")),
    ("null-feature-row", _set("features", 2, None), ("column features", "null")),
    ("null-inside-features", _set("features", 2, [1.0, None, 3.0]), ("features", "null")),
    ("duplicate-ids", _set("sample_id", 7, "s01"), ("sample_id", "not unique", "'s01'")),
    ("null-sample_id", _set("sample_id", 3, None), ("column sample_id", "null", "row 3")),
    ("empty-sample_id", _set("sample_id", 3, ""), ("column sample_id", "empty id")),
    ("zero-rows", "zero-rows", ("the table has no rows",)),
    ("null-label", _set("label", 5, None), ("column label", "null", "row 5")),
    (
        "fractional-float-label",
        _replace("label", lambda v: [x + 0.5 for x in v]),
        ("column label", "integer class indices", "0.5"),
    ),
    (
        "string-label",
        _replace("label", lambda v: [str(x) for x in v]),
        ("column label", "integer class indices", "string"),
    ),
    ("negative-label", _set("label", 6, -1), ("column label", "non-negative", "-1")),
    (
        "labels-1-to-k",
        _replace("label", lambda v: [x + 1 for x in v]),
        ("column label", "contiguous", "class 0 has no rows"),
    ),
    (
        "label-gap",
        _replace("label", lambda v: [3 if x == 2 else x for x in v]),
        ("column label", "class 2 has no rows"),
    ),
    ("nan-feature", _set("features", 8, [float("nan"), 0.5, -1.0]), ("features", "non-finite")),
    ("inf-feature", _set("features", 8, [1.0, float("inf"), -1.0]), ("features", "non-finite")),
    (
        "nan-in-a-numeric-column",
        _numeric_columns_with(float("nan")),
        ("column height", "1 non-finite", "row 5"),
    ),
    (
        "inf-in-a-numeric-column",
        _numeric_columns_with(float("-inf")),
        ("column height", "non-finite"),
    ),
    ("bad-split-value", lambda c: c.update(split=["train"] * (N - 1) + ["val"]), ("'val'",)),
    ("csv-not-parquet", b"sample_id,label,x\ns0,0,1.0\n", ("not a readable Parquet table",)),
    ("empty-file", b"", ("not a readable Parquet table",)),
    ("truncated-parquet", "truncate", ("not a readable Parquet table",)),
]


def _write_table(path: Path, edit: Callable[[dict], None] | bytes | str) -> None:
    if isinstance(edit, bytes):
        path.write_bytes(edit)
        return
    if edit == "truncate":
        pq.write_table(pa.table(_columns()), path)
        path.write_bytes(path.read_bytes()[:-20])
        return
    if edit == "zero-rows":
        pq.write_table(pa.table(_columns()).slice(0, 0), path)
        return
    cols = _columns()
    edit(cols)
    pq.write_table(pa.table(cols), path)


def _prepare(tmp_path: Path, table: Path) -> tuple[list[str], Path]:
    out = tmp_path / "out" / "prepared"
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {"data": {"name": "parquet", "path": str(table), "out_dir": str(out), "seed": 0}}
        )
    )
    return ["prepare", "--params", str(params)], out


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_the_valid_table_prepares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    table = tmp_path / "table.parquet"
    _write_table(table, lambda cols: None)
    argv, out = _prepare(tmp_path, table)
    assert stage_main(argv) == 0
    assert (out / "samples.parquet").is_file() and (out / "meta.json").is_file()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [pytest.param(edit, expected, id=name) for name, edit, expected in TABLE_CASES],
)
def test_bad_table_is_refused_before_any_work(
    edit, expected, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    table = tmp_path / "bad-table.parquet"
    _write_table(table, edit)
    argv, out = _prepare(tmp_path, table)
    before = _listing(tmp_path)
    capsys.readouterr()

    assert stage_main(argv) == 2

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(table) in lines[0]
    for part in expected:
        assert part in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not out.parent.exists()
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- requests


def _request(reason: str = "GDPR Art. 17") -> str:
    return yaml.safe_dump({"request_id": "r1", "reason": reason, "forget": {"classes": [1]}})


REQUEST_CASES: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("binary", bytes(range(256)) * 8, ("not a text file", "UTF-8")),
    ("nul-bytes", b"request_id: r1\x00\x00\n", ("not a text file", "NUL")),
    ("latin-1", "reason: \u00e9rasure\n".encode("latin-1"), ("not a text file", "UTF-8")),
    (
        "over-1-MB",
        _request().encode() + b"#" + b"x" * MAX_REQUEST_BYTES + b"\n",
        ("request file is", "limit is 1,000,000 bytes"),
    ),
    (
        "reason-too-long",
        _request("x" * (MAX_REASON_CHARS + 1)).encode(),
        ("reason is 2001 characters long", "limit is 2000"),
    ),
]


def test_a_request_at_the_limits_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml, no prepared data: schema checks only
    path = tmp_path / "req.yaml"
    path.write_text(_request("x" * MAX_REASON_CHARS))
    assert cli_main(["requests", "validate", str(path)]) == 0
    assert "ok (r1, forget by classes)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "expected"),
    [pytest.param(content, expected, id=name) for name, content, expected in REQUEST_CASES],
)
def test_bad_request_file_is_refused(
    content: bytes, expected, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "req.yaml"
    path.write_bytes(content)
    before = _listing(tmp_path)
    capsys.readouterr()

    assert cli_main(["requests", "validate", str(path)]) == 2

    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("unlearn: error: ") and str(path) in lines[0]
    for part in expected:
        assert part in lines[0], lines[0]
    assert "ok (" not in captured.out
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- the battery
#
# Each case runs one `unlearn` command line in a copy of the project (a real DVC repo with
# prepared digits, a dvc.lock, a SQLite MLflow store holding one run, the request ledger in
# the same database holding one request, earlier run directories, artifacts and reports)
# with one bad input: a request, a params file, a --set, an environment variable, a data
# table, a count. Each must exit 2 with exactly one line on stderr naming the problem,
# without a traceback, and leave every file of the project byte-for-byte as it was.

USED_IN_LEDGER = "req-in-ledger"
USED_IN_MLFLOW = "req-in-mlflow"
USED_IN_RUNS = "req-run-before"
VARIANT = "data-0123456789ab"


def _req(rid: str = "req-battery", forget: str = "fraction: 0.1", reason: str = "erase") -> bytes:
    return f"request_id: {rid}\nreason: {reason}\nforget:\n  {forget}\n".encode()


def _table_bytes(edit) -> Callable[[Path], None]:
    return lambda path: _write_table(path, edit)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The project copy every battery case runs in, and a test-split id of its data."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from pipeline_lib.data.requests import parse_request
    from tasks.ledger import Ledger
    from tests.conftest import REPO, make_dvc_project

    root = make_dvc_project(
        tmp_path_factory.mktemp("battery") / "project", (REPO / "params.yaml").read_text()
    )
    for name in ("example.yaml", "forget-play.yaml"):
        (root / "requests" / name).write_bytes((REPO / "requests" / name).read_bytes())
    (root / "params-lm.yaml").write_bytes((REPO / "params-lm.yaml").read_bytes())
    (root / "lm").mkdir()
    (root / "lm" / "dvc.yaml").write_bytes((REPO / "lm" / "dvc.yaml").read_bytes())
    subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "-q", "prepare"],
        cwd=root,
        check=True,
        capture_output=True,
        env={
            **os.environ,
            "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        },
    )
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("unlearnflow")
    run = client.create_run(exp, tags={"request_id": USED_IN_MLFLOW, "request_digest": "0" * 64})
    client.set_terminated(run.info.run_id)
    ledger = Ledger(uri)
    ledger.submit(parse_request(yaml.safe_load(_req(USED_IN_LEDGER))), "unlearnflow-digits")
    ledger.close()
    before = root / "runs" / "image" / USED_IN_RUNS
    before.mkdir(parents=True)
    (before / "request.yaml").write_bytes(_req(USED_IN_RUNS, "classes: [1]"))
    (root / "runs" / "image" / VARIANT).mkdir()
    (root / "runs" / "image" / VARIANT / "params.yaml").write_text("data: {}\n")
    for d in ("artifacts/models", "reports/unlearnflow-digits/r0"):
        (root / d).mkdir(parents=True)
    (root / "artifacts/models/earlier.safetensors").write_bytes(b"weights of an earlier run")
    (root / "reports/unlearnflow-digits/r0/report.json").write_text("{}\n")
    table = pq.read_table(root / "data/prepared/samples.parquet", columns=["sample_id", "split"])
    test_id = table.column("sample_id").to_pylist()[table.column("split").to_pylist().index("test")]
    return {"root": root, "test_id": test_id}


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of the project (tracked files, data/, artifacts/, reports/,
    requests/, runs/, the MLflow and ledger database), by relative path."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and "__pycache__" not in rel.parts and rel.parts[:2] != (".dvc", "tmp"):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


CUDA = False
try:  # the device case only means something without CUDA
    import torch

    CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    pass

# (id, argv, expected parts of the one line, files written in the case's own temporary
# directory (outside the project): name -> bytes or a writer, environment)
Case = tuple[str, list[str], tuple[str, ...], dict, dict]


def _run_set(*items: str) -> list[str]:
    out = ["run"]
    for item in items:
        out += ["--set", item]
    return out


def _case(id_, argv, expected, files=None, env=None) -> Case:
    return (id_, argv, expected, files or {}, env or {})


SET_CASES: list[Case] = [
    _case("lr-inf", _run_set("train.lr=inf"), ("train.lr", "finite")),
    _case("lr-nan", _run_set("train.lr=.nan"), ("train.lr", "nan")),
    _case("lr-1e400", _run_set("train.lr=1e400"), ("train.lr", "finite")),
    _case("lr-negative", _run_set("train.lr=-1"), ("train.lr", "> 0")),
    _case("lr-string", _run_set("train.lr=fast"), ("train.lr",)),
    _case("epochs-zero", _run_set("train.epochs=0"), ("train.epochs",)),
    _case("epochs-float", _run_set("train.epochs=2.5"), ("train.epochs", "integer")),
    _case("epochs-bool", _run_set("train.epochs=true"), ("train.epochs",)),
    _case("batch-size-zero", _run_set("train.batch_size=0"), ("train.batch_size",)),
    _case("optimizer", _run_set("train.optimizer=adamw"), ("train.optimizer", "adamw")),
    _case("device-tpu", _run_set("train.device=tpu"), ("train.device", "tpu")),
    _case("train-seed-negative", _run_set("train.seed=-1"), ("train.seed", "seed")),
    _case("train-seed-2-32", _run_set("train.seed=4294967296"), ("train.seed", "2**32")),
    _case("oracle-seed", _run_set("train.oracle_seed=-3"), ("train.oracle_seed",)),
    _case("data-seed", _run_set("data.seed=-1"), ("data.seed", "seed")),
    _case("unlearn-seed", _run_set("unlearn.seed=-1"), ("unlearn.seed",)),
    _case("originals-seed", _run_set("evaluate.originals_seed=-5"), ("evaluate.originals_seed",)),
    _case(
        "mnemonic-without-codes",
        _run_set("unlearn.method=mnemonic_code"),
        ("unlearn.method", "train.mnemonic_t_mix"),
    ),
    _case("hidden-negative", _run_set("model.hidden=[-5]"), ("model.hidden[0]", "> 0")),
    _case("hidden-zero", _run_set("model.hidden=[64, 0]"), ("model.hidden[1]",)),
    _case("hidden-string", _run_set("model.hidden=wide"), ("model.hidden",)),
    _case("channels-negative", _run_set("model.channels=[16, -1]"), ("model.channels[1]",)),
    _case("model-name", _run_set("model.name=resnet"), ("resnet",)),
    _case(
        "vit-patch-on-8x8",
        _run_set("model.name=vit", "model.vit_patch=3"),
        ("model.vit_patch", "(1, 8, 8)"),
    ),
    _case(
        "vit-heads",
        _run_set("model.name=vit", "model.vit_patch=4", "model.vit_heads=3"),
        ("model.vit_heads", "vit_dim=64"),
    ),
    _case(
        "cnn-on-a-feature-table",
        _run_set("model.name=cnn", "data.name=parquet", "data.path={tmp}/t.parquet"),
        ("model.name", "cnn needs image inputs", "(3,)"),
        {"t.parquet": _table_bytes(lambda cols: None)},
    ),
    _case("data-name", _run_set("data.name=imagenet"), ("data.name", "imagenet")),
    _case("parquet-without-path", _run_set("data.name=parquet"), ("data.path",)),
    _case("parquet-nope", _run_set("data.name=parquet", "data.path=/nope"), ("data.path", "/nope")),
    _case(
        "fashion-mnist-nope",
        _run_set("data.name=fashion-mnist", "data.path=/nope/fmnist"),
        ("data.path", "/nope/fmnist", "does not exist"),
    ),
    _case("test-fraction-1.5", _run_set("data.test_fraction=1.5"), ("data.test_fraction",)),
    _case("test-fraction-0", _run_set("data.test_fraction=0"), ("data.test_fraction",)),
    _case("max-train-0", _run_set("data.max_train=0"), ("data.max_train",)),
    _case("data-path-number", _run_set("data.path=42"), ("data.path",)),
    _case("out-dir-up", _run_set("data.out_dir=../x"), ("data.out_dir", "outside the project")),
    _case("out-dir-abs", _run_set("data.out_dir=/tmp/elsewhere"), ("data.out_dir", "outside")),
    _case("manifests-up", _run_set("request.out_dir=../../f"), ("request.out_dir", "outside")),
    _case("report-dir-abs", _run_set("evaluate.report_dir=/etc/r"), ("evaluate.report_dir",)),
    _case("artifacts-up", _run_set("tracking.artifacts_dir=.."), ("tracking.artifacts_dir",)),
    _case("attribution-dir", _run_set("attribution.out_dir=../a"), ("attribution.out_dir",)),
    _case("stats-dir", _run_set("stats.out_dir=../../s"), ("stats.out_dir", "outside")),
    _case(
        "uri-scheme", _run_set("tracking.mlflow_uri=bogus://x"), ("tracking.mlflow_uri", "bogus")
    ),
    _case("uri-colon", _run_set("tracking.mlflow_uri=mailto:me"), ("tracking.mlflow_uri",)),
    _case(
        "uri-sqlite-dir",
        _run_set("tracking.mlflow_uri=sqlite:////no/such/dir/m.db"),
        ("tracking.mlflow_uri", "/no/such/dir", "does not exist"),
    ),
    _case("dvc-root-missing", _run_set("tracking.dvc_root=/no/such/root"), ("tracking.dvc_root",)),
    _case("dvc-root-not-dvc", _run_set("tracking.dvc_root={tmp}"), ("tracking.dvc_root", "DVC")),
    _case("unknown-key", _run_set("train.lrr=0.1"), ("train.lrr", "unknown key")),
    _case("unknown-section", _run_set("foo.bar=1"), ("foo",)),
    _case("set-without-equals", _run_set("train.lr"), ("--set", "KEY=VALUE")),
    _case("set-empty-key", _run_set("=3"), ("--set", "key is empty")),
    _case("set-bad-yaml", _run_set("train.lr=[1"), ("--set", "not valid YAML")),
    _case("method-name", _run_set("unlearn.method=nope"), ("nope", "valid")),
    _case("method-flag", ["run", "--method", "nope"], ("nope", "valid")),
    _case("top-fraction", _run_set("unlearn.fisher_diagonal.top_fraction=2"), ("top_fraction",)),
    _case("fisher-kind", _run_set("fisher.kind=bogus"), ("fisher.kind", "bogus")),
    _case("ssd-alpha-inf", _run_set("unlearn.ssd.alpha=inf"), ("unlearn.ssd.alpha", "finite")),
    _case(
        "gate-band-inf",
        _run_set("service.gates.mia_auc_band=[0.2, .inf]"),
        ("service.gates.mia_auc_band[1]", "inf"),
    ),
    _case("service-oracle", _run_set("service.oracle=sometimes"), ("service.oracle",)),
    _case("oracle-rate", _run_set("service.oracle_sample_rate=2"), ("service.oracle_sample_rate",)),
    _case("ledger-url", _run_set("service.ledger_url=bogus"), ("ledger URL",)),
    _case("mia-folds", _run_set("evaluate.mia_folds=1"), ("evaluate.mia_folds",)),
    _case("attribution-alpha", _run_set("attribution.alpha=1.0"), ("attribution.alpha",)),
    _case(
        "env-tracking-uri",
        ["run"],
        ("tracking.mlflow_uri", "MLFLOW_TRACKING_URI", "nope"),
        env={"MLFLOW_TRACKING_URI": "nope://db"},
    ),
]
if not CUDA:
    SET_CASES.append(_case("device-cuda", _run_set("train.device=cuda"), ("train.device", "CUDA")))

PARAMS_CASES: list[Case] = [
    _case("params-missing", ["run", "--params", "{tmp}/none.yaml"], ("params file not found",)),
    _case(
        "params-bad-yaml",
        ["run", "--params", "{tmp}/p.yaml"],
        ("p.yaml", "not valid YAML"),
        {"p.yaml": b"train: [1\n"},
    ),
    _case(
        "params-a-list",
        ["run", "--params", "{tmp}/p.yaml"],
        ("p.yaml", "mapping"),
        {"p.yaml": b"- 1\n- 2\n"},
    ),
    _case(
        "params-binary",
        ["run", "--params", "{tmp}/p.yaml"],
        ("p.yaml", "not a text file"),
        {"p.yaml": bytes(range(256))},
    ),
    _case(
        "params-too-large",
        ["run", "--params", "{tmp}/p.yaml"],
        ("p.yaml", "limit is 1,000,000 bytes"),
        {"p.yaml": b"#" * 1_000_001},
    ),
    _case(
        "params-unknown-section",
        ["run", "--params", "{tmp}/p.yaml"],
        ("nonsense",),
        {"p.yaml": b"nonsense: {a: 1}\n"},
    ),
    _case(
        "params-section-not-mapping",
        ["run", "--params", "{tmp}/p.yaml"],
        ("train",),
        {"p.yaml": b"train: 5\n"},
    ),
    _case(
        "params-bad-pipeline",
        ["run", "--params", "{tmp}/p.yaml"],
        ("pipeline",),
        {"p.yaml": b"pipeline: video\n"},
    ),
    _case(
        "params-lr-inf-in-file",
        ["sweep", "--params", "{tmp}/p.yaml"],
        ("train.lr", "finite"),
        {"p.yaml": b"train: {lr: .inf}\n"},
    ),
]


def _run_request(content: bytes | str, *extra: str) -> tuple[list[str], dict]:
    return ["run", "--request", "{tmp}/r.yaml", *extra], {"r.yaml": content}


def _request_case(id_, content, expected, *extra) -> Case:
    argv, files = _run_request(content, *extra)
    return _case(id_, argv, ("r.yaml", *expected), files)


REQUEST_FILE_CASES: list[Case] = [
    _case("request-missing", ["run", "--request", "{tmp}/none.yaml"], ("none.yaml",)),
    _request_case("request-binary", bytes(range(256)) * 8, ("not a text file",)),
    _request_case("request-nul", b"request_id: r1\x00\n", ("NUL",)),
    _request_case("request-latin-1", "reason: \u00e9\n".encode("latin-1"), ("UTF-8",)),
    _request_case("request-50-MB", b"#" * 50_000_000, ("limit is 1,000,000 bytes",)),
    _request_case("reason-too-long", _req(reason="x" * (MAX_REASON_CHARS + 1)), ("limit is 2000",)),
    _request_case("request-bad-yaml", b"request_id: [r1\n", ("YAML",)),
    _request_case("request-a-list", b"- 1\n", ("mapping",)),
    _request_case("request-unknown-key", _req() + b"owner: me\n", ("unknown key 'owner'",)),
    _request_case("request-no-id", b"reason: x\nforget: {fraction: 0.1}\n", ("request_id",)),
    _request_case("request-id-path", _req("../escape"), ("request_id",)),
    _request_case("request-id-slash", _req("a/b"), ("request_id",)),
    _request_case("request-empty-reason", _req(reason="''"), ("reason",)),
    _request_case("forget-empty", b"request_id: r\nreason: x\nforget: {}\n", ("forget",)),
    _request_case(
        "forget-two-kinds",
        b"request_id: r\nreason: x\nforget: {fraction: 0.1, classes: [1]}\n",
        ("exactly one",),
    ),
    _request_case("fraction-zero", _req(forget="fraction: 0"), ("forget.fraction",)),
    _request_case("fraction-above-1", _req(forget="fraction: 1.5"), ("forget.fraction",)),
    _request_case("classes-empty", _req(forget="classes: []"), ("forget.classes",)),
    _request_case("classes-negative", _req(forget="classes: [-1]"), ("forget.classes",)),
    _request_case("classes-repeated", _req(forget="classes: [1, 1]"), ("repeats",)),
    _request_case("class-absent", _req(forget="classes: [99]"), ("[99]", "no training samples")),
    _request_case(
        "forget-everything",
        _req(forget="classes: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"),
        ("whole training split",),
    ),
    _request_case("unknown-ids", _req(forget="sample_ids: [nope-1]"), ("unknown sample id",)),
    _request_case("test-split-id", _req(forget="sample_ids: [{test_id}]"), ("test split",)),
    _request_case("groups-on-images", _req(forget="groups: [macbeth]"), ("text corpora",)),
    _request_case(
        "id-of-tracked-file",
        _req("forget-play"),
        ("forget-play", "requests/forget-play.yaml"),
    ),
    _request_case(
        "id-of-other-request-file",
        _req("req-example-0001", "classes: [2]"),
        ("req-example-0001", "requests/example.yaml"),
    ),
    _request_case("id-used-by-earlier-run", _req(USED_IN_RUNS), (USED_IN_RUNS, "different")),
    _request_case("id-of-data-variant", _req(VARIANT), (VARIANT, "not a request")),
    _request_case("id-in-ledger", _req(USED_IN_LEDGER, "classes: [3]"), ("already in the ledger",)),
    _case(
        "id-in-mlflow",
        ["experiment", "--request", "{tmp}/r.yaml"],
        ("r.yaml", "duplicate request_id", USED_IN_MLFLOW),
        {"r.yaml": _req(USED_IN_MLFLOW)},
    ),
    _case(
        "submit-id-in-ledger",
        ["submit", "{tmp}/r.yaml"],
        ("r.yaml", "already in the ledger"),
        {"r.yaml": _req(USED_IN_LEDGER, "classes: [4]")},
    ),
    _case(
        "submit-same-id-twice",
        ["submit", "{tmp}/a.yaml", "{tmp}/b.yaml"],
        ("duplicate request_id", "a.yaml", "b.yaml"),
        {"a.yaml": _req("twin"), "b.yaml": _req("twin", "classes: [1]")},
    ),
    _case(
        "submit-unknown-ids",
        ["submit", "{tmp}/r.yaml"],
        ("r.yaml", "unknown sample id"),
        {"r.yaml": _req(forget="sample_ids: [digits-9999]")},
    ),
    _case(
        "stats-class-absent",
        ["stats", "fisher", "--split", "forget", "--request", "{tmp}/r.yaml"],
        ("r.yaml", "no training samples"),
        {"r.yaml": _req(forget="classes: [10]")},
    ),
    _case(
        "oracles-forget-everything",
        ["oracles", "--request", "{tmp}/r.yaml"],
        ("r.yaml", "whole training split"),
        {"r.yaml": _req(forget="fraction: 0.9999")},
    ),
]

COUNT_CASES: list[Case] = [
    _case("attribute-1e8-models", ["attribute", "--models", "100000000"], ("--models", "memory")),
    _case("attribute-0-models", ["attribute", "--models", "0"], ("attribution.n_models",)),
    _case("attribute-negative", ["attribute", "--models", "-5"], ("attribution.n_models",)),
    _case("attribute-not-int", ["attribute", "--models", "abc"], ("--models", "invalid int")),
    _case("attribute-no-models", ["attribute"], ("--models", "required")),
    _case("attribute-alpha", ["attribute", "--models", "64", "--alpha", "1.5"], ("alpha",)),
    _case("oracles-0", ["oracles", "--count", "0"], ("attribution.oracles",)),
    _case("oracles-1e11", ["oracles", "--count", "100000000000"], ("--count", "memory")),
    _case("evaluate-methods-empty", ["evaluate", "--methods", ""], ("--methods", "empty")),
    _case("evaluate-methods-gap", ["evaluate", "--methods", "ssd,,finetune"], ("--methods",)),
    _case("evaluate-methods-unknown", ["evaluate", "--methods", "nope"], ("nope", "valid")),
    _case("evaluate-models-2", ["evaluate", "--models", "2"], ("evaluate.n_models",)),
    _case("evaluate-models-1e10", ["evaluate", "--models", "10000000000"], ("memory",)),
    _case(
        "stats-shards-0", ["stats", "fisher", "--split", "retain", "--shards", "0"], ("n_shards",)
    ),
    _case(
        "stats-workers-0", ["stats", "fisher", "--split", "retain", "--workers", "0"], ("workers",)
    ),
    _case(
        "stats-split", ["stats", "fisher", "--split", "everything"], ("--split", "invalid choice")
    ),
    _case("stats-statistic", ["stats", "hessian", "--split", "retain"], ("invalid choice",)),
    _case("sweep-max-0", ["sweep", "--max", "0"], ("--max", ">= 1")),
    _case("sweep-max-negative", ["sweep", "--max", "-2"], ("--max",)),
    _case("purge-negative-days", ["purge", "--older-than", "-1"], ("--older-than",)),
    _case("purge-outside", ["purge", "--set", "x=1"], ("unrecognized arguments",)),
    _case("run-oracle-choice", ["run", "--oracle", "sometimes"], ("--oracle", "invalid choice")),
    _case("unknown-command", ["train"], ("invalid choice",)),
    _case("retry-unknown", ["requests", "retry", "nope"], ("'nope'", "not in the ledger")),
    _case("retry-not-failed", ["requests", "retry", USED_IN_LEDGER], ("pending",)),
    _case("show-unknown", ["requests", "show", "nope"], ("'nope'", "not in the ledger")),
]

TABLE_CLI_CASES: list[Case] = [
    _case(
        f"table-{name}",
        _run_set("data.name=parquet", "data.path={tmp}/t.parquet"),
        ("t.parquet", *expected),
        {"t.parquet": _table_bytes(edit)},
    )
    for name, edit, expected in TABLE_CASES
]

LM = ["run", "--params", "params-lm.yaml"]
LM_CASES: list[Case] = [  # the language-model pipeline: the corpus prepared in a temporary folder
    _case(
        "lm-unknown-group",
        [*LM, "--request", "{tmp}/r.yaml"],
        ("r.yaml", "unknown group", "nosuchplay"),
        {"r.yaml": _req(forget="groups: [nosuchplay]")},
    ),
    _case(
        "lm-unknown-document",
        [*LM, "--request", "{tmp}/r.yaml"],
        ("r.yaml", "unknown document id", "nosuch/1.1"),
        {"r.yaml": _req(forget="sample_ids: [nosuch/1.1]")},
    ),
    _case(
        "lm-id-of-tracked-file",
        [*LM, "--request", "{tmp}/r.yaml"],
        ("r.yaml", "requests/forget-play.yaml"),
        {"r.yaml": _req("req-lm-macbeth-0001", "groups: [hamlet]")},
    ),
    _case("lm-lr-inf", [*LM, "--set", "train.lr=inf"], ("train.lr", "finite")),
    _case("lm-heads", [*LM, "--set", "lm.n_head=3"], ("lm.n_embd", "multiple of lm.n_head")),
    _case("lm-corpus-name", [*LM, "--set", "text.name=nope"], ("text.name", "nope")),
    _case("lm-report-outside", [*LM, "--set", "evaluate.report_dir=../r"], ("outside",)),
]

BATTERY = SET_CASES + PARAMS_CASES + REQUEST_FILE_CASES + COUNT_CASES + TABLE_CLI_CASES + LM_CASES


def test_the_battery_has_over_100_distinct_cases() -> None:
    ids = [c[0] for c in BATTERY]
    assert len(ids) == len(set(ids))
    assert len({(tuple(c[1]), tuple(sorted(map(str, c[3].items())))) for c in BATTERY}) == len(ids)
    assert len(ids) >= 100, len(ids)


def _fill(text: str, tmp: Path, project: dict) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{test_id}", project["test_id"])


@pytest.mark.parametrize(
    ("argv", "expected", "files", "env"),
    [pytest.param(a, e, f, v, id=i) for i, a, e, f, v in BATTERY],
)
def test_bad_input_exits_2_before_any_work(
    argv, expected, files, env, project, tmp_path, monkeypatch, capsys
) -> None:
    root = project["root"]
    for name, content in files.items():
        if callable(content):
            content(tmp_path / name)
        else:
            if isinstance(content, str):
                content = content.encode()
            (tmp_path / name).write_bytes(
                _fill(content.decode("latin-1"), tmp_path, project).encode("latin-1")
            )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(root)
    before = _snapshot(root)
    capsys.readouterr()

    with pytest.raises(SystemExit) if _argparse_error(argv, expected) else _no_raise() as exit_:
        code = cli_main([_fill(a, tmp_path, project) for a in argv])
    if exit_ is not None:
        code = exit_.value.code

    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for part in expected:
        assert _fill(part, tmp_path, project) in lines[0], lines[0]
    assert _snapshot(root) == before
    assert "prefect" not in captured.out.lower()


def _argparse_error(argv: list[str], expected: tuple[str, ...]) -> bool:
    return any(
        p in ("invalid int", "required", "invalid choice", "unrecognized arguments")
        for p in expected
    )


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_the_console_script_prints_one_line(project, tmp_path) -> None:
    """In-process, pytest holds the log handlers: through the real `unlearn` script, stderr
    (logging included) is the one error line for a refusal found in the data (a temporary
    preparation ran) and for one found in a count."""
    import subprocess
    import sys

    root = project["root"]
    _write_table(tmp_path / "t.parquet", _set("label", 5, None))
    before = _snapshot(root)
    exe = str(Path(sys.executable).parent / "unlearn")
    for argv, part in (
        (["run", "--set", "data.name=parquet", "--set", f"data.path={tmp_path}/t.parquet"], "null"),
        (["attribute", "--models", "100000000"], "memory"),
    ):
        proc = subprocess.run([exe, *argv], cwd=root, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and part in proc.stderr, proc.stderr
    assert _snapshot(root) == before
