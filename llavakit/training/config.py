"""Training configuration: frozen dataclasses read from YAML. No I/O besides `from_yaml`.

Unknown keys are an `InputError` that names the key and lists the valid ones, at every level.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError

DATA_KINDS = ("easyvqa", "world-caption", "world-instruction", "world-qa", "world-bind", "world-position",
              "world-check", "world-count", "world-omit", "world-report", "llava-json")
YES_NO_MODES = ("all", "balanced")
STAGES = ("align", "instruct")
PRECISIONS = ("fp32", "bf16")
SHIPPED = "shipped"  # init_from: the trained weights packed in llavakit (llavakit.default.build.trained_weights)
TOKEN_SELECT = ("random", "cls")  # visual_token_select: which visual tokens stay visible (training/token_drop.py)
MODULES = ("vision_tower", "multi_modal_projector", "language_model", "visual_inject")
LR_EXTRA = ("lora", "projector_context")  # lr groups beside whole modules: LoRA tensors, the projector's context branch


@dataclass(frozen=True)
class DataSource:
    """One data source. `kind`: easyvqa (train split only), world-* (synthetic world), llava-json."""

    kind: str
    weight: float = 1.0
    n: int | None = None  # samples (world: scenes to generate; easyvqa/llava-json: limit)
    seed: int = 0
    path: str | None = None  # llava-json file
    image_root: str | None = None
    questions_per_image: int = 8  # packing: questions sharing one image's tokens in one sequence
    yes_no: str = "all"  # easyvqa: "balanced" drops majority-answer yes/no questions per question template
    # this source's chance per sequence of hiding visual tokens; None: the recipe's `visual_token_drop`
    visual_token_drop: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise InputError(f"unknown data kind {self.kind!r}; valid: {', '.join(DATA_KINDS)}")
        if self.weight <= 0:
            raise InputError(f"data weight must be > 0, got {self.weight}")
        if self.yes_no not in YES_NO_MODES:
            raise InputError(f"unknown yes_no mode {self.yes_no!r}; valid: {', '.join(YES_NO_MODES)}")
        if self.yes_no != "all" and self.kind != "easyvqa":
            raise InputError(f"yes_no applies to easyvqa data only, not {self.kind!r}")
        if self.kind == "llava-json" and not self.path:
            raise InputError("a llava-json data source needs `path`")
        drop = self.visual_token_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float))
                                 or not 0.0 <= drop <= 1.0):  # YAML's yes / no is not a chance
            raise InputError(f"data source {self.kind}: visual_token_drop must be a probability in [0, 1], "
                             f"got {self.visual_token_drop}")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TrainConfig:
    """One recipe run. `stage`: align (projector only) or instruct (projector + LoRA or full LM)."""

    model: str = "default"
    stage: str = "align"
    out_dir: str = "runs/default"
    # a previous run's out_dir (or its trained .safetensors file) to start from; "shipped" (model default only):
    # the trained weights packed in llavakit (stage I3), so a fine-tune of them needs no earlier run on disk
    init_from: str | None = None
    data: tuple[DataSource, ...] = ()
    steps: int = 1000
    batch_size: int = 4  # packed sequences per optimizer micro-step
    grad_accum: int = 1
    lr: Mapping[str, float] = field(default_factory=lambda: {"multi_modal_projector": 2e-3})
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant | linear
    min_lr_ratio: float = 0.1
    train: tuple[str, ...] = ("multi_modal_projector",)  # modules trained in full
    projector_context: int = 0  # k > 0: add the projector's k x k local-context branch (models/projector.py)
    projector_context_channels: int = 64
    visual_inject: tuple[int, ...] = ()  # LM layers where the visual tokens are re-added (models/visual_inject.py)
    visual_inject_rank: int = 64
    # Tower layers the projector reads, overriding the model's (hidden-state indices; a list is concatenated
    # along channels). Layers init_from's projector lacks start with zero input columns (LlavaModel.set_feature_layers).
    vision_feature_layer: tuple[int, ...] = ()
    lora: LoraSpec | None = None  # LoRA on the language model (peft)
    cache_features: bool = True  # frozen tower: compute features once, train on the cache
    standardize_features: bool = True  # per-channel feature standardisation, folded into linear_1 on save
    precision: str = "fp32"  # fp32 | bf16 (autocast of the LM compute; trained weights and optimizer stay fp32)
    visual_token_drop: float = 0.0  # chance per sequence of hiding visual tokens (training/token_drop.py)
    visual_token_keep: tuple[float, float] = (0.05, 0.5)  # share of visual tokens left visible, drawn uniformly
    visual_token_select: str = "random"  # which stay visible: random | cls (top [CLS] attention, as FasterVLM)
    yopo: str | None = None  # train with YOPO's pruning on, e.g. "yopo:window=5:ffn_ratio=3:layercut=24" (training/yopo_train.py)
    # train with a layer keep schedule on, e.g. "psigmoid:k=0.0989:l0=7.40" (training/schedule_train.py)
    prune_schedule: str | None = None
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InputError(f"unknown stage {self.stage!r}; valid: {', '.join(STAGES)}")
        for m in self.train:
            if m not in MODULES:
                raise InputError(f"unknown module {m!r}; valid: {', '.join(MODULES)}")
        for m in self.lr:
            if m not in MODULES and m not in LR_EXTRA:
                raise InputError(f"unknown module {m!r} in lr; valid: {', '.join(MODULES + LR_EXTRA)}")
        if "projector_context" in self.lr and not self.projector_context:
            raise InputError("lr names projector_context but the recipe adds no context branch (projector_context: 0)")
        if self.projector_context < 0 or (self.projector_context and self.projector_context % 2 == 0):
            raise InputError(f"projector_context must be 0 (none) or an odd kernel size, got {self.projector_context}")
        if "visual_inject" in self.train and not self.visual_inject:
            raise InputError("train names visual_inject but the recipe adds no branch (set visual_inject: [layers])")
        if self.visual_inject and self.visual_inject_rank < 1:
            raise InputError(f"visual_inject_rank must be >= 1, got {self.visual_inject_rank}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "constant", "linear"):
            raise InputError(f"unknown schedule {self.schedule!r}; valid: cosine, constant, linear")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if not self.data:
            raise InputError("a training config needs at least one data source (`data:`)")
        if self.init_from == SHIPPED and self.model != "default":
            raise InputError(f"init_from: {SHIPPED} names the default model's packed weights; this recipe's model "
                             f"is {self.model!r} (name a run's out_dir or a trained .safetensors file instead)")
        if not 0.0 <= self.visual_token_drop <= 1.0:
            raise InputError(f"visual_token_drop must be a probability in [0, 1], got {self.visual_token_drop}")
        if self.visual_token_select not in TOKEN_SELECT:
            raise InputError(f"unknown visual_token_select {self.visual_token_select!r}; "
                             f"valid: {', '.join(TOKEN_SELECT)}")
        keep = self.visual_token_keep
        if (len(keep) != 2 or not all(isinstance(x, (int, float)) for x in keep)
                or not 0.0 < keep[0] <= keep[1] <= 1.0):
            raise InputError(f"visual_token_keep must be [low, high] with 0 < low <= high <= 1, got {list(keep)}")
        if self.yopo is not None:
            from .yopo_train import parse_yopo

            parse_yopo(self.yopo)  # a bad spec fails with the recipe, before any model is built
            if self.stage != "instruct":
                raise InputError("yopo trains the LM under YOPO's pruning: use stage instruct (LoRA or language_model)")
            if self.token_drop_on:
                raise InputError("yopo and visual_token_drop cannot train together (YOPO's window replaces the "
                                 "visual-to-visual mask that token drop writes); use one of them")

        if self.prune_schedule is not None:
            from .schedule_train import parse_schedule

            parse_schedule(self.prune_schedule)
            if self.stage != "instruct":
                raise InputError("prune_schedule trains the LM under the schedule's pruning: use stage instruct "
                                 "(LoRA or language_model)")
            if self.yopo is not None or self.token_drop_on:
                raise InputError("prune_schedule cannot train together with yopo or visual_token_drop (each "
                                 "writes the attention mask its own way); use one of them")

    def token_drop(self, src: DataSource) -> float:
        """The chance that a sequence of `src` has visual tokens hidden: its own, else the recipe's."""
        return self.visual_token_drop if src.visual_token_drop is None else src.visual_token_drop

    @property
    def token_drop_on(self) -> bool:
        """Whether any data source's sequences can have visual tokens hidden."""
        return any(self.token_drop(src) > 0 for src in self.data)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "TrainConfig":
        _check(cls, raw, "config")
        kw = dict(raw)
        kw["data"] = tuple(_build(DataSource, d, f"data[{i}]") for i, d in enumerate(raw.get("data") or ()))
        if kw.get("lora") is not None:
            lora = dict(kw["lora"])
            _check(LoraSpec, lora, "lora")
            if "targets" in lora:
                lora["targets"] = tuple(lora["targets"])
            kw["lora"] = LoraSpec(**lora)
        if "train" in kw:
            kw["train"] = tuple(kw["train"])
        if "visual_inject" in kw:
            layers = kw["visual_inject"]
            if not isinstance(layers, (list, tuple)) or not all(isinstance(l, int) and not isinstance(l, bool)
                                                                for l in layers):
                raise InputError(f"visual_inject must be a list of LM layer indices, got {layers!r}")
            kw["visual_inject"] = tuple(layers)
        if "vision_feature_layer" in kw:
            layers = kw["vision_feature_layer"]
            layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(layers, (list, tuple)) or not layers or not all(
                    isinstance(l, int) and not isinstance(l, bool) for l in layers):
                raise InputError(f"vision_feature_layer must be a tower layer index or a non-empty list of them, "
                                 f"got {kw['vision_feature_layer']!r}")
            kw["vision_feature_layer"] = tuple(layers)
        if "visual_token_keep" in kw:
            keep = kw["visual_token_keep"]
            if not isinstance(keep, (list, tuple)):
                raise InputError(f"visual_token_keep must be a list [low, high], got {keep!r}")
            kw["visual_token_keep"] = tuple(keep)
        return cls(**kw)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise InputError(f"training config {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(raw, Mapping):
            raise InputError(f"{p} must hold a mapping of options")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(cls: type, raw: Any, where: str) -> None:
    if not isinstance(raw, Mapping):
        raise InputError(f"{where} must be a mapping")
    valid = {f.name for f in fields(cls)}
    for key in raw:
        if key not in valid:
            raise InputError(f"unknown key {key!r} in {where}; valid keys: {', '.join(sorted(valid))}")


def _build(cls: type, raw: Any, where: str) -> Any:
    _check(cls, raw, where)
    return cls(**raw)
