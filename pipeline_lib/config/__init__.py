"""Typed, frozen configuration parsed from ``params.yaml``.

Each top-level section of ``params.yaml`` maps onto one frozen dataclass below. Parsing is
strict: an unknown key or a value of the wrong type raises :class:`ConfigError` naming the
full dotted key (``train.lr``), so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A parameter file or override is malformed; the message names the offending key."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to prepare and how to split it."""

    name: str = "digits"
    #: fashion-mnist: directory of IDX files; parquet: path of the user's table.
    path: str | None = None
    test_fraction: float = 0.2
    seed: int = 0
    #: Optional seeded subsample sizes (quick runs on large sets); null keeps everything.
    max_train: int | None = None
    max_test: int | None = None
    out_dir: str = "data/prepared"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture from the model registry."""

    name: str = "mlp"
    hidden: tuple[int, ...] = (128, 128)
    channels: tuple[int, ...] = (16, 32)
    #: vit (transformers ViTForImageClassification from a config): patch side, width,
    #: blocks, heads, MLP width.
    vit_patch: int = 7
    vit_dim: int = 64
    vit_depth: int = 2
    vit_heads: int = 4
    vit_mlp: int = 128


@dataclass(frozen=True)
class TrainConfig:
    """Single-model training (original model and retrain-from-scratch oracle)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    seed: int = 0
    oracle_seed: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Mnemonic codes (Yamashita et al. 2024): probability that a training sample is swapped
    #: for its class's random code (paper: 0.1 MNIST-like, 0.3 CIFAR-10); 0 turns it off.
    mnemonic_t_mix: float = 0.0
    #: Seed of the codes x_c ~ U[0, 1]^shape.
    mnemonic_seed: int = 0


@dataclass(frozen=True)
class RequestConfig:
    """Where the deletion request lives and where its id manifests are written."""

    file: str = "requests/example.yaml"
    out_dir: str = "data/forget"


@dataclass(frozen=True)
class FisherConfig:
    """Per-sample Fisher diagonal (algorithms.md §1).

    ``kind``: ``true_expected`` sums over classes weighted by the model's probabilities (exact
    true Fisher, deterministic; default), ``true_sampled`` draws one label from the model per
    sample, ``empirical`` uses the dataset label.
    """

    kind: Literal["true_expected", "true_sampled", "empirical"] = "true_expected"
    batch_size: int = 256
    seed: int = 0
    #: Seeded subsample of the retain set used for I_R (null: all of it).
    max_retain: int | None = None


@dataclass(frozen=True)
class FisherDiagonalParams:
    """DeepClean Fisher-diagonal forgetting (algorithms.md §1)."""

    #: γ: reset weights with I_F/(I_R+ε) > threshold. Null: use ``top_fraction`` instead.
    threshold: float | None = None
    #: Fraction of weights with the largest ratio to reset when ``threshold`` is null.
    top_fraction: float = 0.2
    eps: float = 1e-8
    #: Value the selected weights restart from (the paper leaves it open).
    reset: Literal["zero", "reinit"] = "zero"
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64


@dataclass(frozen=True)
class FinetuneParams:
    """Fine-tune baseline: continue training all weights on the retain set."""

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64


@dataclass(frozen=True)
class RetrainParams:
    """Retrain baseline: train from scratch on the retain set with the ``train`` section."""

    seed: int = 2


