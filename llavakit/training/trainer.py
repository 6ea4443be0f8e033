"""The training loop behind `llavakit train CONFIG` (both LLaVA stages).

Stage 1 (align): vision tower and LM frozen, projector trained. Stage 2 (instruct): projector + LoRA on
the LM (peft), or full LM tuning via `train: [language_model]`. Liu et al., "Visual Instruction
Tuning" (2023) and "Improved Baselines with Visual Instruction Tuning" (2023) for the recipe.

Our choices, each to make CPU training practical:
- frozen towers: vision features are cached once (`features.py`), standardised per channel
  (folded into `linear_1` when weights are saved, so the saved model needs no extra layer);
- several conversations about one image are packed into one sequence with a block mask
  (`packing.py`);
- logits only at labelled positions (the 49k-word head is as costly as the LM for every position);
- multi-process (torchrun, gloo on CPU): each rank takes its share of every step's images and
  gradients of the trainable parameters are averaged across ranks (what DDP does) before each step.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..data.dataset import IGNORE_INDEX, TurnLabeler
from ..errors import InputError, TrainingError
from ..fileio import atomic_path, atomic_write_text, save_figure
from ..models.vlm import copy_feature_blocks, feature_block_map
from . import checkpoint
from .apply import TRAINED, trained_file
from .config import SHIPPED, TrainConfig
from .data import ImageGroup, build_groups, mix
from .features import FeatureCache
from .lora import apply_lora, grow_lora_state, load_lora_state, lora_state
from .packing import block_mask, collate_packed, pack
from .token_drop import cls_scores, drop_visual_tokens, step_generator
from .schedule_train import ScheduleTraining, parse_schedule
from .yopo_train import YopoTraining, parse_yopo

MAX_BAD_STEPS = 10  # this many non-finite steps in a row stop a run (fewer are skipped)


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay
    return f


def fold_standardization(proj: dict[str, Tensor], mu: Tensor, sd: Tensor) -> dict[str, Tensor]:
    """Projector tensors trained on z = (x - mu) / sd -> tensors that take raw features x.

    linear_1: W' = W / sd, b' = b - W' mu. The context branch (models/projector.py) adds r(z) to z, so
    on raw features it must add sd * r: its `down` folds like linear_1 and its `up` is scaled by sd;
    then MLP'(x + sd r) = MLP(z + r)."""
    out = dict(proj)
    for pre in ("linear_1", "context.down"):
        if f"{pre}.weight" in out:
            w = out[f"{pre}.weight"] / sd[None, :]
            out[f"{pre}.weight"], out[f"{pre}.bias"] = w, out[f"{pre}.bias"] - w @ mu
    if "context.up.weight" in out:
        out["context.up.weight"] = out["context.up.weight"] * sd[:, None]
        out["context.up.bias"] = out["context.up.bias"] * sd
    return out


