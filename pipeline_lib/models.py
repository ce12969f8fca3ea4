"""Model registry: an MLP and a small CNN for image classification."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline_lib.config import ConfigError, ModelConfig


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


def _mlp(cfg: ModelConfig, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return MLP(int(torch.tensor(shape).prod()), cfg.hidden, n_classes)


def _cnn(cfg: ModelConfig, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    if len(shape) != 3:
        raise ConfigError(f"model.name: cnn needs image inputs (C, H, W), data has shape {shape}")
    return SmallCNN(shape[0], cfg.channels, n_classes)


MODELS: dict[str, Callable[[ModelConfig, tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
}


def build_model(cfg: ModelConfig, shape: tuple[int, ...], n_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model; the same seed gives the same weights."""
    if cfg.name not in MODELS:
        raise ConfigError(
            f"model.name: unknown model {cfg.name!r}; valid: {', '.join(sorted(MODELS))}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[cfg.name](cfg, tuple(shape), n_classes)