@dataclass(frozen=True)
class NegGradPlusParams:
    """NegGrad+ baseline (Kurmanji et al. 2023, as defined in SCRUB's paper).

    Loss per step: ``beta·CE(retain batch) − (1 − beta)·CE(forget batch)``; Adam.
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    #: Weight of the retain (descent) term; the forget (ascent) term gets 1 − beta. The
    #: paper tunes it per setting; 0.9 keeps retain accuracy on small MLPs.
    beta: float = 0.9


@dataclass(frozen=True)
class ScrubParams:
    """SCRUB (Kurmanji et al., NeurIPS 2023): teacher-student max/min distillation; Adam."""

    #: Total epochs; every epoch ends with one min-pass over the retain set.
    epochs: int = 5
    #: The first ``max_steps`` epochs also start with one max-pass over the forget set.
    max_steps: int = 2
    lr: float = 1e-3
    batch_size: int = 64
    #: Min-step loss: alpha_ce·CE + gamma_kl·KL on the retain set (algorithms.md: 0.99, 0.1).
    alpha_ce: float = 0.99
    gamma_kl: float = 0.1
    #: Distillation temperature T (the KL terms are scaled by T², as in the SCRUB code).
    temperature: float = 4.0


@dataclass(frozen=True)
class SalunParams:
    """SalUn (Fan et al., ICLR 2024): saliency-masked random-label fine-tuning; Adam."""

    #: Fraction of all weights (largest |∇ CE on F|) that may move; paper range 0.1–0.5.
    saliency_fraction: float = 0.5
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64


@dataclass(frozen=True)
class DmmParams:
    """Datamodel Matching (Georgiev et al., ICLR 2025): fine-tune to DM-Direct targets by MSE
    on logits over F plus ``retain_multiple``·|F| retain points; paper defaults. The datamodels
    come from the subset-model store of the ``attribution`` section (estimator, lam)."""

    epochs: int = 5
    lr: float = 5e-4
    batch_size: int = 512
    lr_decay: float = 0.95  # learning rate × lr_decay after every epoch
    retain_multiple: float = 3.0
    weight_reg: float = 0.0  # λ of the optional λ‖θ − θ0‖² term (0 in the paper)


@dataclass(frozen=True)
class OracleMatchingParams:
    """Oracle Matching: the same fine-tuning toward the mean logits of ``n_oracles`` models
    retrained on R (their own seeds, disjoint from the evaluation oracles)."""

    epochs: int = 5
    lr: float = 5e-4
    batch_size: int = 512
    lr_decay: float = 0.95
    retain_multiple: float = 3.0
    weight_reg: float = 0.0
    n_oracles: int = 10
    #: Seed of their oracle store; differs from ``attribution.seed`` so the targets' oracles
    #: are never the oracles an evaluation compares against.
    seed: int = 1


@dataclass(frozen=True)
class SsdParams:
    """Selective Synaptic Dampening (Foster et al., AAAI 2024) on the shared Fisher stats."""

    #: α: select θ_i with I_F,i > alpha · I_D,i. The paper's 10 is for squared mini-batch
    #: gradients; with the per-sample Fisher I_F/I_D <= |D|/|F|, so alpha must be below
    #: |D|/|F| (10 for one class of ten): 2 here (BENCHMARKS.md).
    alpha: float = 2.0
    #: λ: dampen the selected to θ_i · min(lam · I_D,i / I_F,i, 1) (paper: 1).
    lam: float = 1.0


@dataclass(frozen=True)
class FisherForgettingParams:
    """Fisher forgetting (Golatkar et al., CVPR 2020): θ + sqrt(α·min(1/(I_R+ε), v_max))·N(0,1)."""

    alpha: float = 1e-6
    eps: float = 1e-8
    #: v_max: clamp of 1/(I_R+ε) before scaling by α (the authors' code: 1e3).
    var_clamp: float = 1000.0


@dataclass(frozen=True)
class SvdProjectionParams:
    """SVD class forgetting (Kodge et al., TMLR 2024): gradient-free projection of every
    Linear/Conv layer off the class-discriminatory activation space."""

    #: α_r, α_f: scaling of the retain and forget spaces (paper, CIFAR-10: 100 and 3).
    alpha_r: float = 100.0
    alpha_f: float = 3.0
    #: Seeded samples per retained class and per forgotten class (paper: 100 per class).
    retain_per_class: int = 100
    forget_per_class: int = 100
    #: Samples per forward pass (memory only; the result does not depend on it).
    batch_size: int = 256
    #: Optional α search (the paper tunes α_r, α_f per model on a grid; its reference grid is
    #: α_r ∈ {10, 30, 100, 300, 1000}, α_f ∈ {1, 3, 10, 30, 100}). Both empty: use α_r, α_f
    #: as given. Otherwise every pair of the grids (an empty grid = its single α) is tried
    #: and the one with the highest retain-sample accuracy − forget-sample accuracy on the
    #: samples the method already read is kept (no other data is read).
    alpha_r_grid: tuple[float, ...] = ()
    alpha_f_grid: tuple[float, ...] = ()


@dataclass(frozen=True)
class MnemonicCodeParams:
    """Mnemonic-code one-shot class unlearning (Yamashita et al., ACML 2024): step
    s = min(lambda1, lambda2 / max R). Paper: MNIST MLP 1e-3 / 10; CIFAR-10 ResNet-18 1e-5 / 1e4.
    Needs a model trained with ``train.mnemonic_t_mix`` > 0."""

    lambda1: float = 1e-3
    lambda2: float = 10.0


@dataclass(frozen=True)
class UnlearnConfig:
    """Which unlearning method runs, with one typed sub-section per method."""

    method: str = "fisher_diagonal"
    seed: int = 0
    fisher_diagonal: FisherDiagonalParams = field(default_factory=FisherDiagonalParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)
    neggrad_plus: NegGradPlusParams = field(default_factory=NegGradPlusParams)
    scrub: ScrubParams = field(default_factory=ScrubParams)
    salun: SalunParams = field(default_factory=SalunParams)
    dmm: DmmParams = field(default_factory=DmmParams)
    oracle_matching: OracleMatchingParams = field(default_factory=OracleMatchingParams)
    ssd: SsdParams = field(default_factory=SsdParams)
    fisher_forgetting: FisherForgettingParams = field(default_factory=FisherForgettingParams)
    svd_projection: SvdProjectionParams = field(default_factory=SvdProjectionParams)
    mnemonic_code: MnemonicCodeParams = field(default_factory=MnemonicCodeParams)

    def method_params(self, name: str | None = None) -> Any:
        """The typed hyper-parameters of ``name`` (default: the selected method)."""
        return getattr(self, name or self.method)


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation (shared/reference/evaluation.md)."""

    seed: int = 0
    mia_folds: int = 5
    #: RBF-SVC settings of SalUn's MIA-efficacy.
    mia_svc_c: float = 3.0
    report_dir: str = "reports"
    #: ``unlearn evaluate``: N originals (seeds) unlearned by every method, and N oracles.
    n_models: int = 20
    #: Store seeds of the evaluation's originals and oracles: distinct from each other and
    #: from attribution.seed / oracle_matching.seed, so no two roles share model seeds.
    originals_seed: int = 100
    oracles_seed: int = 200


