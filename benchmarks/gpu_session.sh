#!/usr/bin/env bash
# The one prepared GPU run of issues 15 and 17 (about 8 minutes on an H100), as given to a
# lent device machine from the repository root:
#
#   bash benchmarks/gpu_session.sh            # output under $OUT (default /tmp/gpu-out)
#
# The device image has PyTorch but neither pydantic nor Ray nor Fashion-MNIST: carry
# pydantic's wheels in .whl/ (see BENCHMARKS.md) and the four IDX files in .gpudata/. Ray's
# wheel does not fit the device's 64 MiB transfer, so tests/test_ray_gpus.py is not run here.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -d .gpudata ] && [ ! -e /usr/share/datasets/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && ln -s "$PWD/.gpudata" /usr/share/datasets/fashion-mnist
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c 'import torch, pydantic; print("torch", torch.__version__, "pydantic", pydantic.__version__)'
step() { local secs=$1 name=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.txt"; echo "=== $name rc ${PIPESTATUS[0]}"; }
# STEPS picks what runs (default: issue 15's rows and the ensemble, in this order); issue
# 17's rerun used STEPS="pytest_gpu gpu_ensemble" with BEFORE=.gpudata/ensemble_before.py, an
# earlier pipeline_lib/training/ensemble.py (git show REV:...) for the before/after row. The
# Triton convolution's first run on a card (about 9 minutes):
#   STEPS="conv_tests gpu_cnn_variants gpu_ensemble" bash benchmarks/gpu_session.sh
STEPS=${STEPS:-"stats_agreement request_cost pytest_gpu gpu_ensemble"}
BEFORE=${BEFORE:-}
for s in $STEPS; do
  case $s in
    stats_agreement) step 60 stats_agreement python3 -m benchmarks.gpu_stats_agreement ;;
    request_cost) step 230 request_cost python3 -m benchmarks.request_cost --dataset fashion-mnist \
      --model cnn --device cuda --max-test 2000 --fraction 0.01 --fd-variant retain_sample_multiple=3.0 ;;
    pytest_gpu) step 150 pytest_gpu python3 -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_ensemble.py tests/test_methods_cuda.py ;;
    # the Triton ensemble convolution compiled for the card: every test of its file, in
    # float32 with TF32 off, against conv2d, the vmap path and the trainer; needs triton
    conv_tests) step 150 conv_tests python3 -m pytest -q -p no:cacheprovider -m "not slow" \
      tests/test_ensemble_conv.py ;;
    gpu_ensemble) step 330 gpu_ensemble python3 -m benchmarks.gpu_ensemble --budget 200 \
      ${BEFORE:+--before "$BEFORE"} ;;
    gpu_phases) step 200 gpu_phases python3 -m benchmarks.gpu_phases ;;
    gpu_cnn_variants) step 260 gpu_cnn_variants python3 -m benchmarks.gpu_cnn_variants ;;
    *) echo "unknown step $s" ;;
  esac
done
