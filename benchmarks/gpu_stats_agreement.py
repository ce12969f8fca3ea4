"""Fisher statistics on CUDA against the CPU, full float32 and with TF32 on (issue 17).

    python -m benchmarks.gpu_stats_agreement

Fashion-MNIST-shaped synthetic data (4,096 × 1×28×28, seeded), the pipeline's MLP 128-128 and
CNN 16-32 at their seeded initialisation, ``fisher_diagonal_sum`` (true_expected, batch 256) in
float64 sums on the CPU as the reference; on CUDA with TF32 off and on. Prints, per model and
precision, the largest relative difference max|a−b| / max|b| over all parameters, and the
wall seconds of each side. The pipeline keeps TF32 off unless ``ray.tf32`` is set.
"""

from __future__ import annotations

import sys
import time

import torch

from pipeline_lib.config import ModelConfig
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal_sum

SHAPE = (1, 28, 28)


def sums(model, X, y, device: torch.device) -> tuple[dict[str, torch.Tensor], float]:
    model = model.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    s, _ = fisher_diagonal_sum(model, X, y, "true_expected", 256, 0, None, sum_dtype=torch.float64)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {k: v.cpu() for k, v in s.items()}, time.perf_counter() - t0


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_stats_agreement: torch sees no CUDA device")
    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    X = torch.rand(4096, *SHAPE, generator=g)
    y = torch.randint(0, 10, (4096,), generator=g)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(cuda)}, 4096 samples")
    print("| model | precision | max rel. diff vs CPU | CPU s | CUDA s |")
    print("|---|---|---|---|---|")
    for cfg in (
        ModelConfig(name="mlp", hidden=(128, 128)),
        ModelConfig(name="cnn", channels=(16, 32)),
    ):
        ref, cpu_s = sums(build_model(cfg, SHAPE, 10, 0), X, y, torch.device("cpu"))
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            sums(build_model(cfg, SHAPE, 10, 0), X[:256], y[:256], cuda)  # warm-up
            got, cuda_s = sums(build_model(cfg, SHAPE, 10, 0), X, y, cuda)
            rel = max(
                float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30))
                for k in ref
            )
            label = "TF32" if tf32 else "float32"
            print(f"| {cfg.name} | {label} | {rel:.2e} | {cpu_s:.2f} | {cuda_s:.2f} |")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


if __name__ == "__main__":
    main()
