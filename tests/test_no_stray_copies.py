"""No stray copies of a split's rows, narrow listening (issue 14, items 8 and 9).

The Parquet shards of a split (forgotten rows included) exist only while their statistic is
computed: deleted after the reduce, and after a failure too; a run killed before its clean-up
has its shards removed by the next one. A local Ray started by us listens on 127.0.0.1 only,
and the token file it authenticates with is private (0600).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.config import load_params
from pipeline_lib.stats.store import read_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path: Path):
    return load_params(
        str(REPO / "params.yaml"),
        {"stats.out_dir": str(tmp_path / "stats"), "stats.n_shards": 3, "ray.num_cpus": 1},
    )


def rows(n: int = 30):
    rng = np.random.default_rng(0)
    ids = np.array([f"forgotten-{i}" for i in range(n)])
    return ids, rng.normal(size=(n, 8, 8)).astype(np.float32), rng.integers(0, 10, size=n)


def test_shards_exist_only_while_used(params):
    from tasks.statistics import temporary_shards

    ids, X, y = rows()
    root = params.resolve(params.stats.out_dir) / "shards"
    with temporary_shards(params, "forget", ids, X, y) as shards:
        assert len(shards) == 3 and all(Path(p).is_file() for p in shards)
        back = np.concatenate([read_shard(p)[0] for p in shards])
        assert back.tolist() == ids.tolist()
    assert not root.exists() or not any(root.rglob("*"))
    with pytest.raises(RuntimeError, match="reduce failed"):
        with temporary_shards(params, "forget", ids, X, y) as shards:
            assert Path(shards[0]).is_file()
            raise RuntimeError("reduce failed")
    assert not root.exists() or not any(root.rglob("*"))


def test_shards_left_by_a_killed_run_or_an_older_version_are_swept(params):
    from tasks.statistics import sweep_shards, temporary_shards

    ids, X, y = rows()
    root = params.resolve(params.stats.out_dir) / "shards"
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = {
        "killed": root / f"forget-{host}-{dead.pid}-0123abcd",  # its process is gone
        "old layout": root / "forget-5f2a9c0d1e3b4a67",  # named by its data, never deleted
        "half written": root / f".forget-{host}-{dead.pid}-0123abcd.x1y2.tmp",
    }
    alive = root / f"retain-{host}-{os.getpid()}-89abcdef"  # a run still using its shards
    for d in [*left.values(), alive]:
        d.mkdir(parents=True)
        (d / "shard-00000.parquet").write_bytes(b"rows")
    with temporary_shards(params, "forget", ids, X, y):
        pass
    assert not any(d.exists() for d in left.values())
    assert alive.exists()  # not ours to remove
    assert sweep_shards(root) == []


def test_sharded_fisher_on_ray_leaves_no_shard_behind(params, tmp_path):
    """The Ray path end to end: shards written, read by Ray tasks, reduced, deleted; a failing
    Ray task deletes them too."""
    import ray

    from pipeline_lib.config import to_dict
    from pipeline_lib.models.image import build_model
    from tasks import stats as ray_stats
    from tasks.statistics import temporary_shards

    ids, X, y = rows()
    model = build_model(params.model, (8, 8), 10, seed=0)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    root = params.resolve(params.stats.out_dir) / "shards"
    options = {"kind": "true_expected", "batch_size": 16, "seed": 0}
    try:
        with temporary_shards(params, "forget", ids, X, y) as shards:
            run = ray_stats.run_shards(
                "fisher", state, to_dict(params.model), (8, 8), 10, shards, options, params.ray, 1
            )
        assert run["n"] == len(ids) and all(
            torch.isfinite(t).all() for sums, _ in run["parts"] for t in sums.values()
        )
        assert not root.exists() or not any(root.rglob("*"))
        with pytest.raises(Exception, match="unknown statistic"):
            with temporary_shards(params, "forget", ids, X, y) as shards:
                ray_stats.run_shards(
                    "bogus", state, to_dict(params.model), (8, 8), 10, shards, {}, params.ray, 1
                )
        assert not root.exists() or not any(root.rglob("*"))

        # narrow listening: the node, its driver and its workers are on the loopback address
        @ray.remote
        def where() -> str:
            return ray.util.get_node_ip_address()

        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
        assert ray.get(where.remote()) == "127.0.0.1"
        psutil = pytest.importorskip("psutil")
        ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
        listening = [
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in ours
        ]
        assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        token = Path.home() / ".ray" / "auth_token"
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled" and token.exists():
            assert stat.S_IMODE(token.stat().st_mode) == 0o600
    finally:
        ray.shutdown()
