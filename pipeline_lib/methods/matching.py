"""Output matching (Georgiev et al., ICLR 2025, arXiv 2410.23232; algorithms.md §2):
fine-tune the model's logits toward target logits on F plus retain points. Datamodel
Matching takes its targets from datamodels, Oracle Matching from models retrained on R; the
targets come in ``inputs.match`` (:mod:`pipeline_lib.attribution.matching`)."""

from __future__ import annotations

from torch import nn

from pipeline_lib.attribution.matching import match_outputs
from pipeline_lib.methods.base import Info, UnlearnInputs, register_method
from pipeline_lib.methods.space import Choice, IntRange, LogUniform, Uniform
from pipeline_lib.schema import Bool, Field, Float, Int, section


@section()
class DmmParams:
    """Datamodel Matching (Georgiev et al., ICLR 2025): fine-tune to DM-Direct targets by MSE
    on logits over F plus ``retain_multiple``·|F| retain points; paper defaults. The datamodels
    come from the subset-model store of the ``attribution`` section (estimator; ridge penalty
    ``lam`` unless set here). ``anchor``: the part of Σ_F β that fixed-size subsets cannot
    identify is taken from a model trained on all of D (the datamodel reproduces it at S = D,
    :func:`pipeline_lib.attribution.matching.full_model_anchor`) instead of 0: from the model
    being unlearned (``anchor_models`` 0), or from the mean of ``anchor_models`` reference
    models trained on D with the original's recipe (an originals store of seed
    ``anchor_seed``, request-independent like the subset store). The model's own anchor also
    removes a share |F|/Σ_i(1 − x̄_i) of its seed deviation, so unlearned models vary less than
    retrained ones, which U-LiRA detects; the reference mean removes only the systematic part
    (BENCHMARKS.md, issue 16)."""

    epochs: Int = Field(5, ge=0)
    lr: Float = Field(5e-4, gt=0)
    batch_size: Int = Field(512, gt=0)
    lr_decay: Float = Field(0.95, gt=0, le=1)  # learning rate × lr_decay after every epoch
    retain_multiple: Float = Field(3.0, ge=0)
    weight_reg: Float = Field(0.0, ge=0)  # λ of the optional λ‖θ − θ0‖² term (0 in the paper)
    #: ridge penalty of DMM's datamodels (None: attribution.lam)
    lam: Float | None = Field(None, gt=0)
    anchor: Bool = True
    #: reference models whose mean output at S = D pins the anchor (0: the unlearned model)
    anchor_models: Int = Field(0, ge=0)
    #: seed of the reference models' store; differs from evaluate.originals_seed so an
    #: evaluation's originals are never their own reference
    anchor_seed: Int = 300


@section()
class OracleMatchingParams:
    """Oracle Matching: the same fine-tuning toward the mean logits of ``n_oracles`` models
    retrained on R (their own seeds, disjoint from the evaluation oracles)."""

    epochs: Int = Field(5, ge=0)
    lr: Float = Field(5e-4, gt=0)
    batch_size: Int = Field(512, gt=0)
    lr_decay: Float = Field(0.95, gt=0, le=1)
    retain_multiple: Float = Field(3.0, ge=0)
    weight_reg: Float = Field(0.0, ge=0)
    n_oracles: Int = Field(10, gt=0)
    #: Seed of their oracle store; differs from ``attribution.seed`` so the targets' oracles
    #: are never the oracles an evaluation compares against.
    seed: Int = 1


def datamodel_settings(params: object, default_lam: float) -> tuple[float, bool]:
    """(ridge penalty, anchor) for a matching method's datamodel targets: DMM's own ``lam``
    (else ``default_lam``, the attribution section's) and ``anchor``; OM's params have
    neither (its targets are oracles), which gives (default_lam, False)."""
    lam = getattr(params, "lam", None)
    return (default_lam if lam is None else float(lam)), bool(getattr(params, "anchor", False))


def anchor_reference(params: object) -> tuple[int, int] | None:
    """(models, seed) of the reference store that pins DMM's anchor, or None when the anchor
    is off or taken from the unlearned model itself (``anchor_models`` 0; OM: always None)."""
    k = int(getattr(params, "anchor_models", 0) or 0)
    if not getattr(params, "anchor", False) or k == 0:
        return None
    return k, int(params.anchor_seed)  # type: ignore[attr-defined]


#: What ``unlearn tune`` varies for both matching methods: the fine-tuning only. Not
#: ``retain_multiple``: the matching points (and DMM's targets) are computed once per request.
MATCHING_SPACE = {
    "epochs": IntRange(5, 60),
    "lr": LogUniform(5e-4, 2e-2),
    "batch_size": Choice((64, 128, 256, 512)),
    "lr_decay": Uniform(0.8, 1.0),
}


def _matching(
    model: nn.Module,
    inputs: UnlearnInputs,
    params: DmmParams | OracleMatchingParams,
    seed: int,
    source: str,
) -> tuple[nn.Module, Info]:
    m = inputs.match
    if m is None or m.source != source:
        raise ValueError(
            f"this method needs matching targets from {source}; the pipeline computes them "
            f"(got {'none' if m is None else m.source})"
        )
    info = match_outputs(
        model,
        m,
        params.epochs,
        params.lr,
        params.batch_size,
        params.lr_decay,
        params.weight_reg,
        seed,
        inputs.device,
    )
    return model, info


@register_method(
    "dmm",
    DmmParams,
    "match DM-Direct logits (f - sum_F beta, from the subset-model store) on F + 3|F| R",
    needs_targets="datamodels",
    search_space=MATCHING_SPACE,
)
def dmm(
    model: nn.Module, inputs: UnlearnInputs, params: DmmParams, seed: int
) -> tuple[nn.Module, Info]:
    """Datamodel Matching (Georgiev et al., ICLR 2025, arXiv 2410.23232; algorithms.md §2):
    fine-tune to the DM-Direct prediction f̂ = f_θ − Σ_{i∈F} β_i of the retrained model's
    logits on F plus ``retain_multiple``·|F| retain points (MSE, Adam, lr × ``lr_decay`` per
    epoch). Targets come in ``inputs.match`` (:mod:`pipeline_lib.attribution.matching`)."""
    return _matching(model, inputs, params, seed, "datamodels")


@register_method(
    "oracle_matching",
    OracleMatchingParams,
    "match the mean logits of models retrained on R (upper bound for dmm)",
    needs_targets="oracles",
    search_space=MATCHING_SPACE,
)
def oracle_matching(
    model: nn.Module, inputs: UnlearnInputs, params: OracleMatchingParams, seed: int
) -> tuple[nn.Module, Info]:
    """Oracle Matching (same paper): the DMM fine-tuning with the mean logits of
    ``n_oracles`` models retrained on R as targets — DMM with perfect attribution."""
    return _matching(model, inputs, params, seed, "oracles")
