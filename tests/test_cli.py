"""The `unlearn` CLI rejects bad input before any work starts, listing valid choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from pipeline_lib.methods import METHODS
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["run", "--method", "nope"],
            "unknown name 'nope'; valid: " + ", ".join(sorted(METHODS)),
        ),
        (["run", "--set", "data.name=cifar"], "valid: digits, fashion-mnist, parquet"),
        (["run", "--set", "model.name=resnet"], "valid: cnn, mlp, vit"),
        (["run", "--set", "train.lrr=1"], "unknown key train.lrr; valid keys of train:"),
        (["run", "--set", "train.epochs=ten"], "train.epochs: expected an integer"),
        (["run", "--set", "noequals"], "expected KEY=VALUE"),
        (["run", "--params", "missing.yaml"], "params file not found: missing.yaml"),
        (["run", "--request", "/nonexistent/req.yaml"], "request file not found"),
        (["evaluate", "--methods", "dmm,nope"], "unknown unlearning method 'nope'"),
        (["evaluate", "--methods", "dmm,dmm"], "repeats a method"),
        (["evaluate", "--methods", "svd_projection"], "forgets whole classes"),
        (["evaluate", "--models", "2"], "evaluate.n_models: must be >= 4"),
        (
            ["evaluate", "--methods", "oracle_matching", "--set", "unlearn.oracle_matching.seed=0"],
            "store seeds must differ",
        ),
    ],
)
def test_run_rejects_bad_input_before_work(argv, expected, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def _write(path: Path, payload: dict) -> str:
    path.write_text(yaml.safe_dump(payload))
    return str(path)


def test_requests_validate(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml, no prepared data: schema checks only
    good = _write(
        tmp_path / "a.yaml", {"request_id": "r1", "reason": "x", "forget": {"classes": [1]}}
    )
    assert main(["requests", "validate", good]) == 0
    out = capsys.readouterr().out
    assert "ok (r1, forget by classes)" in out and "ids not checked" in out

    dup = _write(
        tmp_path / "b.yaml", {"request_id": "r1", "reason": "y", "forget": {"fraction": 0.5}}
    )
    assert main(["requests", "validate", good, dup]) == 2
    assert "duplicate request_id 'r1'" in capsys.readouterr().err

    bad = _write(
        tmp_path / "c.yaml", {"request_id": "r2", "reason": "x", "forget": {"fraction": 1.5}}
    )
    assert main(["requests", "validate", bad]) == 2
    assert "forget.fraction must be a number in (0, 1)" in capsys.readouterr().err


def test_requests_validate_checks_ids_against_prepared_data(capsys, tmp_path, monkeypatch):
    from pipeline_lib.config import DataConfig
    from pipeline_lib.data.images import prepare_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"data": {"max_train": 100, "max_test": 40}})
    )
    prepare_dataset(DataConfig(max_train=100, max_test=40))
    req = _write(
        tmp_path / "r.yaml", {"request_id": "r", "reason": "x", "forget": {"sample_ids": ["zzz"]}}
    )
    assert main(["requests", "validate", req]) == 2
    assert "unknown sample id(s): 'zzz'" in capsys.readouterr().err
    ok = _write(
        tmp_path / "ok.yaml", {"request_id": "ok", "reason": "x", "forget": {"fraction": 0.1}}
    )
    assert main(["requests", "validate", ok]) == 0
    assert "10 forget / 90 retain in digits" in capsys.readouterr().out


def test_requests_validate_text_requests_against_the_corpus(capsys, tmp_path, monkeypatch):
    """With an LM params file, ids and groups are checked against the text corpus (prepared
    in a temporary folder when the DVC root has none)."""
    monkeypatch.chdir(tmp_path)
    lm_params = yaml.safe_load((REPO / "params-lm.yaml").read_text())
    lm_params["text"].update(plays=["macbeth", "hamlet"], max_doc_chars=50)
    lm_params["tracking"]["dvc_root"] = str(tmp_path)
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(lm_params))
    play = _write(
        tmp_path / "p.yaml", {"request_id": "p", "reason": "x", "forget": {"groups": ["macbeth"]}}
    )
    scene = _write(
        tmp_path / "s.yaml",
        {"request_id": "s", "reason": "x", "forget": {"sample_ids": ["hamlet/1.1"]}},
    )
    assert main(["requests", "validate", play, scene, "--params", "lm.yaml"]) == 0
    out = capsys.readouterr().out
    assert "ok (p, forget by groups);" in out and "ok (s, forget by sample_ids); 1 forget" in out
    assert not list(tmp_path.glob("data"))  # nothing prepared under the DVC root
    typo = _write(
        tmp_path / "t.yaml", {"request_id": "t", "reason": "x", "forget": {"groups": ["macbath"]}}
    )
    assert main(["requests", "validate", typo, "--params", "lm.yaml"]) == 2
    assert "unknown group(s) 'macbath'" in capsys.readouterr().err
    ghost = _write(
        tmp_path / "g.yaml",
        {"request_id": "g", "reason": "x", "forget": {"sample_ids": ["othello/1.1"]}},
    )
    assert main(["requests", "validate", ghost, "--params", "lm.yaml"]) == 2
    assert "unknown document id(s): 'othello/1.1'" in capsys.readouterr().err


def test_console_script_help():
    exe = Path(sys.executable).parent / "unlearn"
    out = subprocess.run(
        [str(exe), "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--params", "--request", "--method", "--set"):
        assert flag in out


def test_requests_retry_puts_a_failed_request_back(capsys, tmp_path):
    from pipeline_lib.data.requests import parse_request
    from tasks.ledger import Ledger

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"].update(
        mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", dvc_root=str(tmp_path)
    )
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    ledger = Ledger(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for rid in ("r-ok", "r-bad"):
        doc = {"request_id": rid, "reason": "t", "forget": {"fraction": 0.1}}
        ledger.submit(parse_request(doc), params["service"]["model_name"])
    ledger.claim_next(params["service"]["model_name"])  # r-ok
    ledger.transition("r-ok", "failed", "crashed", error="boom")
    # a pending request cannot be retried; an unknown one is named
    assert main(["requests", "retry", "r-bad", "--params", str(pfile)]) == 2
    assert "r-bad" in capsys.readouterr().err
    assert main(["requests", "retry", "nope", "--params", str(pfile)]) == 2
    assert main(["requests", "retry", "r-ok", "--params", str(pfile)]) == 0
    assert "r-ok: pending (retry)" in capsys.readouterr().out
    row = ledger.get("r-ok")
    assert row.status == "pending" and row.error is None
    assert [e.to_status for e in ledger.events("r-ok")][-2:] == ["failed", "pending"]
    # arrival order is kept: the retried request is claimed before the later one
    assert ledger.claim_next(params["service"]["model_name"]).request_id == "r-ok"
    ledger.close()
