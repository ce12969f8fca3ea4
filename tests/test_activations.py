"""Activation statistics: the Gram route (batched, sharded on Ray) equals the SVD of the
stacked activations, in values and in subspace (float64), for the MLP, the CNN and the ViT.
The sharded version on Ray is tested in test_stats.py (one local Ray for all of them)."""

from __future__ import annotations

import pytest
import torch

from pipeline_lib.config import ModelConfig
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.activations import (
    activation_grams,
    decompose_gram,
    projection_layers,
    stacked_activations,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)
MODELS = {
    "mlp": ModelConfig(name="mlp", hidden=(16, 12)),
    "cnn": ModelConfig(name="cnn", channels=(3, 5)),
    "vit": ModelConfig(name="vit", vit_patch=4, vit_dim=16, vit_depth=2, vit_heads=2, vit_mlp=24),
}


def _model(arch: str) -> torch.nn.Module:
    return build_model(MODELS[arch], SHAPE, 10, seed=0).double()


def _X(n: int = 30) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def assert_same_space(gram: torch.Tensor, A: torch.Tensor) -> None:
    """U, S from the Gram equal the SVD of A: singular values, and the projector onto the top
    k directions for every k where the spectrum has a gap."""
    u, s = decompose_gram(gram)
    _, s_ref, vh = torch.linalg.svd(A, full_matrices=True)
    r = len(s_ref)
    # sqrt of eigenvalues loses half the digits of tiny singular values: compare in S², too
    torch.testing.assert_close(
        s[:r].square(), s_ref.square(), rtol=1e-9, atol=1e-9 * float(s_ref[0] ** 2)
    )
    assert torch.all(s[r:] < 1e-6 * s_ref[0])
    ref = vh.T
    for k in range(1, r):
        if s_ref[k - 1] - s_ref[k] > 1e-3 * s_ref[0]:
            p, p_ref = u[:, :k] @ u[:, :k].T, ref[:, :k] @ ref[:, :k].T
            torch.testing.assert_close(p, p_ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_gram_equals_svd_of_stacked_activations(arch):
    model, X = _model(arch), _X()
    grams, n = activation_grams(model, X, batch_size=7)
    stacked = stacked_activations(model, X)
    assert n == len(X) and grams.keys() == stacked.keys() == projection_layers(model).keys()
    for name, A in stacked.items():
        torch.testing.assert_close(grams[name], A.T @ A, rtol=1e-12, atol=1e-10)
        assert_same_space(grams[name], A)


def test_projection_layers_per_architecture():
    assert list(projection_layers(_model("mlp"))) == ["net.1", "net.3", "net.5"]
    assert list(projection_layers(_model("cnn"))) == ["net.0", "net.3", "net.8"]
    vit = projection_layers(_model("vit"))
    assert len(vit) == 2 * 6  # per block: q, k, v, attention output, MLP in and out
    assert not any("patch" in n or "classifier" in n for n in vit)
    # conv rows are the unfolded patches: C·k·k wide, one row per output position
    grams, _ = activation_grams(_model("cnn"), _X(2))
    assert grams["net.0"].shape == (9, 9) and grams["net.3"].shape == (27, 27)


def test_memory_does_not_grow_with_samples():
    model = _model("cnn")
    small, _ = activation_grams(model, _X(10))
    big, _ = activation_grams(model, _X(300), batch_size=16)
    assert {k: v.shape for k, v in small.items()} == {k: v.shape for k, v in big.items()}
