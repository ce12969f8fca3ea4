"""Bad inputs are refused up front: exit 2, one line naming the file and the column or key,
and nothing written.

Data tables go through the DVC stage entry (``python -m pipeline_lib.stages prepare``) with a
params file pointing ``data.name: parquet`` at the bad table; request files go through
``unlearn requests validate``. Each case starts from a valid input and breaks one thing; the
valid inputs themselves are checked to pass, so every refusal is the defect's.
"""

from __future__ import annotations

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
