"""Flushing denormal floats to zero on the CPU, for training loops.

Every CPU training loop of the project runs under :func:`flush_denormals`: :func:`fit
<pipeline_lib.training.fit.fit>`, the ensemble trainer, every registered unlearning method
(``register_method`` and ``register_lm_method`` wrap them), DMM/OM's output matching and the
language-model trainer (BENCHMARKS.md, "Denormal floats on long CPU runs").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def flushing_denormals() -> bool:
    """Whether this thread's CPU arithmetic flushes denormal floats to zero now.

    torch has a setter (``torch.set_flush_denormal``) and no getter, so this multiplies a
    float32 denormal by one: with flush-to-zero / denormals-are-zero on, the result is 0.
    """
    return float(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)) == 0.0


@contextmanager
def flush_denormals(on: bool = True) -> Iterator[None]:
    """Run the block with this thread's denormal floats flushed to zero (``on``), then put
    the thread's previous mode back.

    Why: Adam's first moment of a weight whose gradient has become exactly zero (a dead
    ReLU unit, an input pixel that is almost always 0) decays by β₁ = 0.9 a step, and after
    ~800 steps it is below float32's smallest normal number, 1.2e-38. x86 CPUs compute on
    such denormals through a slow microcode path: training 8 MLPs on 20,000 Fashion-MNIST
    images for 3,140 steps took 19.6 s with 12% of the first moments denormal, and 13.1 s
    flushed, with the same weights bit for bit (``benchmarks/denormals.py``, BENCHMARKS.md).

    What it changes: numbers below 1.2e-38 (float32) or 2.2e-308 (float64) read and are
    written as 0. A weight's Adam update is lr·m̂/(√v̂ + ε) with ε = 1e-8, so a flushed
    moment changes an update by less than lr·1.2e-38/1e-8 ≈ 1e-33, far below the rounding
    of a float32 weight; float64 training never gets near 2.2e-308.

    The mode is per thread (the CPU's MXCSR register): threads started inside the block
    inherit it, torch's already-running intra-op (OpenMP) threads do not. So it covers all
    of a loop that runs on one torch thread (Ray's chunk tasks by default, and each block
    thread of the ensemble trainer's CPU layout), and only the calling thread's share of
    the kernels that torch splits over several threads. On a GPU it changes nothing (a CPU
    setting; CUDA's float32 kernels handle denormals at full speed).
    """
    before = flushing_denormals()
    changed = on != before and torch.set_flush_denormal(on)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(before)
