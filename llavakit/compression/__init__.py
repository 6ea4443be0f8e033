"""Visual-token compression: one spec, three insertion points (H2 pre-LLM, H5 in-LLM, H6 KV cache).

    vlm = llavakit.load("default", compression="fastervlm:keep=0.1")
    vlm.chat("What colour is the shape?", image, compression="[hired:rho=0.2, fastv:layer=2:keep=0.5]")

`base` holds the plug-in contract and the method registry, `spec` the grammar, `pipeline` the
composition and the visual side, `runner` the LM side. Methods live in `llavakit.visual` (H2) and
`llavakit.llm_hooks` (H5/H6) and are registered by `methods`.
"""

from .base import BUDGET_PARAMS, METHODS, KVPolicy, LayerHook, LayerState, StageContext, TokenStage, ViewResize, register, with_budget
from .pipeline import Compression, ImageFeatures
from .spec import MethodSpec, format_spec, parse_spec


def method_names() -> list[str]:
    """Every registered compression method."""
    from . import methods  # noqa: F401

    return METHODS.names()


__all__ = ["BUDGET_PARAMS", "METHODS", "register", "with_budget", "Compression", "ImageFeatures", "KVPolicy", "LayerHook", "LayerState", "MethodSpec",
           "StageContext", "TokenStage", "ViewResize", "format_spec", "method_names", "parse_spec"]
