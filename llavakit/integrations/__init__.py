"""Adapters that plug llavakit models into other tools. Import-light: nothing here imports those tools.

lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval, >= 0.5, tested with 0.7.3) finds plug-in
models through the Python entry-point group ``lmms_eval.models``; llavakit's `pyproject.toml` declares

    [project.entry-points."lmms_eval.models"]
    llavakit = "llavakit.integrations:lmms_eval_manifest"

so that, once llavakit is installed, ``python -m lmms_eval --model llavakit --model_args source=default``
works without touching lmms-eval. The model class itself is `llavakit.integrations.lmms_eval.LlavakitLMMS`
(see docs/lmms_eval.md).
"""

from __future__ import annotations

from typing import Any

LMMS_EVAL_MODEL_ID = "llavakit"
LMMS_EVAL_CLASS_PATH = "llavakit.integrations.lmms_eval.LlavakitLMMS"


def lmms_eval_manifest() -> Any:
    """The `lmms_eval.models.registry_v2.ModelManifest` for the ``lmms_eval.models`` entry point.

    Called by lmms-eval while it builds its model registry; it only names the class (imported later,
    when ``--model llavakit`` is actually requested), so other lmms-eval runs pay nothing for it.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_ID, simple_class_path=LMMS_EVAL_CLASS_PATH)
