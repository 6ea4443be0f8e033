"""`llavakit web`: a Gradio page to ask a model about an image and see what the request costs.

    llavakit web --model default --host 127.0.0.1 --port 7860

The page: upload an image, type a question, pick a compression method and budget, press Submit; it
shows the answer, the number of visual tokens the language model receives, the analytic cost of the
request (`VLM.cost`, multiply-add = 2 FLOPs) and a map of which image tokens were kept.

Honesty rules the page follows:

- Compression. The method list is "none" plus every registered `llavakit.compression` method that has
  a budget parameter (`BUDGET_PARAMS[name]` not None); the budget slider sets that parameter
  (`with_budget(name, ratio)`, e.g. fastervlm + 0.25 -> "fastervlm:keep=0.25"), with the method's other
  parameters at their defaults. The spec is checked against the model before anything runs (a model
  that cannot do it, e.g. an anyres one, gives an error message, never a silent no-op). "none" keeps
  every token, also when the model was loaded with a default compression.
- Token map. It is drawn on the views the vision tower actually sees (after resize / crop / pad, and
  for anyres models the base view plus every tile), not on the uploaded picture, with one cell per
  vision-tower patch. With no compression every cell is marked kept. Pre-LLM methods (resize, token
  stages) are run once more on the view (`Compression.image_features`) and the patches whose features
  reach the LM (`.positions`, on `.grid`) are marked kept, the rest dropped; a resize draws the coarser
  grid the tower then sees. In-LLM methods (FastV, layer schedules, KV eviction) choose inside the LM,
  per layer and per prompt, so the map shows every patch kept and says so. For anyres models the LM-side
  count differs from the number of cells (padding rows/columns are removed, a newline token ends each
  row, OneVision may downsample); the caption says so and gives both numbers.
- Cost. `VLM.cost` of the request with its compression (tokens per stage, in-LLM pruning per layer).
  `image_sizes` are what the processor produced: the preprocessed view (h, w) for fixed-resolution
  models, the original (h, w) for anyres ones (see `VLM.cost`). Prompt tokens are counted by the model's
  own processor (with the compression, so pre-LLM methods shorten them); new tokens by the generation
  callback.

Everything the page does lives in small functions that run without a browser or Gradio
(`method_choices`, `compression_spec`, `answer`, `kept_patches`, `token_map`, `draw_token_map`,
`handle_submit`, `handle_upload`, `handle_method`); `build_demo` only wires them to widgets. Bad input
(no image, an empty question, a file that is not an image, a spec the model cannot run) becomes an error
message on the page.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 1.0  # "none": every visual token
METHOD_BUDGET = 0.5  # the slider's value when a method is picked while it still says 1.0
IN_LLM_NOTE = "pruned inside the LM (FastV / schedules): the heatmap shows pre-LLM selection only"
DISPLAY_MIN_SIDE = 336  # token-map views are enlarged (nearest neighbour) to at least this many px
DISPLAY_MAX_SIDE = 768

KEPT_RGB = (40, 200, 90)
DROPPED_RGB = (220, 50, 50)
ABSENT_RGB = (128, 128, 128)  # anyres padding patches: no token at all
GRID_RGB = (255, 255, 255)


@dataclass(frozen=True)
class TokenMap:
    """The views the vision tower sees, each with its patch grid and which patches were kept.

    `views[0]` is the only view of a fixed-resolution model, or the base view of an anyres one;
    `tiles` = (rows, cols) of the anyres tiles that follow it ((0, 0) when there are none).
    `present` marks patches whose features reach the LM at all (anyres unpadding drops the rest);
    `kept` marks the present patches a compression method kept (all of them without compression).
    """

    views: tuple[Image.Image, ...]
    grids: tuple[tuple[int, int], ...]  # (rows, cols) of patches per view
    present: tuple[np.ndarray, ...]  # bool (rows, cols) per view
    kept: tuple[np.ndarray, ...]  # bool (rows, cols) per view
    tiles: tuple[int, int]
    caption: str


# ----------------------------------------------------------------------------------------- checks

def method_choices() -> list[str]:
    """The page's methods: "none", then every registered compression method with a budget parameter."""
    from ..compression import BUDGET_PARAMS, method_names

    return ["none"] + [n for n in method_names() if n != "none" and BUDGET_PARAMS.get(n) is not None]


