"""The unlearning step on CUDA equals the CPU (issue 15: statistics and the step on the GPU).

Marked ``gpu``: not in the default suite (CI has no GPU); run with ``pytest -m gpu``. Full
float32 (TF32 off); the Fisher statistics are computed on each device from the same model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pipeline_lib.config import ModelConfig, TrainConfig, UnlearnConfig
from pipeline_lib.methods import UnlearnInputs, get_method
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal
from pipeline_lib.training.fit import FitSettings, fit

SHAPE = (1, 8, 8)
C = 4
CFG = ModelConfig(name="mlp", hidden=(12,))
METHODS = ("ssd", "fisher_forgetting", "fisher_diagonal", "svd_projection", "finetune")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    X = torch.rand((n, *SHAPE), generator=g) * 0.5
    X[:, 0, 0, :] += nn.functional.one_hot(y, 8).float()
    return X, y


def _run(name: str, device: torch.device) -> dict[str, torch.Tensor]:
    factory = lambda s: build_model(CFG, SHAPE, C, s)  # noqa: E731
    X, y = _data(96, 0)
    model = fit(factory(0), X, y, FitSettings(epochs=2, batch_size=16, lr=1e-2), 0, device=device)
    fX, fy = _data(24, 1)
    rX, ry = _data(72, 2)
    inputs = UnlearnInputs(
        fX, fy, rX, ry, factory,
        TrainConfig(epochs=2, batch_size=16, lr=1e-2, device=device.type),
        fisher_diagonal(model, fX, fy), fisher_diagonal(model, rX, ry),
        device=device,
        forget_classes=(0,) if name == "svd_projection" else (),
    )  # fmt: skip
    if name == "svd_projection":
        keep = y != 0
        inputs = dataclasses.replace(
            inputs, forget_X=X[~keep], forget_y=y[~keep], retain_X=X[keep], retain_y=y[keep]
        )
    params = getattr(UnlearnConfig(), name)
    out, _ = get_method(name).fn(model, inputs, params, 0)
    return {k: v.detach().cpu() for k, v in out.named_parameters()}


@pytest.mark.parametrize("name", METHODS)
def test_method_on_cuda_equals_cpu(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = _run(name, torch.device("cpu"))
    gpu = _run(name, torch.device("cuda"))
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], atol=1e-4, rtol=1e-4, msg=k)
