"""Acceptance gates: the checks an unlearned model must pass before it becomes production.

A gate compares one metric of the new (unlearned) model, and for the test-accuracy drop also
one of its parent version, with a threshold from params. Every gate is optional: ``None``
means "not checked". When a configured gate fails, the configured ``fallback`` says what the
service does instead of moving the ``production`` alias: ``retrain`` (an exact retrain on the
data minus the tombstones) or ``keep-parent`` (the parent stays in production and the request
is marked ``needs-retrain``).

Metric names and units follow :func:`pipeline_lib.evaluation.metrics.metrics_from_logits`:
``forget_acc`` and ``TA`` are accuracies in percent, ``loss_MIA_AUC`` is an AUC in [0, 1].
Thresholds here are all on the [0, 1] scale, so accuracies are divided by ``accuracy_scale``
(100 by default) before they are compared; the values reported in :class:`GateResult` are on
the [0, 1] scale too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict

from pipeline_lib.schema import ConfigError, Field, Float, section

#: Metric keys the gates read (as the evaluation step names them).
FORGET_ACC = "forget_acc"
TEST_ACC = "TA"
MIA_AUC = "loss_MIA_AUC"

Unit = Annotated[Float, Field(ge=0.0, le=1.0)]

#: Bounds are inclusive; this absorbs float rounding (0.96 - 0.94 is 0.0200000000000000018),
#: so a value exactly at its threshold passes.
_EPS = 1e-9


@section("service.gates")
class GatesConfig:
    """Per-request acceptance gates (params section ``service.gates``).

    - ``max_forget_accuracy``: the unlearned model's accuracy on the forget set must be
      ``<=`` this (fraction in [0, 1]).
    - ``max_test_accuracy_drop``: parent version's test accuracy minus the new one's, in
      accuracy points on the [0, 1] scale, must be ``<=`` this.
    - ``mia_auc_band``: ``(lo, hi)``; the loss-MIA AUC of the unlearned model, forget set
      against test set, must lie within (bounds included). Near 0.5 means an attacker cannot
      tell forgotten samples from unseen ones.
    - ``fallback``: what to do when a gate fails.
    """

    max_forget_accuracy: Float | None = Field(None, ge=0.0, le=1.0)
    max_test_accuracy_drop: Float | None = Field(None, ge=0.0, le=1.0)
    mia_auc_band: tuple[Unit, Unit] | None = None
    fallback: Literal["retrain", "keep-parent"] = "keep-parent"

    def __post_init__(self) -> None:
        if self.mia_auc_band is not None and self.mia_auc_band[0] > self.mia_auc_band[1]:
            lo, hi = self.mia_auc_band
            raise ConfigError(f"lower bound {lo} is above upper bound {hi}", key="mia_auc_band")

    @property
    def configured(self) -> bool:
        """True when at least one gate is checked."""
        return any(
            g is not None
            for g in (self.max_forget_accuracy, self.max_test_accuracy_drop, self.mia_auc_band)
        )


class GateCheck(BaseModel):
    """The outcome of one configured gate.

    ``value`` is the measured quantity on the [0, 1] scale (``None`` when a metric it needs
    is missing or not finite); ``threshold`` is the configured bound (a ``(lo, hi)`` pair for
    the MIA band); ``reason`` explains a failure in words.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    value: float | None
    threshold: float | tuple[float, float]
    passed: bool
    reason: str = ""


class GateResult(BaseModel):
    """Every configured gate's check, and ``passed`` (all of them passed; vacuously true when
    no gate is configured)."""

    model_config = ConfigDict(frozen=True)

    checks: tuple[GateCheck, ...]
    passed: bool
    fallback: Literal["retrain", "keep-parent"]

    def failures(self) -> tuple[GateCheck, ...]:
        """The checks that did not pass."""
        return tuple(c for c in self.checks if not c.passed)

    def summary(self) -> str:
        """One line for logs and registry tags, e.g. ``forget_accuracy=0.02<=0.1 ok; ...``."""
        if not self.checks:
            return "no gates configured"
        parts = []
        for c in self.checks:
            value = "missing" if c.value is None else f"{c.value:.4g}"
            parts.append(f"{c.name}={value} {'ok' if c.passed else 'FAILED'}")
        return "; ".join(parts)


