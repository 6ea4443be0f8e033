"""llavakit: LLaVA-family multimodal models in one PyTorch framework.

    import llavakit
    vlm = llavakit.load("default")            # or a local HF-format dir, or a hub id
    print(vlm.chat("What colour is the shape?", images="shape.png"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, InputError

__version__ = "0.1.0"
__all__ = ["load", "InputError", "CheckpointError", "VLM", "__version__"]

if TYPE_CHECKING:
    from .api import VLM


def load(source: str = "default", dtype: Any = None, device: Any = None, compression: Any = None,
         trained: bool = True) -> "VLM":
    """Load a model ("default", a local HF-format directory, or a hub id), optionally with a default
    visual-token compression spec (e.g. "fastervlm:keep=0.1"). See llavakit.loader.load."""
    from .loader import load as _load

    return _load(source, dtype=dtype, device=device, compression=compression, trained=trained)


def __getattr__(name: str) -> Any:
    if name == "VLM":
        from .api import VLM

        return VLM
    raise AttributeError(name)
