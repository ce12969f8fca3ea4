"""Train K models of one architecture at once, each on its own subset (vectorised ensemble).

Subset-model methods (datamodels, KLoM oracles, SISA-style shards) train many small models of
the same architecture on different subsets of one dataset. Training them one after another
leaves a small model's step dominated by Python and kernel-launch overhead; here the K models'
parameters are stacked along a leading model axis, (K, *param_shape), and one step runs all
of them with batched kernels: the registry MLP by batched matrix products with a
hand-written backward pass over one flat parameter tensor (the fast path, :class:`_MLPStep`,
:class:`_FlatParams`), any other architecture (the CNN) by ``torch.func.vmap`` over
``torch.func.functional_call`` and autograd (optionally ``torch.compile``-d).

Devices: CPU or CUDA (``device``). On CUDA, float32 matrix products follow torch's global
precision settings: with TF32 allowed (``torch.backends.cuda.matmul.allow_tf32``, cuDNN's
``allow_tf32``; the Ray tasks set both from ``ray.tf32``) results differ from float32 by
~1e-3 relative; with both off they agree with the CPU to float32 rounding. The test suite
states both tolerances (tests/test_ensemble.py, the ``gpu`` tests).

Equivalence (the contract): model k trained here equals, to float rounding,

    fit(build_model(cfg, shape, n_classes, seeds[k]), X[masks[k]], y[masks[k]], settings, seeds[k])

because every ingredient of :func:`pipeline_lib.training.fit.fit` is reproduced per model:

- init: ``build_model(..., seeds[k])`` (cast to X's dtype);
- data order: one ``torch.Generator().manual_seed(seeds[k])`` per model, one
  ``torch.randperm(n, generator=g)`` per epoch, batches ``order[s : s + batch_size]``
  including the last partial batch. All subsets have the same size n, so all models have the
  same batch sizes at every step and can be stepped together;
- loss: cross-entropy *mean over the model's own batch*. The ensemble minimises
  Σ_k mean_k, whose gradient with respect to model k's parameters is exactly that model's
  own gradient (the models share no parameters);
- gradients: the MLP path computes by hand exactly the products autograd runs
  (``(softmax − onehot)/b`` for the loss, ``g hᵀ``, ``Σ_b g`` and ``Wᵀ g`` per layer, the
  ReLU mask), so model k's gradient is its own to rounding;
- optimizer: the same ``torch.optim`` Adam/SGD with the hyper-parameters of
  :func:`pipeline_lib.training.fit._optimizer` (momentum, weight decay), here over the stacked
  (K, ...) leaves (the MLP: one flat leaf holding all of them). Both update rules are
  elementwise and their step counters advance together for all models, so one optimizer
  over stacked leaves is K independent optimizers (the fused kernel is used; it matches the
  unfused one to rounding).

:func:`train_ensemble_reference` is the slow, obviously-correct path (a Python loop of
``fit``) and :func:`ensemble_logits_reference` that of :func:`ensemble_logits`
(``predict_logits`` per model); the tests compare them in float64 (max |Δ| ≈ 1e-16 after three
epochs of Adam; asserted at 1e-12).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from pipeline_lib.denormals import flush_denormals
from pipeline_lib.models.image import MLP, ModelConfig, SmallCNN, build_model
from pipeline_lib.training.fit import FitSettings, fit, predict_logits

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


def _check_inputs(
    X: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, seeds: Sequence[int]
) -> int:
    """Validate shapes; return n, the common number of samples per model."""
    if masks.dtype != torch.bool or masks.ndim != 2:
        raise ValueError(
            f"masks must be a (K, N) bool tensor, got dtype {masks.dtype} shape {tuple(masks.shape)}"
        )
    if masks.shape[1] != len(X):
        raise ValueError(f"masks has {masks.shape[1]} columns but X has {len(X)} rows")
    if len(y) != len(X):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    k = masks.shape[0]
    if k == 0:
        raise ValueError("masks has no rows: need at least one model")
    if len(seeds) != k:
        raise ValueError(f"masks has {k} rows (models) but {len(seeds)} seeds were given")
    counts = masks.sum(1).tolist()
    if len(set(counts)) != 1:
        shown = counts if k <= 20 else [*counts[:20], "..."]
        raise ValueError(
            f"every row of masks must select the same number of samples (the models step together); got counts per row {shown} (distinct: {sorted(set(counts))})"
        )
    if counts[0] == 0:
        raise ValueError("train_ensemble: empty training set (masks select no sample)")
    return int(counts[0])


def _stacked_optimizer(params: list[torch.Tensor], s: FitSettings) -> torch.optim.Optimizer:
    """The optimizer of :func:`pipeline_lib.training.fit._optimizer`, over (K, ...) leaves.

    Same hyper-parameters; ``fused=True`` (one pass over memory per step) because with K
    models the unfused Adam's many full-size temporaries cost as much as the matmuls.
    Fused and unfused agree to rounding (checked against ``fit`` in the tests).
    """
    fused = params[0].device.type in ("cpu", "cuda") or None
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay, fused=fused)
    if s.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, fused=fused
        )
    raise ValueError(f"unknown optimizer {s.optimizer!r}; valid: adam, sgd")


class _FlatOptimizer:
    """The fused Adam / SGD update of :func:`_stacked_optimizer` over the MLP path's one flat
    leaf, without the ``torch.optim.Optimizer`` wrapper around it.

    Runs the kernels that ``torch.optim.Adam(fused=True)`` / ``SGD(fused=True)`` run
    (``torch._fused_adam_`` after a float32 step counter ``+= 1``; ``torch._fused_sgd_``
    with ``is_first_step`` on the first call), with torch.optim's defaults (betas 0.9/0.999,
    eps 1e-8, no amsgrad, no dampening, no Nesterov), so the update is the same bit for bit
    (tests/test_ensemble.py compares them). What it saves: torch.optim's per-step Python
    bookkeeping (grouping tensors by device, state lookups: ~0.4 ms of a ~10 ms digits step
    at K = 64) and, once per process, the ``torch._dynamo`` import that the first
    ``Optimizer`` constructor triggers (~2 s of CPU on 2 cores: each Ray worker paid it in
    its first chunk, BENCHMARKS.md issue 17).
    """

    def __init__(self, flat: _FlatParams, s: FitSettings) -> None:
        if s.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {s.optimizer!r}; valid: adam, sgd")
        self.settings = s
        self.param, self.grad = flat.data, flat.grad
        if s.optimizer == "adam":
            self.exp_avg = torch.zeros_like(self.param)
            self.exp_avg_sq = torch.zeros_like(self.param)
            # torch.optim keeps a fused optimizer's step on the parameters' device, float32
            self.steps = torch.zeros((), dtype=torch.float32, device=self.param.device)
        else:
            self.momentum = [torch.empty_like(self.param)] if s.momentum != 0 else []
            self.first = True

    def step(self) -> None:
        s = self.settings
        if s.optimizer == "adam":
            self.steps.add_(1)
            torch._fused_adam_(
                [self.param], [self.grad], [self.exp_avg], [self.exp_avg_sq], [], [self.steps],
                lr=s.lr, beta1=0.9, beta2=0.999, weight_decay=s.weight_decay, eps=1e-8,
                amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
            )  # fmt: skip
        else:
            torch._fused_sgd_(
                [self.param], [self.grad], self.momentum,
                weight_decay=s.weight_decay, momentum=s.momentum, lr=s.lr, dampening=0.0,
                nesterov=False, maximize=False, is_first_step=self.first and bool(self.momentum),
                grad_scale=None, found_inf=None,
            )  # fmt: skip
            self.first = False


_Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def _mlp_plan(base: nn.Module) -> list[tuple[str, str, bool]] | None:
    """(weight name, bias name, ReLU after?) per Linear of a registry MLP, else None.

    None sends the architecture to the generic vmap path.
    """
    if not isinstance(base, MLP):
        return None
    mods = list(base.net)
    if not mods or not isinstance(mods[0], nn.Flatten):
        return None
    plan: list[list] = []
    for i, m in enumerate(mods[1:], start=1):
        if isinstance(m, nn.Linear) and m.bias is not None:
            plan.append([f"net.{i}.weight", f"net.{i}.bias", False])
        elif isinstance(m, nn.ReLU) and plan and not plan[-1][2]:
            plan[-1][2] = True
        else:
            return None
    return [(w, b, relu) for w, b, relu in plan]


class _FlatParams:
    """The K models' parameters in ONE flat tensor, their gradients in another, and a
    (K, *param_shape) view of each per parameter name.

    One optimizer over the single flat leaf runs one fused kernel per step over every
    parameter of every model (Adam and SGD are elementwise, so this is the same update as
    per-parameter optimizers), and gradients are written straight into their views.
    """

    def __init__(self, stacked: dict[str, torch.Tensor]) -> None:
        first = next(iter(stacked.values()))
        total = sum(t.numel() for t in stacked.values())
        self.data = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.data)
        self.data.grad = self.grad
        self.views: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        offset = 0
        for name, t in stacked.items():
            n = t.numel()
            self.views[name] = self.data[offset : offset + n].view(t.shape)
            self.views[name].copy_(t.detach())
            self.grads[name] = self.grad[offset : offset + n].view(t.shape)
            offset += n

    def state(self) -> dict[str, torch.Tensor]:
        """Name -> (K, ...) copies on CPU (own storage: safe to save or modify)."""
        return {name: _host_copy(v) for name, v in self.views.items()}


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t`` with its own storage. Off a CUDA card it goes through page-locked
    staging: on an H100, 484 MB took 0.33 s as a pageable ``.cpu()`` and 0.055 s this way
    (BENCHMARKS.md)."""
    if t.device.type != "cuda":
        return t.detach().to("cpu", copy=True)
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach()).clone()