@dataclass(frozen=True)
class TrackingConfig:
    """Where MLflow, DVC and artifacts live."""

    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "unlearnflow"
    dvc_root: str = "."
    artifacts_dir: str = "artifacts"


@dataclass(frozen=True)
class AttributionConfig:
    """Many-model training for datamodels and oracles (algorithms.md §2, evaluation.md)."""

    #: M subset models; the last ``lds_heldout`` of them are held out to measure LDS.
    n_models: int = 256
    #: Subset fraction |S_j| = alpha·N.
    alpha: float = 0.5
    #: Models per chunk: the unit of work of one Ray task (one vectorised ensemble).
    chunk_size: int = 32
    seed: int = 0
    #: Epochs of each subset model (null: train.epochs).
    epochs: int | None = None
    output_dtype: Literal["float16", "float32"] = "float16"
    out_dir: str = "artifacts/attribution"
    lds_heldout: int = 32
    estimator: Literal["ridge_dual", "diff_means"] = "ridge_dual"
    #: Ridge penalty of the dual-form datamodel fit.
    lam: float = 1.0
    #: Oracles trained per request by ``unlearn oracles`` (default count).
    oracles: int = 20


@dataclass(frozen=True)
class RayConfig:
    """Ray connection: null address uses RAY_ADDRESS if set, else starts a local Ray."""

    address: str | None = None
    #: CPUs of a local Ray (null: all).
    num_cpus: int | None = None
    #: CPUs per chunk task; torch in the task uses that many threads.
    cpus_per_task: int = 1


@dataclass(frozen=True)
class StatsConfig:
    """Sharded statistics (``unlearn stats``): the split is written as Parquet shards, one
    ``ray.remote`` task per shard computes partial sums, one reduce step adds them."""

    #: Number of Parquet shards the split is cut into (the unit of Ray work).
    n_shards: int = 4
    #: Shard tasks in flight at once (null: CPUs of the cluster ÷ ray.cpus_per_task).
    workers: int | None = None
    #: Where shards and statistics files go.
    out_dir: str = "artifacts/stats"
    #: Rows of a shard per forward pass (activation statistics).
    batch_size: int = 256
    #: How the pipeline computes Fisher statistics it does not find under ``out_dir``:
    #: ``local`` (in the flow's process; on small data Ray's start-up would dominate) or
    #: ``ray`` (Parquet shards, one Ray task each, as ``unlearn stats``). Both give the same
    #: values and write the same file.
    fisher_backend: Literal["ray", "local"] = "local"