def unfold_standardization(proj: dict[str, Tensor], mu: Tensor, sd: Tensor) -> dict[str, Tensor]:
    """The inverse of `fold_standardization`."""
    out = dict(proj)
    for pre in ("linear_1", "context.down"):
        if f"{pre}.weight" in out:
            w = out[f"{pre}.weight"]
            out[f"{pre}.bias"] = out[f"{pre}.bias"] + w @ mu
            out[f"{pre}.weight"] = w * sd[None, :]
    if "context.up.weight" in out:
        out["context.up.weight"] = out["context.up.weight"] / sd[:, None]
        out["context.up.bias"] = out["context.up.bias"] / sd
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir).expanduser()

    # ------------------------------------------------------------------ set-up
    def setup(self, resume: bool | None = None) -> None:
        """Build model, data, feature cache and optimizer. With `resume` given (what `run` passes), the
        out_dir's checkpoint is checked against this model and recipe first, before any feature is
        computed: a checkpoint that needs --resume, or one of another model, is refused in seconds."""
        import llavakit

        cfg = self.cfg
        self.rank, self.world = _dist()
        torch.manual_seed(cfg.seed)
        self.vlm = llavakit.load(cfg.model, trained=False)  # "default": the untrained assembly, never the shipped weights
        model = self.model = self.vlm.model
        if not model.config.has_vision:
            raise InputError("training recipes need a vision-language model")
        if cfg.token_drop_on and cfg.visual_token_select == "cls" and not (
                model.vision_tower.has_cls and model.config.vision_feature_select_strategy == "default"):
            raise InputError("visual_token_select: cls needs a vision tower with a [CLS] token and the 'default' "
                             f"feature selection ({model.config.vision.family}, "
                             f"{model.config.vision_feature_select_strategy!r} here); use random")
        if cfg.projector_context:
            model.add_projector_context(cfg.projector_context, cfg.projector_context_channels)
        if cfg.visual_inject:
            model.add_visual_inject(cfg.visual_inject, cfg.visual_inject_rank)
        model.requires_grad_(False)
        for name in cfg.train:
            model.get_submodule(name).requires_grad_(True)
        if cfg.lora is not None:
            apply_lora(model.language_model, cfg.lora)
        self.mu = self.sd = None
        self.stat_layers = model.config.feature_layers  # the layers self.mu / self.sd describe
        if cfg.init_from:
            self._load_trained(self._init_path(cfg.init_from))
        if cfg.vision_feature_layer:
            model.set_feature_layers(cfg.vision_feature_layer)
        self.yopo = self._yopo(cfg.yopo) if cfg.yopo else None
        self.prune = self._prune(cfg.prune_schedule) if cfg.prune_schedule else None
        self.fp = checkpoint.fingerprint(model.config.to_dict(), cfg.to_dict())
        self.resume_state = None if resume is None else self._check_out_dir(resume)
        self.ds = TurnLabeler(self.vlm.processor)
        self.groups: list[ImageGroup] = []
        self.drop_of: dict[str, float] = {}  # image key -> its source's visual-token drop chance
        sources = []
        for src in cfg.data:
            g = build_groups(src)
            if not g:
                raise InputError(f"data source {src.kind} produced no samples")
            sources.append((g, src.weight))
            self.groups += g
            for key in {grp.key for grp in g}:
                if self.drop_of.setdefault(key, cfg.token_drop(src)) != cfg.token_drop(src):
                    raise InputError(f"image {key} is in two data sources with different visual_token_drop "
                                     f"({self.drop_of[key]} and {cfg.token_drop(src)}); give them the same one")
        per_step = cfg.batch_size * cfg.grad_accum * self.world
        self.order = mix(sources, cfg.steps * per_step, cfg.seed)
        self.n_image_tokens = model.num_image_tokens()
        cache_root = Path(os.environ.get("LLAVAKIT_FEATURE_CACHE", self.out / "features")).expanduser()
        self.features = FeatureCache(cache_root).build(model, self.vlm.processor, self.groups)
        if self.mu is None:
            if cfg.standardize_features:
                self.mu, self.sd = self.features.stats()
            else:
                d = self.features.table.shape[-1]
                self.mu, self.sd = torch.zeros(d), torch.ones(d)
        else:  # init_from's statistics; layers it did not read get this cache's (or none)
            self.mu, self.sd = self._remap_stats(self.mu, self.sd)
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = []
        own_group = {id(p) for p in model.multi_modal_projector.context.parameters()} \
            if "projector_context" in cfg.lr else set()
        for name, lr in cfg.lr.items():
            if name == "lora":
                ps = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
            elif name == "projector_context":
                ps = [p for p in model.multi_modal_projector.context.parameters() if p.requires_grad]
            else:
                ps = [p for p in model.get_submodule(name).parameters() if p.requires_grad and id(p) not in own_group]
            if ps:
                groups.append({"params": ps, "lr": lr})
        covered = {id(p) for g in groups for p in g["params"]}
        if any(id(p) not in covered for p in self.params):
            raise InputError(f"some trained parameters have no learning rate; set lr for each of "
                             f"{', '.join(cfg.train)}{' and lora' if cfg.lora else ''}")
        self.opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg))
        self.step = 0

    def _yopo(self, spec: str) -> YopoTraining:
        """The masked YOPO forward for this model; the heads file (if any) is read and checked here."""
        from ..compression import Compression

        model = self.model
        if model.visual_inject is not None:
            raise InputError("yopo cannot train together with visual re-injection (inference refuses the pair)")
        hook = parse_yopo(spec)
        lm = model.language_model
        hook.active_heads(lm.num_layers, lm.layers[0].self_attn.num_heads)
        if hook.layercut is not None and hook.layercut > lm.num_layers:
            raise InputError(f"yopo: layercut={hook.layercut} is past the LM's {lm.num_layers} layers")
        inter = lm.config.intermediate_size
        if inter // hook.ffn_ratio < 1:
            raise InputError(f"yopo: ffn_ratio={hook.ffn_ratio} leaves no intermediate channel of {inter}")
        side = hook.grid or Compression.parse(spec).image_side(model)
        if side is None:
            raise InputError("yopo training needs each image's tokens as one square patch grid (fixed resolution); "
                             "give grid=<side>")
        return YopoTraining(hook, side)

    def _prune(self, spec: str) -> ScheduleTraining:
        """The masked forward of a G-Search / P-Sigmoid schedule (training/schedule_train.py)."""
        if self.model.visual_inject is not None:
            raise InputError("prune_schedule cannot train together with visual re-injection (the schedule's "
                             "masked forward does not re-add the visual tokens)")
        return ScheduleTraining(parse_schedule(spec))

    def _check_out_dir(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume from (None: start fresh); refuses a checkpoint of another model or
        recipe, and a fresh start over an existing checkpoint. Touches nothing but the stray temp files
        of an interrupted save (`checkpoint.load` removes them)."""
        if resume:
            return checkpoint.load(self.out, self.fp)
        if (self.out / checkpoint.NAME).exists():
            raise InputError(f"{self.out} already holds a checkpoint; pass --resume to continue it or "
                             f"choose another out_dir")
        return None

    def _remap_stats(self, mu: Tensor, sd: Tensor) -> tuple[Tensor, Tensor]:
        """Feature statistics of `self.stat_layers` laid out for the model's feature layers: a kept layer's
        block is copied (so the loaded projector computes what it did), a new layer's block comes from
        this run's cache (zeros and ones without standardisation)."""
        blocks = feature_block_map(self.stat_layers, self.model.config.feature_layers,
                                   self.model.config.vision.num_hidden_layers)
        if blocks is None:
            return mu, sd
        dv = self.model.config.vision.hidden_size
        d = self.features.table.shape[-1]
        if self.cfg.standardize_features:
            new_mu, new_sd = self.features.stats()
        else:
            new_mu, new_sd = torch.zeros(d), torch.ones(d)
        return copy_feature_blocks(new_mu, mu, blocks, dv), copy_feature_blocks(new_sd, sd, blocks, dv)

    @staticmethod
    def _init_path(init_from: str) -> Path:
        """The trained .safetensors file `init_from` names: a run's out_dir, a file, or "shipped"."""
        if init_from == SHIPPED:
            from ..default.build import trained_weights

            path = trained_weights()
            if path is None:
                raise InputError(f"init_from: {SHIPPED}: this llavakit install carries no packed trained weights "
                                 f"(llavakit/default/weights/default-trained.safetensors.gz)")
            return path
        return trained_file(init_from)

    def _load_trained(self, path: Path) -> None:
        from safetensors import safe_open

        if not path.is_file():
            raise InputError(f"init_from: {path} does not exist (train the previous stage first, or name a "
                             f"trained .safetensors file)")
        with safe_open(str(path), "pt") as f:  # one read: tensors and the LoRA spec in the metadata
            meta = f.metadata() or {}
            saved_spec = json.loads(meta.get("lora") or "null")
            state = {k: f.get_tensor(k).float() for k in f.keys()}  # fp32 (a shipped file stores fp16)
        self.mu, self.sd = state.pop("feature_mean"), state.pop("feature_std")
        if meta.get("vision_feature_layer"):  # the layers its projector reads (files from before: the model's)
            try:
                self.model.set_feature_layers(json.loads(meta["vision_feature_layer"]))
            except (ValueError, TypeError) as e:
                raise InputError(f"init_from {path}: unreadable vision_feature_layer in its metadata ({e})") from None
            self.stat_layers = self.model.config.feature_layers
        proj = {k[len("multi_modal_projector."):]: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
        proj = unfold_standardization(proj, self.mu, self.sd)  # train in standardised space
        has_ctx = any(k.startswith("context.") for k in proj)
        if has_ctx and not self.model.multi_modal_projector.has_context:
            raise InputError(f"init_from {path} has a projector context branch; set projector_context in the recipe")
        try:
            missing, unexpected = self.model.multi_modal_projector.load_state_dict(proj, strict=False)
        except RuntimeError as e:  # a shape mismatch, e.g. a projector that read other tower layers
            raise InputError(f"init_from {path}: its projector does not fit this model's (feature layers "
                             f"{list(self.model.config.feature_layers)}): {e}") from None
        if unexpected or any(not k.startswith("context.") for k in missing) or (has_ctx and missing):
            raise InputError(f"init_from {path}: projector tensors do not match this model "
                             f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
        inject = {k[len("visual_inject."):]: v for k, v in state.items() if k.startswith("visual_inject.")}
        if inject:
            if self.model.visual_inject is None:
                raise InputError(f"init_from {path} has a visual re-injection branch; set visual_inject in the recipe")
            try:
                self.model.visual_inject.load_state_dict(inject)
            except RuntimeError as e:
                raise InputError(f"init_from {path}: its visual re-injection branch does not match the recipe's "
                                 f"(visual_inject, visual_inject_rank): {e}") from None
        lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        if lora:
            if self.cfg.lora is None:
                raise InputError(f"{path} holds LoRA weights but this recipe has no `lora:` section")
            spec = self.cfg.lora
            if saved_spec and (saved_spec["r"], saved_spec["alpha"], tuple(saved_spec["targets"])) != (
                    spec.r, spec.alpha, tuple(spec.targets)):
                try:
                    lora = grow_lora_state(self.model.language_model, lora, saved_spec, spec)
                except (ValueError, KeyError) as e:
                    raise InputError(f"init_from {path}: {e}") from None
            load_lora_state(self.model.language_model, lora)

    # ------------------------------------------------------------------ one step
    def loss(self, groups: list[ImageGroup], where: tuple[int, int] = (0, 0)) -> Tensor:
        """Mean next-token loss of one micro-batch; `where` = (step, micro-step) seeds visual-token drop."""
        model, lm = self.model, self.model.language_model
        examples = [pack(self.ds, g.key, g.blocks, self.n_image_tokens) for g in groups]
        batch = collate_packed(examples, self.vlm.processor._pad_id())
        feats = self.features.get(batch["keys"]).float()  # (B, N, Dv)
        img = model.multi_modal_projector((feats - self.mu) / self.sd)  # (B, N, D)
        ids = batch["input_ids"]
        img_mask = ids == model.config.image_token_id
        emb = lm.embed(ids.masked_fill(img_mask, 0))
        emb = emb.masked_scatter(img_mask[..., None], img.reshape(-1, img.shape[-1]).to(emb.dtype))
        mask = block_mask(batch["block_ids"], batch["valid"])  # (B, 1, T, T)
        if self.cfg.token_drop_on:
            gen = step_generator(self.cfg.seed, where[0], where[1], self.rank)
            probs = [self.drop_of[g.key] for g in groups]
            scores = None
            if self.cfg.visual_token_select == "cls":  # one extra vision pass per dropped image (not cached)
                def scores(rows: list[int]) -> Tensor:  # (len(rows), N)
                    return cls_scores(model, self.vlm.processor, [groups[r].load() for r in rows])
            mask = drop_visual_tokens(mask, img_mask, probs, self.cfg.visual_token_keep, gen, scores)
        # bf16: autocast of the LM matmuls (5x the fp32 matmul rate on AVX512-BF16 CPUs); the loss is fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            if self.yopo is not None:  # YOPO's pruning in masked form (training/yopo_train.py)
                hidden = self.yopo.forward(lm, emb, mask, batch["position_ids"], img_mask)
            elif self.prune is not None:  # a G-Search / P-Sigmoid schedule in masked form (schedule_train.py)
                hidden = self.prune.forward(lm, emb, mask, batch["position_ids"], img_mask, batch["block_ids"],
                                            batch["labels"], batch["valid"])
            else:
                hidden = lm(emb, attention_mask=mask, position_ids=batch["position_ids"],
                            inject=model.injection(ids, emb))
            tgt = batch["labels"][:, 1:]
            sel = tgt != IGNORE_INDEX
            logits = lm.logits(hidden[:, :-1][sel])  # (n_targets, V): only where there is a label
        return F.cross_entropy(logits.float(), tgt[sel])

    def _batch_groups(self, step: int, micro: int) -> list[ImageGroup]:
        cfg = self.cfg
        per_micro = cfg.batch_size * self.world
        start = (step * cfg.grad_accum + micro) * per_micro + self.rank * cfg.batch_size
        return [self.groups[i] for i in self.order[start:start + cfg.batch_size]]

    # ------------------------------------------------------------------ loop
    def run(self, resume: bool = False) -> Path:
        cfg = self.cfg
        self.setup(resume=resume)
        log_path = self.out / "loss.jsonl"
        state, self.resume_state = self.resume_state, None
        if state is not None:
            self._restore(state)
            if self.rank == 0 and log_path.is_file():  # drop log lines past the checkpoint
                keep = [x for x in log_path.read_text().splitlines() if x.strip()
                        and json.loads(x)["step"] <= self.step]
                atomic_write_text(log_path, "".join(x + "\n" for x in keep))
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str))
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.stage}", disable=self.rank != 0)
        t0, window, bad_run, skipped = time.perf_counter(), [], 0, 0
        while self.step < cfg.steps:
            self.opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(cfg.grad_accum):
                loss = self.loss(self._batch_groups(self.step, micro), (self.step, micro)) / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
            if self.world > 1:
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
                t = torch.tensor([total])
                dist.all_reduce(t)
                total = float(t) / self.world
            norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            if math.isfinite(total) and math.isfinite(float(norm)):
                self.opt.step()
                bad_run = 0
            else:  # a non-finite loss or gradient: skip the update (the weights stay finite), go on
                bad_run += 1
                skipped += 1
                if bad_run >= MAX_BAD_STEPS:
                    raise TrainingError(f"step {self.step + 1}: {bad_run} non-finite losses/gradients in a row; "
                                        f"stopping (the last checkpoint is intact; lower the learning rates)")
            self.sched.step()
            self.step += 1
            window.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                finite = [x for x in window if math.isfinite(x)]
                rec = {"step": self.step, "loss": sum(finite) / len(finite) if finite else None,
                       "lr": self.sched.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - t0, 1)}
                if skipped:
                    rec["skipped_steps"] = skipped  # non-finite loss or gradient since the last record
                    skipped = 0
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                window = []
            if self.rank == 0 and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                checkpoint.save(self.out, self._state())
                self.save_trained(self.out / TRAINED)  # small; lets `llavakit eval` follow a running job
        bar.close()
        if self.rank == 0:
            self.save_trained(self.out / TRAINED)
            plot_loss(log_path, self.out / "loss.png")
        if self.world > 1:
            dist.barrier()
        return self.out

    def _state(self) -> dict[str, Any]:
        trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {"fingerprint": self.fp, "step": self.step, "trainable": trainable, "mu": self.mu, "sd": self.sd,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "torch_rng": torch.get_rng_state()}

    def _restore(self, state: dict[str, Any]) -> None:
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in state["trainable"].items():
                own[n].copy_(v)
        self.mu, self.sd = state["mu"], state["sd"]
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])

    def save_trained(self, path: Path) -> Path:
        """Projector (standardisation folded into linear_1) + LoRA tensors + feature stats, safetensors."""
        from safetensors.torch import save_file

        proj = {k: v.detach().clone() for k, v in self.model.multi_modal_projector.state_dict().items()}
        proj = fold_standardization(proj, self.mu, self.sd)
        out = {f"multi_modal_projector.{k}": v.contiguous() for k, v in proj.items()}
        out.update({f"lora.{k}": v.contiguous() for k, v in lora_state(self.model.language_model).items()})
        if self.model.visual_inject is not None:
            out.update({f"visual_inject.{k}": v.detach().float().contiguous()
                        for k, v in self.model.visual_inject.state_dict().items()})
        out["feature_mean"], out["feature_std"] = self.mu.contiguous(), self.sd.contiguous()
        meta = {"lora": json.dumps(self.cfg.lora.__dict__ if self.cfg.lora else None, default=list),
                "steps": str(self.step), "stage": self.cfg.stage,
                "vision_feature_layer": json.dumps(list(self.model.config.feature_layers))}
        with atomic_path(path) as tmp:
            save_file(out, str(tmp), metadata=meta)
        return path


def plot_loss(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log_path.is_file():
        return
    recs = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [math.nan if r["loss"] is None else r["loss"] for r in recs])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(out.parent.name)
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)


def train(config_path: str | Path, resume: bool = False, overrides: dict[str, Any] | None = None) -> Path:
    import yaml

    raw = yaml.safe_load(Path(config_path).read_text()) if Path(config_path).is_file() else None
    if raw is None:
        raise InputError(f"training config {config_path} does not exist or is empty")
    raw.update(overrides or {})
    return Trainer(TrainConfig.from_dict(raw)).run(resume=resume)
