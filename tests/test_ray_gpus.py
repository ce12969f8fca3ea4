"""Ray tasks that ask for GPUs (``ray.gpus_per_task``), on a real local Ray.

CPU machines: a local Ray started with ``num_gpus=1`` declares a GPU it does not have, so a
0.5-GPU task is scheduled (Ray hands it GPU 0) and the refusal inside the task is what is
tested: torch sees no CUDA, training stops with an error naming the key, and nothing is
written. With a real GPU (marked ``gpu``, deselected by ``make test``) chunks train on CUDA
and agree with CPU-trained chunks. The module's 2-CPU Ray also runs a chunk task with 2 CPUs
(``ray.cpus_per_task: 2``) under both ``ray.cpu_parallel`` settings.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline_lib.attribution.store import AttributionStore, StoreSpec
from pipeline_lib.config import ModelConfig, RayConfig, parse_section
from pipeline_lib.schema import ConfigError

N, T, C = 40, 50, 10
SHAPE = (1, 8, 8)


def _spec(**kw) -> StoreSpec:
    base = dict(
        kind="subsets",
        n_models=6,
        alpha=0.5,
        seed=7,
        chunk_size=3,
        n_train=N,
        n_classes=C,
        data_hash="h",
        model={"name": "mlp", "hidden": [8], "channels": [4]},
        train={
            "epochs": 2,
            "batch_size": 8,
            "lr": 1e-2,
            "optimizer": "adam",
            "weight_decay": 0.0,
            "momentum": 0.9,
        },
    )
    base.update(kw)
    return StoreSpec(**base)


def _data():
    g = np.random.default_rng(0)
    X = g.random((T, *SHAPE), dtype=np.float32)
    y = g.integers(0, C, T)
    return X[:N], y[:N], X


def _store(path, spec: StoreSpec) -> AttributionStore:
    _, _, targets = _data()
    st = AttributionStore(path, spec)
    st.initialise(
        np.array([f"id{i}" for i in range(T)]),
        np.array(["train"] * N + ["test"] * (T - N)),
        np.zeros(T, int),
    )
    return st


def test_gpus_per_task_is_validated_by_the_section():
    assert parse_section(RayConfig, {"gpus_per_task": 0.25}, "ray").gpus_per_task == 0.25
    assert parse_section(RayConfig, {"gpus_per_task": 2}, "ray").gpus_per_task == 2
    with pytest.raises(ConfigError, match=r"^ray\.gpus_per_task: must be a fraction .* got 1\.5"):
        parse_section(RayConfig, {"gpus_per_task": 1.5}, "ray")
    with pytest.raises(ConfigError, match=r"^ray\.gpus_per_task: must be >= 0"):
        parse_section(RayConfig, {"gpus_per_task": -0.5}, "ray")
    assert RayConfig().gpus_per_task == 0 and RayConfig().tf32 is False  # CPU users: unchanged


def test_conv_kernel_is_validated_by_the_section():
    assert RayConfig().conv_kernel == "vmap"  # CPU users: unchanged
    cfg = parse_section(RayConfig, {"gpus_per_task": 0.5, "conv_kernel": "triton"}, "ray")
    assert cfg.conv_kernel == "triton"
    with pytest.raises(ConfigError, match=r"^ray\.conv_kernel: triton runs on GPU tasks only"):
        parse_section(RayConfig, {"conv_kernel": "triton"}, "ray")
    with pytest.raises(ConfigError, match=r"^ray\.conv_kernel: "):
        parse_section(RayConfig, {"gpus_per_task": 1, "conv_kernel": "cudnn"}, "ray")


def test_chunk_task_hands_conv_kernel_to_the_trainer(monkeypatch):
    """The chunk task's body (as Ray runs it) passes ``ray.conv_kernel`` down to
    ``train_ensemble``: a kernel the trainer does not know is refused there, by name."""
    from tasks.attribution import _train_chunk_remote

    X, y, targets = _data()
    spec = dataclasses.asdict(_spec(model={"name": "cnn", "channels": [2, 3]}))
    body = _train_chunk_remote._function  # the plain function under @ray.remote
    with pytest.raises(ValueError, match="conv_kernel must be one of .* got 'cudnn'"):
        body(spec, 0, 2, X, y, targets, None, 1, 0.0, False, "models", 8.0, "cudnn")


@pytest.fixture(scope="module")
def ray_with_declared_gpu():
    """A local Ray (127.0.0.1 only) with 2 CPUs and one GPU declared by hand (none needed on
    the machine)."""
    import ray

    from tasks.ray_local import init_local

    init_local(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _stop_local_ray():  # overrides conftest's: this module's Ray lives for the module
    yield


def test_requests_and_slots_follow_gpus_per_task(ray_with_declared_gpu):
    from tasks.ray_resources import task_options, task_slots

    cpu = RayConfig(cpus_per_task=1)
    assert task_options(cpu) == {"num_cpus": 1}  # no GPU asked for: as before
    assert task_slots(cpu) == 2
    half = RayConfig(cpus_per_task=1, gpus_per_task=0.5)
    assert task_options(half) == {"num_cpus": 1, "num_gpus": 0.5}
    assert task_slots(half) == 2  # two halves of the one GPU, two CPUs
    assert task_slots(RayConfig(cpus_per_task=1, gpus_per_task=1)) == 1  # GPU-bound
    assert task_slots(RayConfig(cpus_per_task=1, gpus_per_task=1 / 3)) == 2  # CPU-bound


def test_more_gpus_than_a_node_has_is_refused_before_any_task(ray_with_declared_gpu, tmp_path):
    from tasks.attribution import run_store

    X, y, targets = _data()
    store = _store(tmp_path / "s", _spec())
    cfg = RayConfig(cpus_per_task=1, gpus_per_task=2)
    with pytest.raises(ConfigError, match=r"^ray\.gpus_per_task: is 2 but .* at most 1 GPU"):
        run_store(store, X, y, targets, cfg)
    assert store.pending_chunks() == _spec().chunks()  # nothing trained, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal without CUDA")
def test_gpu_chunk_task_is_scheduled_then_refuses_without_cuda(ray_with_declared_gpu, tmp_path):
    import ray

    from tasks.attribution import run_store
    from tasks.ray_resources import CudaUnavailable

    @ray.remote
    def assigned():
        return ray.get_runtime_context().get_assigned_resources(), ray.get_gpu_ids()

    from tasks.ray_resources import task_options

    half = RayConfig(cpus_per_task=1, gpus_per_task=0.5)
    resources, gpu_ids = ray.get(assigned.options(**task_options(half)).remote())
    assert resources == {"CPU": 1.0, "GPU": 0.5} and gpu_ids == [0]

    X, y, targets = _data()
    store = _store(tmp_path / "s", _spec())
    with pytest.raises(CudaUnavailable, match=r"ray\.gpus_per_task is 0\.5 .* GPU\(s\) \[0\]"):
        run_store(store, X, y, targets, half)
    assert store.pending_chunks() == _spec().chunks()  # no chunk half-written

    # the same store then trains on the CPU with gpus_per_task 0
    stats = run_store(store, X, y, targets, RayConfig(cpus_per_task=1))
    assert stats["models_trained"] == 6 and store.pending_chunks() == []
    assert {store.chunk_meta(a)["device"] for a, _ in _spec().chunks()} == {"cpu"}


def test_two_cpu_chunk_tasks_store_the_same_outputs_under_either_cpu_parallel(
    ray_with_declared_gpu, tmp_path
):
    """cpus_per_task 2: the task runs torch with 2 threads; ``models`` trains each chunk's 3
    models as two blocks on two threads, ``ops`` as one loop over torch's 2 threads, or with
    a tiny ``cpu_block_mib`` as three blocks of one model. The stored outputs must agree
    (the models share nothing) and every model be trained."""
    from tasks.attribution import run_store

    X, y, targets = _data()
    spec = _spec(output_dtype="float32")
    loaded = {}
    # 0.0003 MiB: less than one model's state (610 float32 parameters × 4 arrays): blocks of one
    for mode, mib in (("models", 8.0), ("ops", 8.0), ("ops", 0.0003)):
        store = _store(tmp_path / f"{mode}{mib}", spec)
        cfg = RayConfig(cpus_per_task=2, cpu_parallel=mode, cpu_block_mib=mib)
        stats = run_store(store, X, y, targets, cfg)
        assert stats["slots"] == 1 and stats["models_trained"] == 6
        assert store.pending_chunks() == []
        loaded[mode, mib] = store.load()
    for other in (("ops", 8.0), ("ops", 0.0003)):
        for a, b in zip(loaded["models", 8.0], loaded[other], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert np.abs(loaded["ops", 8.0][2]).max() > 0  # real logits, not an empty store


@pytest.mark.slow  # ~15 s on an idle machine, minutes under load: a second worker family
@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal without CUDA")
def test_gpu_shard_statistics_refuse_without_cuda(ray_with_declared_gpu, tmp_path):
    from pipeline_lib.models.image import build_model
    from pipeline_lib.stats.store import write_shards
    from tasks.ray_resources import CudaUnavailable
    from tasks.stats import run_shards

    X, y, _ = _data()
    ids = np.array([f"s{i}" for i in range(N)])
    paths = write_shards(ids, X, y, tmp_path / "shards", 2)
    cfg = {"name": "mlp", "hidden": [8]}
    state = build_model(parse_section(ModelConfig, cfg, "model"), SHAPE, C, 0).state_dict()
    opts = {"kind": "true_expected", "batch_size": 16, "seed": 0}
    with pytest.raises(CudaUnavailable, match=r"ray\.gpus_per_task is 0\.5"):
        run_shards("fisher", state, cfg, SHAPE, C, paths, opts, RayConfig(gpus_per_task=0.5))


@pytest.mark.gpu
def test_gpu_chunks_train_on_cuda_and_agree_with_cpu_chunks(tmp_path):
    """Real GPU: half-GPU chunk tasks train on CUDA (full float32, TF32 off) and their
    logits agree with CPU-trained ones to float32 rounding after 2 epochs (atol 1e-3)."""
    import ray

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tasks.attribution import run_store
    from tasks.ray_local import init_local

    init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        X, y, targets = _data()
        spec = _spec(output_dtype="float32")
        gpu = _store(tmp_path / "gpu", spec)
        run_store(gpu, X, y, targets, RayConfig(cpus_per_task=1, gpus_per_task=0.5))
        devices = {gpu.chunk_meta(a)["device"] for a, _ in spec.chunks()}
        assert devices and all(d != "cpu" for d in devices)
        cpu = _store(tmp_path / "cpu", spec)
        run_store(cpu, X, y, targets, RayConfig(cpus_per_task=1))
        _, _, out_gpu = gpu.load()
        _, _, out_cpu = cpu.load()
        np.testing.assert_allclose(out_gpu, out_cpu, atol=1e-3, rtol=0)
    finally:
        ray.shutdown()


@pytest.mark.gpu
def test_gpu_shard_fisher_agrees_with_cpu_in_full_float32(tmp_path):
    """Real GPU: CNN Fisher sums from half-GPU shard tasks (ray.tf32 false: cuDNN's TF32
    default off) agree with CPU shard tasks to float32 rounding (rtol 1e-5; with cuDNN TF32
    on, issue 17 saw 1.6e-4)."""
    import ray

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from pipeline_lib.models.image import build_model
    from pipeline_lib.stats.store import write_shards
    from tasks.ray_local import init_local
    from tasks.stats import run_shards

    init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        X, y, _ = _data()
        ids = np.array([f"s{i}" for i in range(N)])
        paths = write_shards(ids, X, y, tmp_path / "shards", 2)
        cfg = {"name": "cnn", "channels": [4, 8]}
        state = build_model(parse_section(ModelConfig, cfg, "model"), SHAPE, C, 0).state_dict()
        opts = {"kind": "true_expected", "batch_size": 16, "seed": 0}
        args = ("fisher", state, cfg, SHAPE, C, paths, opts)
        gpu = run_shards(*args, RayConfig(cpus_per_task=1, gpus_per_task=0.5))
        cpu = run_shards(*args, RayConfig(cpus_per_task=1))
        for (g_sums, g_n), (c_sums, c_n) in zip(gpu["parts"], cpu["parts"], strict=True):
            assert g_n == c_n
            for k in c_sums:
                assert g_sums[k].device.type == "cpu"
                torch.testing.assert_close(g_sums[k], c_sums[k], rtol=1e-5, atol=1e-7)
    finally:
        ray.shutdown()
