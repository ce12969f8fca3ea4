"""The Fashion-MNIST loader on the real IDX files of Debian's dataset-fashion-mnist.

CI installs the package (.ci/run) and this test must run there; elsewhere it is skipped
with the install hint when the files are absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib.config import DataConfig
from pipeline_lib.data.images import (
    FASHION_MNIST_DEFAULT_DIR,
    load_fashion_mnist_source,
    load_prepared,
    prepare_dataset,
)

HAVE = (Path(FASHION_MNIST_DEFAULT_DIR) / "train-images-idx3-ubyte.gz").is_file()
pytestmark = pytest.mark.skipif(
    not HAVE and not os.environ.get("CI"),
    reason="apt-get install dataset-fashion-mnist to run (CI installs it)",
)


def test_real_fashion_mnist_loads_with_official_split(tmp_path):
    raw = load_fashion_mnist_source(DataConfig(name="fashion-mnist"))
    assert raw.X.shape == (70000, 1, 28, 28) and raw.X.dtype == np.float32
    assert 0.0 <= raw.X.min() and raw.X.max() <= 1.0 and raw.X.max() > 0.99
    assert (raw.split == "train").sum() == 60000 and (raw.split == "test").sum() == 10000
    assert np.bincount(raw.y[raw.split == "train"]).tolist() == [6000] * 10
    assert raw.ids[0] == "fmnist-train-00000" and raw.ids[-1] == "fmnist-test-09999"

    meta = prepare_dataset(
        DataConfig(name="fashion-mnist", max_train=500, max_test=100), tmp_path / "p"
    )
    assert (meta["n_train"], meta["n_test"], meta["shape"]) == (500, 100, [1, 28, 28])
    prepared = load_prepared(tmp_path / "p", verify=True)
    assert all(s.startswith("fmnist-train-") for s in prepared.split_ids("train"))