def check_method(method: str | None, budget: float | None) -> tuple[str, float]:
    """Validated (method, budget); an unknown method, or a budget below 1 with "none", is an error."""
    from ..compression import method_names

    method = (method or "none").strip().lower()
    choices = method_choices()
    if method not in choices:
        if method in method_names():
            raise InputError(f"compression method {method!r} has no single budget parameter, so this page does not "
                             f"offer it; choose one of: {', '.join(choices)}")
        raise InputError(f"unknown compression method {method!r}; valid: {', '.join(choices)}")
    budget = DEFAULT_BUDGET if budget is None else float(budget)
    if not 0.0 < budget <= 1.0:
        raise InputError(f"budget must be a fraction of visual tokens in (0, 1], got {budget}")
    if method == "none" and budget != 1.0:
        raise InputError(f"method 'none' keeps every visual token; a budget of {budget} needs a compression method")
    return method, budget


def compression_spec(method: str | None, budget: float | None) -> str | None:
    """(method, budget) -> the compression spec the page runs (None: no compression).
    compression_spec("fastervlm", 0.25) -> "fastervlm:keep=0.25"."""
    from ..compression import with_budget

    method, budget = check_method(method, budget)
    return None if method == "none" else with_budget(method, budget)


def check_question(question: str | None) -> str:
    if question is None or not str(question).strip():
        raise InputError("type a question about the image")
    return str(question).strip()


# ----------------------------------------------------------------------------------------- answer

def answer(vlm: Any, image: Any, question: str | None, method: str | None = "none", budget: float | None = None,
           *, max_new_tokens: int = 64) -> tuple[str, int, str, Image.Image]:
    """Answer `question` about `image` -> (answer text, visual tokens, cost text, token-map image).

    `image`: a path, encoded bytes or a PIL image (None is an error). `method` / `budget`: a compression
    method from `method_choices()` and its budget (`compression_spec`). Greedy decoding. The token map's
    `info` holds "caption" and "kept" (kept patches, patches). Raises `InputError` for bad input, with a
    message a person understands.
    """
    if image is None:
        raise InputError("upload an image first")
    question = check_question(question)
    spec = compression_spec(method, budget)
    if not vlm.config.has_vision:
        raise InputError("this model is text-only; it takes no images")
    comp = vlm.resolve_compression(spec)  # parsed and checked against the model; None: off
    pil = vlm.processor.load_images([image])[0]
    prompt = vlm.build_prompt(question, [pil])
    inputs = vlm.processor(text=[prompt], images=[pil], compression=comp)
    ids, mask = inputs["input_ids"][0], inputs["attention_mask"][0].bool()
    visual = int(((ids == vlm.processor.image_token_id) & mask).sum())
    text_tokens = int(mask.sum()) - visual
    new: list[int] = []
    text = vlm.chat(question, [pil], max_new_tokens=max_new_tokens, temperature=0.0, compression=comp,
                    on_token=lambda _row, tok: new.append(tok))
    sizes = cost_image_sizes(inputs)
    cost = vlm.cost(prompt_tokens=text_tokens, new_tokens=len(new), image_sizes=sizes, compression=comp)
    kept, grid = kept_patches(vlm, inputs["pixel_values"], comp)
    tmap = token_map(vlm, inputs, visual, kept, grid=grid, compression=comp)
    heat = draw_token_map(tmap)
    heat.info["caption"] = tmap.caption  # read by handle_submit; the image itself is unchanged
    heat.info["kept"] = (int(sum(k.sum() for k in tmap.kept)), int(sum(p.sum() for p in tmap.present)))
    return text, visual, cost.summary(), heat


def cost_image_sizes(inputs: dict[str, Any]) -> list[tuple[int, int]]:
    """The (h, w) per image that `VLM.cost` expects, from the processor's output (see its docstring)."""
    if "image_sizes" in inputs:  # anyres: original sizes
        return [tuple(int(v) for v in s) for s in inputs["image_sizes"].tolist()]
    pv = inputs["pixel_values"]  # fixed resolution: the preprocessed view
    return [tuple(int(v) for v in pv.shape[-2:])] * int(pv.shape[0])


# ----------------------------------------------------------------------------------------- token map

