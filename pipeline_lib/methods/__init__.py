"""Unlearning methods: the registry (:data:`METHODS`) and one module per method or family.

- :mod:`~pipeline_lib.methods.base`: :class:`UnlearnInputs`, :class:`Method`, the registry
  and :func:`register_method`, and the shared pieces (top-fraction mask, seeded batch
  iterators, distillation KL);
- one module per method or family, each holding its params section (``unlearn.<name>`` of
  params.yaml) beside its code and registering itself: ``fisher_diagonal``, ``finetune``
  (finetune, retrain), ``neggrad_plus``, ``scrub``, ``salun``, ``matching`` (dmm,
  oracle_matching), ``fisher_baselines`` (ssd, fisher_forgetting), ``svd_projection``,
  ``mnemonic`` (mnemonic_code);
- :mod:`~pipeline_lib.methods.text`: the language-model methods, their own registry.

Adding a method: a module here with its params section and ``@register_method``, one import
line below (the order of these imports is the order of the ``unlearn`` sub-sections and of
``unlearn evaluate``'s rows), its test, and its defaults in params.yaml.
"""

from __future__ import annotations

# isort: off
from pipeline_lib.methods.base import (
    METHODS,
    Info,
    Method,
    MethodFn,
    UnlearnInputs,
    batches,
    cycled_batches,
    distill_kl,
    get_method,
    register_method,
    top_fraction_mask,
)
from pipeline_lib.methods.fisher_diagonal import fisher_diagonal_forgetting, select_by_ratio
from pipeline_lib.methods.finetune import finetune, retrain
from pipeline_lib.methods.neggrad_plus import neggrad_plus
from pipeline_lib.methods.scrub import scrub, scrub_distill
from pipeline_lib.methods.salun import forget_saliency, random_other_labels, salun
from pipeline_lib.methods.matching import dmm, oracle_matching
from pipeline_lib.methods.fisher_baselines import fisher_forgetting, ssd
from pipeline_lib.methods.svd_projection import svd_projection
from pipeline_lib.methods.mnemonic import mnemonic_code

# isort: on

__all__ = [
    "METHODS",
    "Info",
    "Method",
    "MethodFn",
    "UnlearnInputs",
    "batches",
    "cycled_batches",
    "distill_kl",
    "dmm",
    "finetune",
    "fisher_diagonal_forgetting",
    "fisher_forgetting",
    "forget_saliency",
    "get_method",
    "mnemonic_code",
    "neggrad_plus",
    "oracle_matching",
    "random_other_labels",
    "register_method",
    "retrain",
    "salun",
    "scrub",
    "scrub_distill",
    "select_by_ratio",
    "ssd",
    "svd_projection",
    "top_fraction_mask",
]