def _le(a: float, b: float) -> bool:
    return a <= b + _EPS


def _metric(
    metrics: Mapping[str, float], key: str, scale: float, where: str
) -> tuple[float | None, str]:
    """Read ``metrics[key] / scale``; return ``(None, reason)`` when absent or not finite."""
    if key not in metrics or metrics[key] is None:
        return None, f"metric {key} missing{where}"
    value = float(metrics[key])
    if not math.isfinite(value):
        return None, f"metric {key} is not finite ({value}){where}"
    return value / scale, ""


def evaluate_gates(
    cfg: GatesConfig,
    metrics: Mapping[str, float],
    parent_metrics: Mapping[str, float],
    accuracy_scale: float = 100.0,
) -> GateResult:
    """Check the unlearned model's ``metrics`` (and its parent's) against ``cfg``.

    Pure and total: a metric that a configured gate needs but that is missing (or NaN) makes
    that gate fail with reason ``"metric X missing"`` instead of raising, so that a gap in the
    evaluation blocks promotion rather than crashing the sweep.

    ``accuracy_scale`` divides ``forget_acc`` and ``TA`` (100 for the pipeline's percent
    accuracies; 1 when they are already fractions).
    """
    if accuracy_scale <= 0:
        raise ValueError(f"accuracy_scale must be positive, got {accuracy_scale}")
    checks: list[GateCheck] = []

    if cfg.max_forget_accuracy is not None:
        value, why = _metric(metrics, FORGET_ACC, accuracy_scale, "")
        ok = value is not None and _le(value, cfg.max_forget_accuracy)
        if value is not None and not ok:
            why = f"forget accuracy {value:.4g} > {cfg.max_forget_accuracy}"
        checks.append(
            GateCheck(
                name="forget_accuracy",
                value=value,
                threshold=cfg.max_forget_accuracy,
                passed=ok,
                reason=why,
            )
        )

    if cfg.max_test_accuracy_drop is not None:
        new, why_new = _metric(metrics, TEST_ACC, 1.0, "")
        old, why_old = _metric(parent_metrics, TEST_ACC, 1.0, " (parent version)")
        drop: float | None = None
        ok = False
        why = "; ".join(w for w in (why_new, why_old) if w)
        if new is not None and old is not None:
            # Subtract in the metrics' own unit, then scale: one rounding step fewer.
            drop = (old - new) / accuracy_scale
            ok = _le(drop, cfg.max_test_accuracy_drop)
            if not ok:
                why = (
                    f"test accuracy dropped {drop:.4g} ({old / accuracy_scale:.4g} -> "
                    f"{new / accuracy_scale:.4g}) > {cfg.max_test_accuracy_drop}"
                )
        checks.append(
            GateCheck(
                name="test_accuracy_drop",
                value=drop,
                threshold=cfg.max_test_accuracy_drop,
                passed=ok,
                reason=why,
            )
        )

    if cfg.mia_auc_band is not None:
        lo, hi = cfg.mia_auc_band
        value, why = _metric(metrics, MIA_AUC, 1.0, "")
        ok = value is not None and _le(lo, value) and _le(value, hi)
        if value is not None and not ok:
            why = f"loss-MIA AUC {value:.4g} outside [{lo}, {hi}]"
        checks.append(
            GateCheck(name="mia_auc_band", value=value, threshold=(lo, hi), passed=ok, reason=why)
        )

    return GateResult(
        checks=tuple(checks), passed=all(c.passed for c in checks), fallback=cfg.fallback
    )
