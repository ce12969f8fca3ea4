"""The generic sections of ``params.yaml``: those no registry member owns.

Sections owned by a role package sit beside its code: ``data`` (:mod:`pipeline_lib.data.images`),
``model`` (:mod:`pipeline_lib.models.image`), ``train`` (:mod:`pipeline_lib.training.fit`),
and every ``unlearn.<method>`` next to its method in :mod:`pipeline_lib.methods`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import model_validator

from pipeline_lib.schema import Bool, ConfigError, Field, Float, Hint, Int, Str, section


@section("request")
class RequestConfig:
    """Where the deletion request lives and where its id manifests are written."""

    file: Str = "requests/example.yaml"
    out_dir: Str = "data/forget"


@section("fisher")
class FisherConfig:
    """Per-sample Fisher diagonal (algorithms.md §1).

    ``kind``: ``true_expected`` sums over classes weighted by the model's probabilities (exact
    true Fisher, deterministic; default), ``true_sampled`` draws one label from the model per
    sample, ``empirical`` uses the dataset label; ``batch_squared`` is SSD's reference
    importance, the squared gradient of the batch-mean loss summed over batches of
    ``batch_size`` (one backward per batch: cheap, biased; not per-sample, so I_R is computed
    directly, never derived from full-data sums; :mod:`pipeline_lib.stats.fisher`).
    """

    kind: Literal["true_expected", "true_sampled", "empirical", "batch_squared"] = "true_expected"
    batch_size: Int = Field(256, gt=0)
    seed: Int = 0
    #: Seeded subsample of the retain set used for I_R (null: all of it).
    max_retain: Int | None = Field(None, gt=0)


@section("evaluate")
class EvaluateConfig:
    """Evaluation (shared/reference/evaluation.md)."""

    seed: Int = 0
    mia_folds: Int = Field(5, ge=2)
    #: RBF-SVC settings of SalUn's MIA-efficacy.
    mia_svc_c: Float = Field(3.0, gt=0)
    report_dir: Str = "reports"
    #: ``unlearn evaluate``: N originals (seeds) unlearned by every method, and N oracles.
    n_models: Annotated[Int, Hint("the noise floor splits the oracles in halves")] = Field(20, ge=4)
    #: Store seeds of the evaluation's originals and oracles: distinct from each other and
    #: from attribution.seed / oracle_matching.seed, so no two roles share model seeds.
    originals_seed: Int = 100
    oracles_seed: Int = 200
    #: Seeded draws of each MIA (SVC member subsample; loss-MIA subsample and folds): seeds
    #: ``seed`` … ``seed + mia_seeds − 1``; reported as mean ± std. 1: the old single draw.
    mia_seeds: Int = Field(5, ge=1)
    #: KLoM binning: ``unlearnflow`` (np.histogram bins, both sides floored and renormalised)
    #: or ``easydub`` (EasyDUB's published formula, which drops the pooled maximum; for
    #: figures set beside published ones). :mod:`pipeline_lib.evaluation.klom`.
    klom_binning: Literal["unlearnflow", "easydub"] = "unlearnflow"
    #: U-LiRA / LiRA (:mod:`pipeline_lib.evaluation.ulira`): one variance per population
    #: pooled over the forget points instead of one per point (LiRA's choice for few models).
    ulira_fixed_variance: Bool = False


@section("tracking")
class TrackingConfig:
    """Where MLflow, DVC and artifacts live."""

    mlflow_uri: Str = "sqlite:///mlflow.db"
    experiment: Str = "unlearnflow"
    dvc_root: Str = "."
    artifacts_dir: Str = "artifacts"


@section("attribution")
class AttributionConfig:
    """Many-model training for datamodels and oracles (algorithms.md §2, evaluation.md)."""

    #: M subset models; the last ``lds_heldout`` of them are held out to measure LDS.
    n_models: Int = Field(256, gt=0)
    #: Subset fraction |S_j| = alpha·N.
    alpha: Float = Field(0.5, gt=0, lt=1)
    #: Models per chunk: the unit of work of one Ray task (one vectorised ensemble).
    chunk_size: Int = Field(32, gt=0)
    seed: Int = 0
    #: Epochs of each subset model (null: train.epochs).
    epochs: Int | None = Field(None, gt=0)
    output_dtype: Literal["float16", "float32"] = "float16"
    out_dir: Str = "artifacts/attribution"
    lds_heldout: Int = Field(32, ge=0)
    estimator: Literal["ridge_dual", "diff_means"] = "ridge_dual"
    #: Ridge penalty of the dual-form datamodel fit.
    lam: Float = Field(1.0, gt=0)
    #: Oracles trained per request by ``unlearn oracles`` (default count).
    oracles: Int = Field(20, gt=0)


@section("ray")
class RayConfig:
    """Ray connection: null address uses RAY_ADDRESS if set, else starts a local Ray."""

    address: Str | None = None
    #: CPUs of a local Ray (null: all).
    num_cpus: Int | None = Field(None, gt=0)
    #: CPUs per chunk task; torch in the task uses that many threads.
    cpus_per_task: Int = Field(1, gt=0)
    #: How a chunk task with several CPU threads trains its models: ``models`` splits the
    #: chunk's models into one group per thread, each trained on its own thread with one
    #: torch thread; ``ops`` trains them in one loop whose kernels use torch's intra-op
    #: threads (an OpenMP barrier at each of the step's small kernels). Same results either
    #: way. On 2 cores ``models`` was faster under load and at K = 256, ``ops`` at K <= 64 on
    #: a quiet machine (BENCHMARKS.md, issue 17).
    cpu_parallel: Literal["models", "ops"] = "models"
    #: On the CPU a chunk task trains its MLP models in blocks whose parameters, gradients
    #: and optimizer state take at most this many MiB, one block after another (near the
    #: core's cache instead of streaming the whole chunk's state from memory every step,
    #: which two workers share); 0: the whole chunk at once. Same results either way.
    cpu_block_mib: Float = Field(8.0, ge=0)
    #: GPUs per task of the attribution, oracle and originals stores, the sharded statistics
    #: and the comparison's unlearning jobs; > 0 runs them on CUDA. A fraction packs several
    #: tasks on one card (0.25: four); above 1 it must be a whole number. 0: CPU only.
    gpus_per_task: Float = Field(0.0, ge=0)
    #: GPU tasks may let float32 matrix products and convolutions use TF32 tensor cores
    #: (faster; results then differ from float32 by ~1e-3 relative). false: full float32,
    #: cuDNN's TF32 default included.
    tf32: Bool = False
    #: How GPU tasks run the registry CNN's convolutions when training stores: ``vmap``
    #: (one grouped convolution of groups=K per layer, which cuDNN runs as one kernel per
    #: model) or ``triton`` (one Triton implicit-GEMM launch per layer for all the task's
    #: models; needs the triton package and ``gpus_per_task`` > 0; same models to float
    #: rounding). Other architectures ignore it.
    conv_kernel: Literal["vmap", "triton"] = "vmap"

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> RayConfig:
        g = self.gpus_per_task
        if g > 1 and g != int(g):
            raise ConfigError(
                f"must be a fraction of one GPU or a whole number of GPUs, got {g:g}",
                key="gpus_per_task",
            )
        if self.conv_kernel == "triton" and g == 0:
            raise ConfigError(
                "triton runs on GPU tasks only: set ray.gpus_per_task > 0, or use vmap",
                key="conv_kernel",
            )
        return self


@section("stats")
class StatsConfig:
    """Sharded statistics (``unlearn stats``): the split is written as Parquet shards, one
    ``ray.remote`` task per shard computes partial sums, one reduce step adds them."""

    #: Number of Parquet shards the split is cut into (the unit of Ray work).
    n_shards: Int = Field(4, gt=0)
    #: Shard tasks in flight at once (null: CPUs of the cluster ÷ ray.cpus_per_task).
    workers: Int | None = Field(None, gt=0)
    #: Where shards and statistics files go.
    out_dir: Str = "artifacts/stats"
    #: Rows of a shard per forward pass (activation statistics).
    batch_size: Int = Field(256, gt=0)
    #: How the pipeline computes Fisher statistics it does not find under ``out_dir``:
    #: ``local`` (in the flow's process; on small data Ray's start-up would dominate) or
    #: ``ray`` (Parquet shards, one Ray task each, as ``unlearn stats``). Both give the same
    #: values and write the same file.
    fisher_backend: Literal["ray", "local"] = "local"
    #: Where a request's retain-set Fisher I_R comes from: ``direct`` (computed over R),
    #: ``full_minus_forget`` ((Σ_D − Σ_F)/(N − |F|) from the model version's stored full-data
    #: sums, computed and stored first if missing: only F is computed per request) or null:
    #: ``full_minus_forget`` when the model's full-data sums are stored, else ``direct``
    #: (and ``direct`` for ``fisher.kind: batch_squared`` or a ``fisher.max_retain``
    #: subsample, which the subtraction does not give).
    retain_from: Literal["direct", "full_minus_forget"] | None = None
