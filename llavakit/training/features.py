"""Vision-feature cache for frozen towers: each image goes through the tower once per run directory.

Features are the tower output after feature-layer selection (what the projector consumes), stored
in fp16 safetensors shards `features-XXXX.safetensors` with a JSON index mapping image key -> row.
Shards are written atomically (temp + rename), so an interrupted caching run resumes where it left off.
Writers take a lock file (`.lock`, through filelock): the ranks of a torchrun job, or two runs sharing
LLAVAKIT_FEATURE_CACHE, cache one at a time, and whoever comes second finds the features in the index
instead of racing on the same temp files and shard numbers.

`tower.json` records a fingerprint of what produced the features (the vision config, feature-layer
selection, input size, the image preprocessing and a hash of the tower's weights); a cache built by
another tower or preprocessing is refused with a clear error instead of being silently reused (ours:
a cache from before the fingerprint existed is adopted as it is and stamped). Image keys are still the
data source's names, so a changed image generator under the same key is not detected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import InputError
from ..fileio import atomic_path, atomic_write_text
from .data import ImageGroup

SHARD = 512
TOWER = "tower.json"


def tower_fingerprint(model, processor) -> str:
    """What the cached features depend on: vision config, feature selection, the processor's image
    settings and the exact tower weights (sha256 of their fp32 bytes in parameter order)."""
    cfg = model.config
    h = hashlib.sha256()
    meta = {"vision": dataclasses.asdict(cfg.vision), "layer": cfg.vision_feature_layer,
            "select": cfg.vision_feature_select_strategy, "input_size": cfg.input_size,
            "architecture": cfg.architecture, "image": repr(getattr(processor, "image_config", None))}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in list(model.vision_tower.named_parameters()) + list(model.vision_tower.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """Key -> (T, Dv) fp16 features, all held in memory once built."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.rows: dict[str, int] = {}
        self.table: Tensor | None = None  # (N, T, Dv) fp16

    def build(self, model, processor, groups: Sequence[ImageGroup], batch_size: int = 16) -> "FeatureCache":
        from filelock import FileLock
        from safetensors.torch import load_file

        self.root.mkdir(parents=True, exist_ok=True)
        fp = tower_fingerprint(model, processor)
        loaders = {}
        for g in groups:
            loaders.setdefault(g.key, g.load)
        with FileLock(str(self.root / ".lock")):
            index = self._fill(model, processor, fp, loaders, batch_size)
        shards = {s: load_file(str(self.root / f"features-{s:04d}.safetensors"))["features"]
                  for s in sorted({v[0] for v in index.values()})}
        wanted = list(loaders)
        self.table = torch.stack([shards[index[k][0]][index[k][1]] for k in wanted])  # (N, T, Dv)
        self.rows = {k: i for i, k in enumerate(wanted)}
        return self

    def _fill(self, model, processor, fp: str, loaders: dict, batch_size: int) -> dict[str, list]:
        """Compute and write the features `loaders` names that the index lacks; the updated index.
        Called under the cache's lock."""
        from safetensors.torch import save_file

        index_file = self.root / "index.json"
        index: dict[str, list] = json.loads(index_file.read_text()) if index_file.is_file() else {}
        self._check_tower(fp)
        todo = [k for k in loaders if k not in index]
        shard_id = len({v[0] for v in index.values()})
        with torch.inference_mode():
            for start in tqdm(range(0, len(todo), SHARD), desc="caching vision features", disable=not todo):
                keys = todo[start:start + SHARD]
                chunks = []
                for b in range(0, len(keys), batch_size):
                    imgs = [loaders[k]() for k in keys[b:b + batch_size]]
                    pv = processor(text=["<image>"] * len(imgs), images=imgs)["pixel_values"]
                    chunks.append(model._select(pv.to(model.multi_modal_projector.linear_1.weight.dtype)).half())
                name = f"features-{shard_id:04d}.safetensors"
                with atomic_path(self.root / name) as tmp:
                    save_file({"features": torch.cat(chunks).contiguous()}, str(tmp))
                for i, k in enumerate(keys):
                    index[k] = [shard_id, i]
                atomic_write_text(index_file, json.dumps(index))
                shard_id += 1
        return index

    def _check_tower(self, fp: str) -> None:
        """Refuse a cache another tower/preprocessing wrote; stamp a new (or pre-fingerprint) one."""
        path = self.root / TOWER
        if path.is_file():
            try:
                saved = json.loads(path.read_text())["fingerprint"]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"feature cache {self.root}: unreadable {TOWER} ({e}); delete the directory "
                                 f"or point LLAVAKIT_FEATURE_CACHE elsewhere") from None
            if saved != fp:
                raise InputError(f"feature cache {self.root} was built by another vision tower or image "
                                 f"preprocessing (fingerprint {saved}, this model {fp}): its features would be "
                                 f"wrong for this run; point LLAVAKIT_FEATURE_CACHE at another directory or "
                                 f"delete {self.root}")
            return
        atomic_write_text(path, json.dumps({"fingerprint": fp}))

    def get(self, keys: Sequence[str]) -> Tensor:
        assert self.table is not None
        return self.table[[self.rows[k] for k in keys]]  # (B, T, Dv) fp16

    def stats(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std over all cached tokens (fp32), for feature standardisation."""
        assert self.table is not None
        x = self.table.float().reshape(-1, self.table.shape[-1])
        return x.mean(0), x.std(0).clamp_min(1e-4)
