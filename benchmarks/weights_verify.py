"""What verifying a weights file against its content digest costs on load (issue 14, item 5).

Writes a state dict of about ``--mb`` MiB of float32 (GPT-2 small is ~500 MiB) with
:func:`pipeline_lib.io.save_weights`, then times, best of ``--repeat``, in one process, each
load followed by copying every tensor into a model-sized buffer (what ``load_state_dict``
does; safetensors maps the file lazily): ``load_weights(verify=False)``, the first verified
load of the file (+ the digest), and a second verified load (the digest is remembered per
path, size and mtime).

    python benchmarks/weights_verify.py --mb 500 --repeat 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline_lib import io


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.mb * (1 << 20) // 4
    rows = 4096
    state = {f"layer{i}.weight": torch.randn(rows, n // rows // 8) for i in range(8)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        io.save_weights(state, path)
        mib = path.stat().st_size / (1 << 20)
        target = {k: torch.empty_like(v) for k, v in state.items()}

        def into_model(loaded: dict[str, torch.Tensor]) -> None:
            for k, v in loaded.items():
                target[k].copy_(v)

        plain = best(lambda: into_model(io.load_weights(path, verify=False)), args.repeat)

        def first() -> None:
            io._VERIFIED.clear()
            into_model(io.load_weights(path))

        verified = best(first, args.repeat)
        again = best(lambda: into_model(io.load_weights(path)), args.repeat)
    print(f"file {mib:.0f} MiB, best of {args.repeat}")
    print(f"load, no verification      {plain:7.3f} s   1.00x")
    print(f"load + digest (first load) {verified:7.3f} s   {verified / plain:.2f}x")
    print(f"load, digest remembered    {again:7.3f} s   {again / plain:.2f}x")


if __name__ == "__main__":
    main()
