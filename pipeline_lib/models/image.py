"""Model registry (:data:`MODELS`) and the ``model`` section: an MLP, a small CNN and a
small ViT for image classification.

A model is a builder ``fn(cfg: ModelConfig, shape, n_classes) -> nn.Module`` registered with
``@MODELS.register("<name>")``; ``model.name`` in params.yaml picks one, and its settings are
fields of :class:`ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import AfterValidator
from torch import nn

from pipeline_lib.registry import Registry
from pipeline_lib.schema import ConfigError, Field, Int, Str, section

#: Builders by ``model.name``: ``fn(cfg, shape, n_classes) -> nn.Module``.
MODELS: Registry[Callable[[ModelConfig, tuple[int, ...], int], nn.Module]] = Registry(
    "model", key="model.name"
)


@section("model")
class ModelConfig:
    """Architecture from the model registry."""

    name: Annotated[Str, AfterValidator(MODELS.check)] = "mlp"
    #: Layer widths: each a positive integer (an empty list: no hidden layer / no conv block).
    hidden: tuple[Annotated[Int, Field(gt=0)], ...] = (128, 128)
    channels: tuple[Annotated[Int, Field(gt=0)], ...] = (16, 32)
    #: vit (transformers ViTForImageClassification from a config): patch side, width,
    #: blocks, heads, MLP width.
    vit_patch: Int = Field(7, gt=0)
    vit_dim: Int = Field(64, gt=0)
    vit_depth: Int = Field(2, gt=0)
    vit_heads: Int = Field(4, gt=0)
    vit_mlp: Int = Field(128, gt=0)


class MLP(nn.Module):
    """Flatten → [Linear → ReLU] × len(hidden) → Linear(n_classes)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, *shape) -> (B, n_classes)
        return self.net(x)


class SmallCNN(nn.Module):
    """[Conv3×3 → ReLU → MaxPool2] × len(channels) → AdaptiveAvgPool(2) → Linear.

    Works for 8×8 digits and 28×28 Fashion-MNIST alike."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c = out
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(c * 4, n_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, n_classes)
        return self.net(x)


class ViT(nn.Module):
    """A small Vision Transformer: transformers' ``ViTForImageClassification`` built from a
    ``ViTConfig`` (no pretrained weights, nothing downloaded), returning the logits.

    Eager attention (so ``torch.func`` per-sample gradients work), no dropout."""

    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        c, h, w = shape
        if h != w or h % cfg.vit_patch:
            raise ConfigError(
                f"model.vit_patch: {cfg.vit_patch} must divide the square image side, data has "
                f"shape {shape}"
            )
        if cfg.vit_dim % cfg.vit_heads:
            raise ConfigError(
                f"model.vit_heads: {cfg.vit_heads} must divide model.vit_dim={cfg.vit_dim}"
            )
        config = ViTConfig(
            image_size=h,
            patch_size=cfg.vit_patch,
            num_channels=c,
            hidden_size=cfg.vit_dim,
            num_hidden_layers=cfg.vit_depth,
            num_attention_heads=cfg.vit_heads,
            intermediate_size=cfg.vit_mlp,
            num_labels=n_classes,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        config._attn_implementation = "eager"
        self.hf = ViTForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, n_classes)
        return self.hf(pixel_values=x).logits


@MODELS.register("mlp")
def _mlp(cfg: ModelConfig, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return MLP(int(torch.tensor(shape).prod()), cfg.hidden, n_classes)


@MODELS.register("cnn")
def _cnn(cfg: ModelConfig, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    if len(shape) != 3:
        raise ConfigError(f"model.name: cnn needs image inputs (C, H, W), data has shape {shape}")
    return SmallCNN(shape[0], cfg.channels, n_classes)


@MODELS.register("vit")
def _vit(cfg: ModelConfig, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    if len(shape) != 3:
        raise ConfigError(f"model.name: vit needs image inputs (C, H, W), data has shape {shape}")
    return ViT(cfg, shape, n_classes)


def build_model(cfg: ModelConfig, shape: tuple[int, ...], n_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model; the same seed gives the same weights."""
    builder = MODELS.lookup(cfg.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(cfg, tuple(shape), n_classes)