def kept_patches(vlm: Any, pixel_values: Any, compression: Any
                 ) -> tuple[list[np.ndarray] | None, tuple[int, int] | None]:
    """Which patches of the first image reach the LM after `compression`'s pre-LLM part -> ([kept (rows,
    cols) bool], grid), from `Compression.image_features(model, view)`: `.positions` (T', 2) patch
    row/col on `.grid` (the tower's grid after any resize). (None, None) when nothing is chosen before
    the LM (no compression, or in-LLM methods only): every patch of the view is kept."""
    import torch

    if compression is None or not (compression.stages or compression.resize):
        return None, None
    model = vlm.model
    dtype = next(model.multi_modal_projector.parameters()).dtype
    with torch.inference_mode():
        feats = compression.image_features(model, pixel_values[:1].to(vlm.device, dtype))  # the first image
    rows, cols = feats.grid
    pos = feats.positions[0].long().cpu().numpy()  # (T', 2)
    pos = pos[(pos[:, 0] < rows) & (pos[:, 1] < cols)]  # a [CLS] kept as a token has no patch
    mask = np.zeros((rows, cols), dtype=bool)
    mask[pos[:, 0], pos[:, 1]] = True
    return [mask], (int(rows), int(cols))


def token_map(vlm: Any, inputs: dict[str, Any], visual_tokens: int,
              kept: Sequence[np.ndarray] | None = None, *, grid: tuple[int, int] | None = None,
              compression: Any = None) -> TokenMap:
    """The views of the first image in `inputs` with their patch grids; `kept` None = every patch kept.

    `grid`: the patch grid the tower sees when a compression resized the view (fixed-resolution models
    only); `compression`: the `Compression` the request ran with, named in the caption."""
    cfg = vlm.config
    patch = cfg.vision.patch_size
    pv = inputs["pixel_values"][0]
    views_t = [pv] if pv.dim() == 3 else list(pv)
    tiles = (0, 0)
    if grid is not None and cfg.is_anyres:
        raise InputError("a resized patch grid is only drawn for fixed-resolution models")
    if cfg.is_anyres:
        from ..data import anyres

        size = tuple(int(v) for v in inputs["image_sizes"][0].tolist())
        tiles = anyres.anyres_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision.image_size)
        views_t = views_t[: 1 + tiles[0] * tiles[1]]  # drop the batch padding views
    views = tuple(view_to_pil(t, vlm.processor.image_config) for t in views_t)
    grids = tuple((v.height // patch, v.width // patch) for v in views)
    full_cells = grids[0][0] * grids[0][1]
    if grid is not None:
        grids = (tuple(int(g) for g in grid),)
    present = [np.ones(g, dtype=bool) for g in grids]
    if cfg.is_anyres and len(views) > 1:
        present[1:] = _unpadded_tiles(size, tiles, grids[1])
    if kept is None:
        kept = present
    else:
        kept = [np.asarray(k, dtype=bool) for k in kept]
        if len(kept) != len(grids) or any(k.shape != g for k, g in zip(kept, grids)):
            raise InputError(f"kept masks {[k.shape for k in kept]} do not match the patch grids {list(grids)}")
        kept = [k & p for k, p in zip(kept, present)]
    cells = sum(int(p.sum()) for p in present)
    n_kept = int(sum(k.sum() for k in kept))
    in_llm = compression is not None and bool(compression.layer_hooks or compression.kv_policies)
    if compression is None and n_kept == cells:
        what = "every token kept (no compression)"
    elif n_kept == cells and compression is not None and not (compression.stages or compression.resize):
        what = f"{compression.spec}: every patch reaches the LM ({n_kept} of {cells} patches kept before it)"
    else:
        what = (f"{compression.spec + ': ' if compression is not None else ''}{n_kept} of {cells} patches kept "
                f"(green), {cells - n_kept} dropped (red)")
    if in_llm:
        what += f"; {IN_LLM_NOTE}"
    if cfg.is_anyres:
        base = grids[0][0] * grids[0][1]
        pad = sum(p.size for p in present) - cells
        caption = (f"base view + {tiles[0]}x{tiles[1]} tiles, patches of {patch} px; {what}; {pad} padding "
                   f"patches removed by unpadding (grey). The LM receives {visual_tokens} visual tokens: {base} "
                   f"from the base view, {visual_tokens - base} from the tiles (their unpadded map"
                   + (", downsampled when large," if cfg.architecture == "llava_onevision" else "")
                   + " read row by row, a newline token after each row).")
    elif compression is None:
        v = views[0]
        extra = visual_tokens - cells
        caption = (f"{v.width}x{v.height} px view the vision tower sees: {grids[0][0]}x{grids[0][1]} patches of "
                   f"{patch} px = {cells} image tokens" + (f" (+{extra} CLS token, not drawn)" if extra > 0 else "")
                   + f"; {what}.")
    else:
        v = views[0]
        resized = grids[0][0] * grids[0][1] != full_cells
        rows, cols = grids[0]
        seen = (f"{v.width}x{v.height} px view, which the vision tower sees downsampled to {rows}x{cols} patches"
                if resized else f"{v.width}x{v.height} px view the vision tower sees: {rows}x{cols} patches of {patch} px")
        caption = f"{seen} = {cells} image tokens; {what}. The LM receives {visual_tokens} visual tokens."
    return TokenMap(views=views, grids=grids, present=tuple(present), kept=tuple(kept), tiles=tuple(tiles),
                    caption=caption)


def _unpadded_tiles(size: tuple[int, int], tiles: tuple[int, int], grid: tuple[int, int]) -> list[np.ndarray]:
    """Per tile, the patches that survive `anyres.unpad_image` on the stitched tile map (row-major tiles)."""
    import torch

    from ..data import anyres

    rows, cols = tiles
    gh, gw = grid
    index = torch.arange(rows * gh * cols * gw).reshape(1, rows * gh, cols * gw)
    alive = np.zeros(rows * gh * cols * gw, dtype=bool)
    alive[anyres.unpad_image(index, size).flatten().numpy()] = True
    alive = alive.reshape(rows * gh, cols * gw)
    return [alive[r * gh:(r + 1) * gh, c * gw:(c + 1) * gw] for r in range(rows) for c in range(cols)]


def view_to_pil(t: Any, img_cfg: Any) -> Image.Image:
    """One preprocessed (3, H, W) view back to RGB pixels (undo normalize and rescale)."""
    arr = t.detach().float().cpu().numpy().transpose(1, 2, 0)
    if img_cfg is not None and img_cfg.do_normalize:
        arr = arr * np.asarray(img_cfg.image_std, dtype=np.float32) + np.asarray(img_cfg.image_mean, dtype=np.float32)
    scale = 255.0 if img_cfg is None or img_cfg.do_rescale else 1.0
    if img_cfg is not None and img_cfg.do_rescale:
        scale = 1.0 / img_cfg.rescale_factor
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "RGB")


def draw_token_map(tmap: TokenMap, *, alpha: float = 0.35) -> Image.Image:
    """Each view enlarged, kept patches tinted green, dropped red, padding grey; anyres tiles in their grid."""
    drawn = [_draw_view(v, g, p, k, alpha) for v, g, p, k in zip(tmap.views, tmap.grids, tmap.present, tmap.kept)]
    if len(drawn) == 1:
        return drawn[0]
    base, tiles = drawn[0], drawn[1:]
    rows, cols = tmap.tiles
    gap = 8
    tw, th = tiles[0].size
    width = base.width + gap + cols * tw + (cols - 1) * gap
    height = max(base.height, rows * th + (rows - 1) * gap)
    canvas = Image.new("RGB", (width, height), (245, 245, 245))
    canvas.paste(base, (0, 0))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas.paste(tile, (base.width + gap + c * (tw + gap), r * (th + gap)))
    return canvas


def _draw_view(view: Image.Image, grid: tuple[int, int], present: np.ndarray, kept: np.ndarray,
               alpha: float) -> Image.Image:
    rows, cols = grid
    factor = max(1, -(-DISPLAY_MIN_SIDE // max(1, min(view.size))))
    factor = max(1, min(factor, DISPLAY_MAX_SIDE // max(view.size)))
    big = view.resize((view.width * factor, view.height * factor), Image.Resampling.NEAREST)
    cell_w, cell_h = big.width / max(cols, 1), big.height / max(rows, 1)
    overlay = Image.new("RGBA", big.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    a = int(round(255 * alpha))
    for r in range(rows):
        for c in range(cols):
            colour = (KEPT_RGB if kept[r, c] else DROPPED_RGB) if present[r, c] else ABSENT_RGB
            box = (round(c * cell_w), round(r * cell_h), round((c + 1) * cell_w) - 1, round((r + 1) * cell_h) - 1)
            draw.rectangle(box, fill=colour + (a,), outline=GRID_RGB + (160,))
    return Image.alpha_composite(big.convert("RGBA"), overlay).convert("RGB")


# ----------------------------------------------------------------------------------------- page handlers

def error_text(exc: BaseException) -> str:
    """The message the page shows for a failed request."""
    if isinstance(exc, InputError):
        return f"**Error:** {exc}"
    return f"**Error:** the request failed ({type(exc).__name__}: {exc})"


def handle_submit(vlm: Any, image: Any, question: str | None, method: str | None, budget: float | None,
                  *, max_new_tokens: int = 64, lock: threading.Lock | None = None
                  ) -> tuple[str, str, int | None, str, Image.Image | None]:
    """Submit button -> (status markdown, answer, visual tokens, cost text, token map); never raises."""
    try:
        if lock is None:
            text, n, cost, heat = answer(vlm, image, question, method, budget, max_new_tokens=max_new_tokens)
        else:
            with lock:
                text, n, cost, heat = answer(vlm, image, question, method, budget, max_new_tokens=max_new_tokens)
    except Exception as e:  # the page shows every failure; the server keeps running
        if not isinstance(e, InputError):
            log.exception("web demo request failed")
        return error_text(e), "", None, "", None
    return f"Answered. Token map: {heat.info.get('caption', '')}", text, n, cost, heat


def handle_upload(image: Any) -> tuple[Image.Image | None, str]:
    """File picked -> (preview, status markdown); a file that is not an image gives a message, not a crash."""
    from ..data.images import load_image

    if image is None:
        return None, ""
    try:
        pil = load_image(image)
    except Exception as e:
        return None, error_text(e)
    return pil, f"Image loaded: {pil.width}x{pil.height} px."


def handle_method(method: str | None, budget: float | None) -> dict[str, Any]:
    """Method picked -> the budget slider's update: "none" fixes it at 1.0; a method makes it movable
    (and moves it off 1.0, which would keep every token)."""
    if (method or "none") == "none":
        return {"__type__": "update", "value": DEFAULT_BUDGET, "interactive": False}
    update: dict[str, Any] = {"__type__": "update", "interactive": True}
    if budget is None or float(budget) >= 1.0:
        update["value"] = METHOD_BUDGET
    return update


# ----------------------------------------------------------------------------------------- Gradio

def build_demo(vlm: Any, *, max_new_tokens: int = 64) -> Any:
    """The Gradio page for `vlm` (a `gradio.Blocks`; call `.launch()` on it)."""
    import gradio as gr

    lock = threading.Lock()  # VLM: one request at a time per instance
    with gr.Blocks(title="llavakit demo", analytics_enabled=False) as demo:
        gr.Markdown(f"## llavakit: ask about an image\nModel: `{vlm.source or vlm.config.architecture}` "
                    f"({vlm.config.architecture}). Greedy decoding, at most {max_new_tokens} new tokens.")
        with gr.Row():
            with gr.Column():
                file = gr.File(label="Image (PNG, JPEG, WebP, ...)", type="filepath", elem_id="image-file")
                preview = gr.Image(label="Uploaded image", interactive=False, elem_id="preview", height=240)
                question = gr.Textbox(label="Question", placeholder="What is in the image?", elem_id="question")
                method = gr.Dropdown(choices=method_choices(), value="none", label="Compression method",
                                     elem_id="method",
                                     info="Visual-token compression (llavakit.compression), with its default "
                                          "parameters and the budget below.")
                budget = gr.Slider(0.05, 1.0, value=DEFAULT_BUDGET, step=0.05, interactive=False, elem_id="budget",
                                   label="Budget (fraction of visual tokens kept)",
                                   info="The method's budget parameter (e.g. fastervlm keep); 'none' keeps all.")
                submit = gr.Button("Submit", variant="primary", elem_id="submit")
            with gr.Column():
                status = gr.Markdown("Upload an image and ask a question.", elem_id="status")
                answer_box = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                n_visual = gr.Number(label="Visual tokens (LM input)", precision=0, interactive=False,
                                     elem_id="visual-tokens")
                cost_box = gr.Textbox(label="Analytic cost of this request", lines=11, interactive=False,
                                      elem_id="cost")
                heat = gr.Image(label="Image tokens kept (green) / dropped (red)", interactive=False,
                                elem_id="token-map")

        def on_submit(img: Any, q: str, m: str, b: float) -> tuple:
            return handle_submit(vlm, img, q, m, b, max_new_tokens=max_new_tokens, lock=lock)

        file.change(handle_upload, inputs=file, outputs=[preview, status])
        method.change(handle_method, inputs=[method, budget], outputs=budget)
        outs = [status, answer_box, n_visual, cost_box, heat]
        submit.click(on_submit, inputs=[file, question, method, budget], outputs=outs)
        question.submit(on_submit, inputs=[file, question, method, budget], outputs=outs)
    return demo


def launch(vlm: Any, host: str = "127.0.0.1", port: int = 7860, *, max_new_tokens: int = 64,
           block: bool = True) -> Any:
    """Build and serve the page; `block=False` returns the running demo (tests close it)."""
    demo = build_demo(vlm, max_new_tokens=max_new_tokens)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                prevent_thread_lock=not block, quiet=not block)
    return demo
