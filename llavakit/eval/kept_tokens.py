"""Which image patches a compression method keeps: a mask per spec and a figure comparing methods.

    kept_mask(vlm, image, "fastervlm:keep=0.1")            -> (grid_h, grid_w) bool tensor
    plot_kept_tokens(vlm, image, ["fastervlm", "fastv:layer=2"], 0.1, "kept_tokens.png")

`kept_mask` is the one place that answers "which visual tokens survive"; the web demo uses it for its
token heatmap, the compression grid (`llavakit.eval.grid`) for kept_tokens.png.

How it is read (our choices):
- pre-LLM (resize, H2 token stages): `Compression.image_features(model, pixel_values)` returns the kept
  tokens' patch positions and the tower grid (after any resize, so a downsampled view has a coarser
  grid with every cell kept);
- in-LLM pruning (H5 layer hooks, e.g. FastV): one prefill over `prompt` and the image (no generation),
  then `LMRun.decisions`: a token counts as kept when it survives every pruning layer, i.e. it reaches
  the last LM layer. Text-guided methods depend on the prompt, so the figure states it;
- merging stages (e.g. `pool`) mark each merged token at the patch its stage reports as its position (the
  centre of its cell), not the whole region it averages;
- KV-cache policies (H6) evict after prefill and are not shown (the figure title says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..fileio import save_figure

DEFAULT_PROMPT = "Describe the image."
SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.png"


def _inputs(vlm: Any, image: Any, comp: Any, prompt: str) -> tuple[Any, dict]:
    pil = vlm.processor.load_images([image])[0]
    return pil, vlm.processor(text=[vlm.build_prompt(prompt, [pil])], images=[pil], compression=comp)


@torch.inference_mode()
def kept_mask(vlm: Any, image: Any = None, spec: Any = None, prompt: str = DEFAULT_PROMPT) -> Tensor:
    """(grid_h, grid_w) bool: the patches of `image` (path or PIL; default the sample image) whose tokens
    `spec` keeps (all True for no compression). The grid is the tower's patch grid after any resize.
    In-LLM pruning is read from one prefill with `prompt`; KV-cache eviction is not reflected."""
    comp = vlm.resolve_compression(spec)  # parsed and checked against the model
    model = vlm.model
    _, inputs = _inputs(vlm, SAMPLE if image is None else image, comp, prompt)
    pv = inputs["pixel_values"].to(vlm.device, vlm.dtype)  # (1, C, H, W)
    if comp is None:
        patch = model.config.vision.patch_size
        return torch.ones(pv.shape[-2] // patch, pv.shape[-1] // patch, dtype=torch.bool)
    feats = comp.image_features(model, pv)
    pos = feats.positions[0].cpu()  # (T', 2) patch (row, col) of each token entering the LM
    alive = torch.ones(pos.shape[0], dtype=torch.bool)
    if comp.layer_hooks:
        ids = inputs["input_ids"].to(vlm.device)  # (1, T)
        mask = inputs["attention_mask"].to(vlm.device)
        embeds = model.embed_inputs(ids, image_features=feats.features)  # (1, T, D)
        run = comp.lm_run(model, ids, mask)
        model.language_model(embeds, None, None, None, run=run)  # prefill only: fills run.decisions
        survive = torch.ones_like(ids, dtype=torch.bool)
        for dec in run.decisions.values():  # (1, T) keep per prompt position, per pruning layer
            survive &= dec
        alive = survive[0][ids[0] == model.config.image_token_id].cpu()  # (T',) in feature order
    out = torch.zeros(feats.grid, dtype=torch.bool)
    kept = pos[alive]
    out[kept[:, 0], kept[:, 1]] = True
    return out


def _view_image(vlm: Any, image: Any) -> Any:
    """The preprocessed view the tower sees, de-normalised to an (H, W, 3) float array in [0, 1]."""
    _, inputs = _inputs(vlm, image, None, DEFAULT_PROMPT)
    pv = inputs["pixel_values"][0].float()  # (3, H, W)
    cfg = vlm.processor.image_config
    if getattr(cfg, "do_normalize", False):
        pv = pv * torch.tensor(cfg.image_std)[:, None, None] + torch.tensor(cfg.image_mean)[:, None, None]
    if getattr(cfg, "do_rescale", False):
        pv = pv / (float(cfg.rescale_factor) * 255.0)
    return pv.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_kept_tokens(vlm: Any, image: Any, methods: Sequence[str], keep: float, path: str | Path,
                     prompt: str | None = None) -> Path:
    """The view the tower sees, then one panel per method at `keep` (via `with_budget`) with dropped
    patches darkened. Methods with only a KV policy are listed as not shown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..compression import Compression, with_budget

    image = SAMPLE if image is None else image
    prompt = prompt or DEFAULT_PROMPT
    specs, skipped, in_llm = [], [], False
    for m in methods:
        spec = with_budget(m, keep)
        comp = Compression.parse(spec)
        if comp is None or not (comp.resize or comp.stages or comp.layer_hooks):
            skipped.append(m)
            continue
        in_llm |= bool(comp.layer_hooks)
        specs.append((m, spec))
    view = _view_image(vlm, image)
    n = 1 + len(specs)
    fig = Figure(figsize=(max(2.6 * n, 6.0), 3.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(view)
    axes[0].set_title("input view", fontsize=8)
    for ax, (m, spec) in zip(axes[1:], specs):
        mask = kept_mask(vlm, image, spec, prompt=prompt).numpy()
        gh, gw = mask.shape
        ax.imshow(view, extent=(0, gw, gh, 0))
        shade = [[(0.0, 0.0, 0.0, 0.0 if k else 0.72) for k in row] for row in mask]
        ax.imshow(shade, extent=(0, gw, gh, 0), interpolation="nearest")
        ax.set_xticks(range(gw + 1), minor=True)
        ax.set_yticks(range(gh + 1), minor=True)
        ax.grid(which="minor", color="white", lw=0.3, alpha=0.4)
        ax.set_title(f"{m}\n{int(mask.sum())}/{gh * gw} kept", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.tick_params(which="both", length=0)
    lines = [f"kept visual tokens at keep={keep:g} "
             f"(dark = dropped; a merged token, e.g. pool's, at its centre patch)"]
    if in_llm:
        short = prompt if len(prompt) <= 50 else prompt[:47] + "..."
        lines.append(f"in-LLM pruning: tokens reaching the last LM layer, one prefill with prompt {short!r}")
    if skipped:
        lines.append(f"not shown (KV-cache policy only, evicts after prefill): {', '.join(skipped)}")
    fig.suptitle("\n".join(lines), fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.06 * len(lines)))
    return save_figure(fig, path)
