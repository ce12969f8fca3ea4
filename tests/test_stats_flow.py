"""`unlearn stats fisher` end to end: real DVC stages, the cached original-model task, Parquet
shards and a real local Ray; the file it writes equals the in-process Fisher diagonal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from flows.cli import main
from tests.conftest import make_dvc_project
from tests.test_flow import tiny_params


@pytest.fixture
def project(tmp_path: Path) -> Path:
    params = tiny_params(tmp_path / "proj")
    params["data"].update(max_train=150, max_test=60)
    params["train"].update(epochs=2)
    params["fisher"].update(kind="true_sampled", seed=4)
    params["ray"].update(num_cpus=2)
    root = make_dvc_project(tmp_path / "proj", yaml.safe_dump(params))
    request = {"request_id": "req-stats", "reason": "t", "forget": {"classes": [3]}}
    (root / "requests" / "req.yaml").write_text(yaml.safe_dump(request))
    return root


def test_cli_stats_fisher_matches_in_process(prefect_api, project, capsys):
    import ray

    from pipeline_lib.config import load_params
    from pipeline_lib.data import load_prepared
    from pipeline_lib.fisher import fisher_diagonal
    from pipeline_lib.requests import load_manifests
    from pipeline_lib.stats import load_stats
    from pipeline_lib.steps import fisher_split_ids, load_model

    params_path = str(project / "params.yaml")
    try:
        assert (
            main(["stats", "fisher", "--split", "forget", "--params", params_path, "--shards", "3"])
            == 0
        )
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    path = Path(out.strip().splitlines()[-1].split(" (content hash")[0])
    assert path.is_file() and path.parent == project / "artifacts" / "stats"
    tensors, meta = load_stats(path)
    cfg = meta["config"]
    assert cfg["split"] == "forget" and cfg["n_shards"] == 3 and cfg["kind"] == "true_sampled"
    assert meta["digest"][:16] in path.name

    params = load_params(params_path)
    data = load_prepared(project / "data" / "prepared")
    ids = fisher_split_ids(load_manifests(project / "data" / "forget"), "forget", params.fisher)
    assert cfg["n"] == len(ids) > 0
    weights = sorted((project / "artifacts" / "models").glob("original-*.safetensors"))
    assert len(weights) == 1 and cfg["weights_digest"][:16] in weights[0].name
    model = load_model(weights[0], params.model, data)
    X, y = data.subset(ids)
    want = fisher_diagonal(
        model, torch.from_numpy(X), torch.from_numpy(y), "true_sampled", 256, 4, list(ids)
    )
    for k in want:
        torch.testing.assert_close(tensors[k], want[k], rtol=1e-4, atol=1e-9)


def test_cli_stats_rejects_bad_split(capsys):
    with pytest.raises(SystemExit):
        main(["stats", "fisher", "--split", "test"])
    assert "invalid choice: 'test'" in capsys.readouterr().err