class _MLPStep:
    """One training step of K registry MLPs with a hand-written backward pass (no autograd).

    Activations are kept feature-major, (K, features, B), so each layer is one
    ``baddbmm(bias, W (K, out, in), h (K, in, B))`` with the bias add inside the call, and
    the backward pass is, per layer from the last: the ReLU mask
    (``threshold_backward``, in place: autograd's own ReLU backward), the weight gradient
    ``g @ hᵀ`` written by ``bmm(out=)`` straight into the flat gradient buffer in the
    parameter's (K, out, in) layout, the bias gradient ``g.sum(-1, out=)``, and the input
    gradient ``Wᵀ @ g`` (skipped for the first layer). The loss gradient is
    ``(softmax − onehot) / b``, autograd's log-softmax/NLL backward for a per-model mean.
    The same operations autograd runs, minus its bookkeeping, its temporaries and its
    separate passes (gradient accumulation, transposed copies): per layer three batched
    matrix products and three cheap element-wise passes. Activation and gradient buffers
    are allocated once per batch size and reused.
    """

    def __init__(self, plan: list[tuple[str, str, bool]], flat: _FlatParams) -> None:
        self.layers = [
            (flat.views[w], flat.views[b].unsqueeze(-1), flat.grads[w], flat.grads[b], relu)
            for w, b, relu in plan
        ]
        first = self.layers[0][0]
        self.k, self.in_dim = first.shape[0], first.shape[2]
        self.dtype, self.device = first.dtype, first.device
        self._buffers: dict[int, tuple] = {}

    def _buffers_for(self, b: int) -> tuple:
        if b not in self._buffers:
            opts = dict(dtype=self.dtype, device=self.device)
            x = torch.empty(self.k * b, self.in_dim, **opts)
            acts = [torch.empty(self.k, w.shape[1], b, **opts) for w, *_ in self.layers]
            grads = [torch.empty_like(a) for a in acts[:-1]]
            minus_one = torch.full((self.k, 1, b), -1.0, **opts)
            self._buffers[b] = (x, acts, grads, minus_one)
        return self._buffers[b]

    def __call__(self, X2: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every model on its batch; gradients land in the flat
        buffer. ``X2`` (N, D) inputs, ``y`` (N,) labels, ``rows`` (K, b) each model's batch
        rows. Returns the summed (not averaged) loss over the K·b samples, a 0-dim tensor."""
        k, b = rows.shape
        x, acts, grads, minus_one = self._buffers_for(b)
        flat_rows = rows.reshape(-1)
        torch.index_select(X2, 0, flat_rows, out=x)
        x = x.view(k, b, self.in_dim)
        yb = y.index_select(0, flat_rows).view(k, 1, b)
        h = x.transpose(1, 2)  # (K, D, b): a view; batched GEMMs read it transposed
        inputs = []
        for (w, bias, _, _, relu), out in zip(self.layers, acts, strict=True):
            inputs.append(h)
            torch.baddbmm(bias, w, h, out=out)
            if relu:
                out.relu_()
            h = out
        logp = h.log_softmax(1)  # (K, C, b)
        loss = logp.gather(1, yb).sum().neg()
        g = logp.exp_()
        g.scatter_add_(1, yb, minus_one)
        g.mul_(1.0 / b)
        for i in range(len(self.layers) - 1, -1, -1):
            w, _, gw, gb, relu = self.layers[i]
            if relu:  # gradient w.r.t. the pre-activation: zero where the ReLU was off
                torch.ops.aten.threshold_backward.grad_input(g, acts[i], 0, grad_input=g)
            torch.bmm(g, inputs[i].transpose(1, 2), out=gw)
            torch.sum(g, dim=-1, out=gb)
            if i > 0:
                g = torch.bmm(w.transpose(1, 2), g, out=grads[i - 1])
        return loss


def _vmap_forward(base: nn.Module) -> _Forward:
    """Any architecture: f(params {name: (K, ...)}, x (K, B, *shape)) -> logits (K, C, B)."""

    def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, params, (x,))

    batched = vmap(one, in_dims=(0, 0))

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return batched(params, x).transpose(1, 2)

    return forward


def _check_triton(template: nn.Module, model_cfg: ModelConfig, device: torch.device) -> None:
    """Refuse ``conv_kernel="triton"`` where it cannot run, before any work."""
    if not isinstance(template, SmallCNN):
        raise ValueError(
            f"conv_kernel 'triton' covers the registry CNN only, not {model_cfg.name!r}"
        )
    if importlib.util.find_spec("triton") is None:
        raise ValueError("conv_kernel 'triton' needs the triton package (pip install triton)")
    if device.type != "cuda":
        from pipeline_lib.training import ensemble_conv

        if not ensemble_conv.INTERPRETED:
            raise ValueError(
                f"conv_kernel 'triton' runs on CUDA; on {device.type} only in Triton's "
                "interpreter (TRITON_INTERPRET=1 when it is first imported; slow: for tests)"
            )


def _triton_forward(base: nn.Module) -> _Forward:
    """The registry CNN with :mod:`pipeline_lib.training.ensemble_conv`'s kernels:
    f(params {name: (K, ...)}, x (K, B, *shape)) -> logits (K, C, B), as :func:`_vmap_forward`."""
    from pipeline_lib.training import ensemble_conv  # needs triton: imported only when chosen

    convs = sum(isinstance(m, nn.Conv2d) for m in base.modules())

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return ensemble_conv.cnn_forward(params, x, convs)

    return forward


def _init_stacked(
    template: nn.Module, seeds: Sequence[int], pin: bool = False
) -> dict[str, torch.Tensor] | None:
    """The K models' initial parameters, (K, *shape) float32 on CPU, equal to those of
    ``build_model(..., seeds[k])``; None for an architecture this does not cover.

    ``build_model`` seeds the global generator and constructs the registry MLP or CNN, whose
    only random draws are each ``nn.Linear`` / ``nn.Conv2d`` initialising itself in module
    order: ``kaiming_uniform_(weight, a=√5)``, then the bias ~ U(±1/√fan_in). The same
    draws from a ``torch.Generator`` seeded alike (the same Mersenne Twister) written into
    slices of the stacked tensors skip constructing K modules (a third of the time for the
    28×28 MLP, four fifths for the CNN); with several torch threads the seeds are split
    across them (the draws release the GIL). The equivalence tests compare with
    ``build_model`` directly. ``pin``: allocate them page-locked, for an asynchronous copy
    to a CUDA card.
    """
    if type(template) not in (MLP, SmallCNN):
        return None
    layers = []
    for name, module in template.named_modules():
        direct = list(module.parameters(recurse=False))
        if isinstance(module, nn.Linear | nn.Conv2d):
            layers.append((name, module.bias is not None))
        elif direct:
            return None
    stacked = {
        n: torch.empty(len(seeds), *p.shape, dtype=p.dtype, pin_memory=pin)
        for n, p in template.named_parameters()
    }

    def init(k: int) -> None:
        g = torch.Generator().manual_seed(int(seeds[k]))
        for name, has_bias in layers:
            w = stacked[f"{name}.weight"][k]
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
            if has_bias:
                fan_in = w[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                stacked[f"{name}.bias"][k].uniform_(-bound, bound, generator=g)

    workers = min(torch.get_num_threads(), len(seeds))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(init, range(len(seeds))))
    else:
        for k in range(len(seeds)):
            init(k)
    return stacked


def _epoch_orders(gens: list[torch.Generator], n: int) -> torch.Tensor:
    """(K, n): this epoch's ``randperm(n)`` of each model, from each model's own generator."""
    return torch.stack([torch.randperm(n, generator=g) for g in gens])


class _EpochRows:
    """Each epoch's (K, n) rows of X on ``device``: model k's subset in the order of its
    epoch permutation, drawn on the CPU from its own generator exactly as :func:`fit` does.

    On the CPU the permutations are drawn in line when each epoch starts (a thread would
    only take a core from the training). On an accelerator the host work is taken off the
    training's path: the K models are split into contiguous slices drawn by a small thread
    pool (torch releases the GIL; each slice uses its own models' generators, so the result
    is the same as one loop), the first epoch's draw starts as soon as this object is made
    (while the caller builds the models), each next epoch's while the device trains on the
    current one, and the rows travel as int32 through page-locked memory. On an H100, K =
    1,024 permutations of 30,000 took ~0.3 s in one thread, all on the first step's path.
    """

    def __init__(
        self,
        masks: torch.Tensor,
        seeds: Sequence[int],
        n: int,
        epochs: int,
        device: torch.device,
        workers: int | None = None,
    ) -> None:
        k = masks.shape[0]
        # masks.nonzero() is row-major, so row k's columns come out ascending: the same
        # order as X[masks[k]] in the reference, which each epoch's permutation indexes into.
        subset = masks.cpu().nonzero()[:, 1].view(k, n)
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.n, self.epochs, self.device = n, epochs, device
        self.pool: ThreadPoolExecutor | None = None
        if device.type == "cpu":
            self.subset = subset
            return
        self.subset = subset.to(torch.int32) if masks.shape[1] < 2**31 else subset
        workers = workers or max(1, min(8, os.cpu_count() or 1, k))
        self.bounds = [(k * i // workers, k * (i + 1) // workers) for i in range(workers)]
        self.pin = torch.cuda.is_available()
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.pending = self._submit() if epochs > 0 else None

    def _submit(self) -> tuple[torch.Tensor, list]:
        out = torch.empty(self.subset.shape, dtype=self.subset.dtype, pin_memory=self.pin)

        def draw(a: int, b: int) -> None:
            torch.gather(self.subset[a:b], 1, _epoch_orders(self.gens[a:b], self.n), out=out[a:b])

        assert self.pool is not None
        return out, [self.pool.submit(draw, a, b) for a, b in self.bounds if b > a]

    def host_epochs(self) -> Iterator[torch.Tensor]:
        """The accelerator path's host-side rows, epoch by epoch (int32 or int64, CPU)."""
        try:
            for epoch in range(self.epochs):
                assert self.pending is not None
                out, jobs = self.pending
                for job in jobs:
                    job.result()
                self.pending = self._submit() if epoch + 1 < self.epochs else None
                yield out
        finally:
            self.close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.pool is None:
            for _ in range(self.epochs):
                yield self.subset.gather(1, _epoch_orders(self.gens, self.n))
            return
        for rows in self.host_epochs():
            yield rows.to(self.device, non_blocking=True).long()

    def __enter__(self) -> _EpochRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the draw threads (pending draws are cancelled or awaited)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# --------------------------------------------------------------------------- fast path


#: ``cpu_parallel`` of :func:`train_ensemble` (the ``ray.cpu_parallel`` setting).
CPU_PARALLEL = {
    "models": "the K models split across threads, one torch thread each",
    "ops": "all K models in one loop, torch's intra-op threads inside each kernel",
}

#: ``conv_kernel`` of :func:`train_ensemble`: how the registry CNN's convolutions run.
CONV_KERNELS = {
    "vmap": "torch.func.vmap: one grouped convolution (groups=K) per layer",
    "triton": "one Triton implicit-GEMM launch per layer for all K models (ensemble_conv)",
}

#: ``cpu_block_mib`` of :func:`train_ensemble` (``ray.cpu_block_mib``): on the CPU the
#: registry MLP's models are trained in blocks whose parameters, gradients and optimizer
#: state take at most this many MiB. 8 MiB is 16-20 digits MLPs 128-128 in float32.
CPU_BLOCK_MIB = 8.0


def _cpu_blocks(
    k: int, template: nn.Module, dtype: torch.dtype, settings: FitSettings, threads: int,
    block_mib: float,
) -> list[tuple[int, int]]:  # fmt: skip
    """Contiguous [lo, hi) blocks of the K models for the CPU: at least one per thread, a
    multiple of ``threads`` of them (no thread idles at the end), each of at most
    ``block_mib`` MiB of training state when the architecture is the registry MLP.

    Why blocks: one fused Adam step streams every parameter, gradient and both moments (28
    bytes per float32 parameter), and each layer's products read the stacked weights; with
    K = 64 digits MLPs that is 27 MB per step, past the per-core cache, so the step waits on
    memory, and two workers on two cores share that bandwidth (issue 17: two Ray workers
    needed 59% more trainer seconds than one). A block of 16 keeps its state near the
    core's 4 MB L2 cache; measured on 2 cores (BENCHMARKS.md) it cost no more CPU time
    alone and nothing extra next to a second worker. Other architectures (the CNN, whose
    activations dominate) are not blocked by size.
    """
    n_blocks = 1
    if block_mib > 0 and _mlp_plan(template) is not None:
        arrays = 4 if settings.optimizer == "adam" else 3  # params, grads, optimizer state
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_model = sum(p.numel() for p in template.parameters()) * itemsize * arrays
        n_blocks = math.ceil(k / max(1, int(block_mib * 2**20 // per_model)))
    n_blocks = min(k, threads * math.ceil(n_blocks / threads))
    return [(k * i // n_blocks, k * (i + 1) // n_blocks) for i in range(n_blocks)]


def _train_blocks(
    blocks: list[tuple[int, int]],
    threads: int,
    model_cfg: ModelConfig,
    shape: tuple[int, ...],
    n_classes: int,
    X: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    seeds: Sequence[int],
    settings: FitSettings,
    conv_kernel: str = "vmap",
    flush_denormal: bool = True,
) -> dict[str, torch.Tensor]:
    """Train each block of models by itself (one :func:`train_ensemble` loop per block),
    concatenated in model order. With ``threads`` > 1 (``cpu_parallel="models"``) the
    blocks are shared out to that many Python threads, each with ONE torch thread.

    Why threads: the small batched kernels of an ensemble step (a few hundred microseconds
    each) scale badly over torch's intra-op threads: every kernel ends at an OpenMP barrier,
    and one descheduled thread stalls the other. Independent blocks never wait for each
    other (torch releases the GIL inside its kernels). The models share nothing, so every
    model's result is the one it gets in a single loop: same seeds, permutations and
    per-model arithmetic (the equivalence tests run every setting).

    ``torch.set_num_threads(1)`` inside a worker thread sets that thread's OpenMP and MKL
    thread counts (both are per-thread settings) and torch's process default for threads
    that start later; the caller's own count is untouched and the default is restored here.
    """

    def train_block(lo: int, hi: int, set_threads: bool) -> dict[str, torch.Tensor]:
        if set_threads:
            torch.set_num_threads(1)
        return train_ensemble(
            model_cfg, shape, n_classes, X, y, masks[lo:hi], seeds[lo:hi], settings,
            cpu_parallel="ops", cpu_block_mib=0, conv_kernel=conv_kernel,
            flush_denormal=flush_denormal,
        )  # fmt: skip

    if threads == 1:
        parts = [train_block(lo, hi, False) for lo, hi in blocks]
    else:
        before = torch.get_num_threads()
        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ensemble") as pool:
                parts = list(pool.map(lambda b: train_block(*b, True), blocks))
        finally:
            torch.set_num_threads(before)
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def train_ensemble(
    model_cfg: ModelConfig,
    shape: tuple[int, ...],
    n_classes: int,
    X: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    seeds: Sequence[int],
    settings: FitSettings,
    device: torch.device | None = None,
    compile: bool = False,
    cpu_parallel: str = "models",
    cpu_block_mib: float = CPU_BLOCK_MIB,
    conv_kernel: str = "vmap",
    flush_denormal: bool = True,
) -> dict[str, torch.Tensor]:
    """Train K models at once; model k sees only ``X[masks[k]]``.

    Args:
        X: (N, *shape) inputs, floating point; the models are cast to ``X.dtype``.
        y: (N,) int64 labels.
        masks: (K, N) bool; every row must select the same number n of samples.
        seeds: K seeds; model k is initialised by ``build_model(..., seeds[k])`` and shuffled
            by ``torch.Generator().manual_seed(seeds[k])``, exactly as :func:`fit` does.
        settings: epochs, batch size, optimizer; shared by all models.
        device: where to train (default CPU).
        compile: ``torch.compile`` the forward and loss of the generic (non-MLP) path, so
            its element-wise work is fused (same results to float rounding). Meant for
            accelerators: compiling takes minutes on a small CPU. The MLP path ignores it.
        cpu_parallel: how several torch threads are used on the CPU (see
            :data:`CPU_PARALLEL`): ``"models"`` (default) splits the K models into blocks,
            at least one per torch thread, trained on that many threads with one torch
            thread each; ``"ops"`` trains the blocks one after another with torch's
            intra-op threads inside each kernel.
        cpu_block_mib: on the CPU, the registry MLP's models are trained in blocks whose
            parameters, gradients and optimizer state take at most this many MiB (see
            :func:`_cpu_blocks`); 0: no limit. Each model's result is the same whatever
            the blocks and threads (its arithmetic does not depend on the other models).
        conv_kernel: how the registry CNN's convolutions run (see :data:`CONV_KERNELS`):
            ``"vmap"`` (default), ``torch.func.vmap``, which gives one grouped convolution
            of ``groups=K``; ``"triton"``, one Triton implicit-GEMM launch per convolution
            for all K models (:mod:`pipeline_lib.training.ensemble_conv`; needs the
            ``triton`` package, on a CPU only under ``TRITON_INTERPRET=1``). Same models to
            float rounding; other architectures ignore it.
        flush_denormal: train under :func:`pipeline_lib.denormals.flush_denormals`
            (default), as :func:`fit` does: on the CPU, Adam moments that decay below
            float32's smallest normal number (weights whose gradient stays zero) otherwise
            take the CPU's slow path for denormals, up to 1.8× slower on long runs, for no
            change in the weights. Off is for measuring it (``benchmarks/denormals.py``).

    Returns:
        Stacked state dict on CPU: parameter name -> (K, *param_shape); ``unstack(sd, k)``
        is the state dict of model k.

    Raises:
        ValueError: masks/seeds/X/y disagree in shape, rows of ``masks`` select different
            numbers of samples (the counts are named), a subset is empty, the optimizer
            name is unknown, ``cpu_parallel`` is neither ``"models"`` nor ``"ops"``, or
            ``conv_kernel`` is unknown or ``"triton"`` for a model that is not the registry
            CNN.
    """
    n = _check_inputs(X, y, masks, seeds)
    k = masks.shape[0]
    device = device or torch.device("cpu")
    if cpu_parallel not in CPU_PARALLEL:
        raise ValueError(
            f"cpu_parallel must be one of {sorted(CPU_PARALLEL)}, got {cpu_parallel!r}"
        )
    if conv_kernel not in CONV_KERNELS:
        raise ValueError(f"conv_kernel must be one of {sorted(CONV_KERNELS)}, got {conv_kernel!r}")
    dtype = X.dtype if X.is_floating_point() else torch.get_default_dtype()

    template = build_model(model_cfg, shape, n_classes, seeds[0])
    if any(True for _ in template.buffers()):
        raise ValueError("train_ensemble: models with buffers (e.g. BatchNorm) are not supported")
    if conv_kernel == "triton":
        _check_triton(template, model_cfg, device)
    # (on the CPU the Triton kernels run in Triton's interpreter, which is not thread-safe)
    if device.type == "cpu" and not compile and conv_kernel == "vmap":
        threads = torch.get_num_threads() if cpu_parallel == "models" else 1
        blocks = _cpu_blocks(k, template, dtype, settings, threads, cpu_block_mib)
        if len(blocks) > 1:
            threads = min(threads, len(blocks))
            return _train_blocks(
                blocks, threads, model_cfg, shape, n_classes, X, y, masks, seeds, settings,
                conv_kernel, flush_denormal,
            )  # fmt: skip
    # on an accelerator the first epoch's permutations are drawn while the models are built
    with _EpochRows(masks, seeds, n, settings.epochs, device) as epoch_rows:
        # page-locked on CUDA so the K models go to the card asynchronously
        stacked = _init_stacked(template, seeds, pin=device.type == "cuda")
        if stacked is None:  # an architecture _init_stacked does not know: build each model
            models = [build_model(model_cfg, shape, n_classes, s).to(device, dtype) for s in seeds]
            params, _ = stack_module_state(models)  # name -> (K, ...) leaves with requires_grad
            del models
        else:
            params = {
                n: t.to(device, dtype, non_blocking=True).requires_grad_()
                for n, t in stacked.items()
            }
            del stacked
        base = copy.deepcopy(template).to("meta")
        plan = _mlp_plan(base)
        Xd = X.to(device, dtype)
        yd = y.to(device)
        if plan is not None:  # registry MLP: hand-written backward over one flat parameter tensor
            flat = _FlatParams(params)
            del params
            if flat.data.device.type in ("cpu", "cuda"):  # torch's fused kernels, called directly
                opt = _FlatOptimizer(flat, settings)
            else:
                opt = _stacked_optimizer([flat.data], settings)
            mlp_step = _MLPStep(plan, flat)
            X2 = Xd.reshape(len(Xd), -1)

            def step(rows: torch.Tensor) -> torch.Tensor:
                return mlp_step(X2, yd, rows)

            state = flat.state
        else:  # any other architecture: vmap over functional_call, autograd
            forward = _triton_forward(base) if conv_kernel == "triton" else _vmap_forward(base)
            opt = _stacked_optimizer(list(params.values()), settings)

            def summed_loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor):
                return nn.functional.cross_entropy(forward(p, xb), yb, reduction="sum")

            loss_of = torch.compile(summed_loss) if compile else summed_loss

            def step(rows: torch.Tensor) -> torch.Tensor:
                b = rows.shape[1]
                # one gather of all K batches; index_select is ~4x faster than Xd[rows] on CPU
                flat_rows = rows.reshape(-1)
                xb = Xd.index_select(0, flat_rows).view(k, b, *Xd.shape[1:])  # (K, b, *shape)
                yb = yd.index_select(0, flat_rows).view(k, b)  # (K, b)
                opt.zero_grad(set_to_none=True)
                # Σ_k mean_k: the gradient for model k is its own mean-loss gradient
                loss = loss_of(params, xb, yb)
                (loss / b).backward()
                return loss.detach()

            def state() -> dict[str, torch.Tensor]:
                return {name: _host_copy(p) for name, p in params.items()}

        bs = settings.batch_size
        t0 = time.perf_counter()
        with flush_denormals(flush_denormal):
            for epoch, idx in enumerate(epoch_rows):
                total = torch.zeros((), dtype=dtype, device=device)
                for start in range(0, n, bs):
                    # (K, b) rows of X; b < bs for the last partial batch
                    total += step(idx[:, start : start + bs])
                    opt.step()
                log.info(
                    "epoch %d/%d mean loss over %d models %.4f (%.1fs)",
                    epoch + 1,
                    settings.epochs,
                    k,
                    float(total) / (n * k),
                    time.perf_counter() - t0,
                )
        return state()


@torch.no_grad()
def ensemble_logits(
    model_cfg: ModelConfig,
    shape: tuple[int, ...],
    n_classes: int,
    stacked: dict[str, torch.Tensor],
    X: torch.Tensor,
    batch_size: int = 1024,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logits (K, T, n_classes) on CPU of every model for X (T, *shape); eval mode, no grad.

    Runs on ``device`` (default: the device of ``stacked``); X is cast to its dtype.
    """
    if device is not None:
        stacked = {name: t.to(device) for name, t in stacked.items()}
    first = next(iter(stacked.values()))
    k, device, dtype = first.shape[0], first.device, first.dtype
    base = build_model(model_cfg, shape, n_classes, 0).to("meta", dtype).eval()

    def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, params, (x,))

    forward = vmap(one, in_dims=(0, None))  # X shared by all models
    if len(X) == 0:
        return torch.empty(k, 0, n_classes, dtype=dtype)
    out = [
        forward(stacked, X[i : i + batch_size].to(device, dtype)).cpu()
        for i in range(0, len(X), batch_size)
    ]
    return torch.cat(out, dim=1)


def unstack(stacked: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """State dict of model k: name -> (*param_shape), for ``model.load_state_dict``."""
    return {name: t[k] for name, t in stacked.items()}


# --------------------------------------------------------------------------- reference


def train_ensemble_reference(
    model_cfg: ModelConfig,
    shape: tuple[int, ...],
    n_classes: int,
    X: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    seeds: Sequence[int],
    settings: FitSettings,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Slow reference of :func:`train_ensemble`: K calls of :func:`fit`, one model at a time.

    Same arguments and result ((K, *param_shape) per name, on CPU).
    """
    _check_inputs(X, y, masks, seeds)
    dtype = X.dtype if X.is_floating_point() else torch.get_default_dtype()
    states = []
    for mask, seed in zip(masks, seeds, strict=True):
        model = build_model(model_cfg, shape, n_classes, seed).to(dtype)
        fit(model, X[mask], y[mask], settings, seed, device=device)
        states.append({n: p.detach().cpu() for n, p in model.named_parameters()})
    return {name: torch.stack([s[name] for s in states]) for name in states[0]}


def ensemble_logits_reference(
    model_cfg: ModelConfig,
    shape: tuple[int, ...],
    n_classes: int,
    stacked: dict[str, torch.Tensor],
    X: torch.Tensor,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Slow reference of :func:`ensemble_logits`: :func:`predict_logits` per model, (K, T, C)."""
    first = next(iter(stacked.values()))
    out = []
    for k in range(first.shape[0]):
        model = build_model(model_cfg, shape, n_classes, 0).to(first.device, first.dtype)
        model.load_state_dict(unstack(stacked, k))
        out.append(predict_logits(model, X.to(first.dtype), batch_size))
    return torch.stack(out)


# --------------------------------------------------------------------------- FLOPs


def train_step_flops(
    model_cfg: ModelConfig, shape: tuple[int, ...], n_classes: int, batch_size: int
) -> float:
    """Forward+backward FLOPs of ONE model on one batch of ``batch_size`` samples.

    Counted from the Linear and Conv2d layers only (bias adds, activations, pooling and the
    loss are ignored): forward multiply-adds M per sample, FLOPs = 2 · M (a multiply-add is 2
    FLOPs) · 3 (backward ≈ twice the forward: input- and weight-gradient) · batch_size.
    Conv output sizes are read from one traced forward of a single zero sample.
    """
    model = build_model(model_cfg, shape, n_classes, 0)
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_out = (module.in_channels // module.groups) * kh * kw
            macs += out[0].numel() * per_out  # out[0]: (C_out, H_out, W_out) of the one sample

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        for h in hooks:
            h.remove()
    return float(2 * 3 * macs * batch_size)