@dataclass(frozen=True)
class Params:
    """The whole ``params.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    request: RequestConfig = field(default_factory=RequestConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)

    def resolve(self, path: str) -> Path:
        """``path`` if absolute, else relative to ``tracking.dvc_root`` (where the DVC stages
        run), as an absolute path: the one rule for every path in a params file."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.tracking.dvc_root).resolve() / p


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return parse_section(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        item_tp = args[0]
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            # YAML 1.1 reads "1e-3" (no dot) as a string: accept what float() accepts.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")  # pragma: no cover


def parse_section(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build frozen dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Load the raw mapping of a params file with a clear error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def build_params(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Params:
    """Parse a raw mapping plus dotted-key ``overrides`` into :class:`Params`."""
    tree = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    params = parse_section(Params, tree)
    validate_ranges(params)
    validate_names(params)
    return params


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Overrides taken from the environment, so the same code runs against shared services:
    ``MLFLOW_TRACKING_URI`` sets ``tracking.mlflow_uri`` and ``RAY_ADDRESS`` sets
    ``ray.address``. Explicit overrides win over these."""
    out: dict[str, Any] = {}
    if environ.get("MLFLOW_TRACKING_URI"):
        out["tracking.mlflow_uri"] = environ["MLFLOW_TRACKING_URI"]
    if environ.get("RAY_ADDRESS"):
        out["ray.address"] = environ["RAY_ADDRESS"]
    return out


def load_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read ``params.yaml`` and apply overrides such as ``{"unlearn.method": "finetune"}``."""
    return build_params(read_params_file(path), overrides)


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


_POSITIVE = "must be > 0"
#: (dotted key, predicate, what it must be). Checked after types, before any work.
_RANGES: tuple[tuple[str, Any, str], ...] = (
    ("data.test_fraction", lambda v: 0.0 < v < 1.0, "must be in (0, 1)"),
    ("data.max_train", lambda v: v is None or v > 0, _POSITIVE),
    ("data.max_test", lambda v: v is None or v > 0, _POSITIVE),
    ("model.vit_patch", lambda v: v > 0, _POSITIVE),
    ("model.vit_dim", lambda v: v > 0, _POSITIVE),
    ("model.vit_depth", lambda v: v > 0, _POSITIVE),
    ("model.vit_heads", lambda v: v > 0, _POSITIVE),
    ("model.vit_mlp", lambda v: v > 0, _POSITIVE),
    ("train.epochs", lambda v: v > 0, _POSITIVE),
    ("train.batch_size", lambda v: v > 0, _POSITIVE),
    ("train.lr", lambda v: v > 0, _POSITIVE),
    ("train.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("fisher.batch_size", lambda v: v > 0, _POSITIVE),
    ("fisher.max_retain", lambda v: v is None or v > 0, _POSITIVE),
    ("unlearn.fisher_diagonal.top_fraction", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    ("unlearn.fisher_diagonal.eps", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.fisher_diagonal.epochs", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.fisher_diagonal.lr", lambda v: v > 0, _POSITIVE),
    ("unlearn.fisher_diagonal.batch_size", lambda v: v > 0, _POSITIVE),
    ("unlearn.finetune.epochs", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.finetune.lr", lambda v: v > 0, _POSITIVE),
    ("unlearn.finetune.batch_size", lambda v: v > 0, _POSITIVE),
    ("unlearn.neggrad_plus.epochs", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.neggrad_plus.lr", lambda v: v > 0, _POSITIVE),
    ("unlearn.neggrad_plus.batch_size", lambda v: v > 0, _POSITIVE),
    ("unlearn.neggrad_plus.beta", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    ("unlearn.scrub.epochs", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.scrub.max_steps", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.scrub.lr", lambda v: v > 0, _POSITIVE),
    ("unlearn.scrub.batch_size", lambda v: v > 0, _POSITIVE),
    ("unlearn.scrub.alpha_ce", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.scrub.gamma_kl", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.scrub.temperature", lambda v: v > 0, _POSITIVE),
    ("unlearn.salun.saliency_fraction", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    ("unlearn.salun.epochs", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.salun.lr", lambda v: v > 0, _POSITIVE),
    ("unlearn.salun.batch_size", lambda v: v > 0, _POSITIVE),
    ("unlearn.dmm.epochs", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.dmm.lr", lambda v: v > 0, _POSITIVE),
    ("unlearn.dmm.batch_size", lambda v: v > 0, _POSITIVE),
    ("unlearn.dmm.lr_decay", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    ("unlearn.dmm.retain_multiple", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.dmm.weight_reg", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.oracle_matching.epochs", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.oracle_matching.lr", lambda v: v > 0, _POSITIVE),
    ("unlearn.oracle_matching.batch_size", lambda v: v > 0, _POSITIVE),
    ("unlearn.oracle_matching.lr_decay", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    ("unlearn.oracle_matching.retain_multiple", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.oracle_matching.weight_reg", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.oracle_matching.n_oracles", lambda v: v > 0, _POSITIVE),
    ("evaluate.mia_folds", lambda v: v >= 2, "must be >= 2"),
    ("evaluate.mia_svc_c", lambda v: v > 0, _POSITIVE),
    (
        "evaluate.n_models",
        lambda v: v >= 4,
        "must be >= 4 (the noise floor splits the oracles in halves)",
    ),
    ("ray.num_cpus", lambda v: v is None or v > 0, _POSITIVE),
    ("ray.cpus_per_task", lambda v: v > 0, _POSITIVE),
    ("attribution.n_models", lambda v: v > 0, _POSITIVE),
    ("attribution.alpha", lambda v: 0.0 < v < 1.0, "must be in (0, 1)"),
    ("attribution.chunk_size", lambda v: v > 0, _POSITIVE),
    ("attribution.epochs", lambda v: v is None or v > 0, _POSITIVE),
    ("attribution.lds_heldout", lambda v: v >= 0, "must be >= 0"),
    ("attribution.lam", lambda v: v > 0, _POSITIVE),
    ("attribution.oracles", lambda v: v > 0, _POSITIVE),
    ("unlearn.ssd.alpha", lambda v: v > 0, _POSITIVE),
    ("unlearn.ssd.lam", lambda v: v > 0, _POSITIVE),
    ("unlearn.fisher_forgetting.alpha", lambda v: v >= 0, "must be >= 0"),
    ("unlearn.fisher_forgetting.eps", lambda v: v > 0, _POSITIVE),
    ("unlearn.fisher_forgetting.var_clamp", lambda v: v > 0, _POSITIVE),
    ("unlearn.svd_projection.alpha_r", lambda v: v > 0, _POSITIVE),
    ("unlearn.svd_projection.alpha_f", lambda v: v > 0, _POSITIVE),
    ("unlearn.svd_projection.retain_per_class", lambda v: v > 0, _POSITIVE),
    ("unlearn.svd_projection.forget_per_class", lambda v: v > 0, _POSITIVE),
    ("unlearn.svd_projection.batch_size", lambda v: v > 0, _POSITIVE),
    ("unlearn.svd_projection.alpha_r_grid", lambda v: all(a > 0 for a in v), "values must be > 0"),
    ("unlearn.svd_projection.alpha_f_grid", lambda v: all(a > 0 for a in v), "values must be > 0"),
    ("train.mnemonic_t_mix", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("unlearn.mnemonic_code.lambda1", lambda v: v > 0, _POSITIVE),
    ("unlearn.mnemonic_code.lambda2", lambda v: v > 0, _POSITIVE),
    ("stats.n_shards", lambda v: v > 0, _POSITIVE),
    ("stats.workers", lambda v: v is None or v > 0, _POSITIVE),
    ("stats.batch_size", lambda v: v > 0, _POSITIVE),
)


def validate_ranges(params: Params) -> None:
    """Value ranges that types cannot express; the error names the key."""
    for dotted, ok, what in _RANGES:
        value: Any = params
        for part in dotted.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ConfigError(f"{dotted}: {what}, got {value!r}")


def validate_names(params: Params) -> None:
    """Check registry-backed names; the error lists the valid choices."""
    from pipeline_lib.data.images import DATASETS
    from pipeline_lib.methods import METHODS
    from pipeline_lib.models.image import MODELS

    for key, value, registry in (
        ("data.name", params.data.name, DATASETS),
        ("model.name", params.model.name, MODELS),
        ("unlearn.method", params.unlearn.method, METHODS),
    ):
        if value not in registry:
            raise ConfigError(
                f"{key}: unknown name {value!r}; valid: {', '.join(sorted(registry))}"
            )


def to_dict(params: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(params))


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view (``train.lr``) used for tracking parameters."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(params) if not isinstance(params, dict) else params).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def replace(section: Any, **changes: Any) -> Any:
    """A copy of a config section with ``changes`` applied (the sections are frozen)."""
    return dataclasses.replace(section, **changes)
