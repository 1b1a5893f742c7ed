"""The one training loop for every model: Adam with warmup, gradient clipping, a fixed number of epochs
(never early stopping on test data), seeded shuffling, per-epoch logs of every loss term and codebook usage,
checkpoints every N epochs and exact resumption after an interruption."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import train_recipe
from .io import atomic_dir, read_json, write_json
from .models import AnomalyModel
from .models.quantize import perplexity


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    warmup_epochs: int = 2
    lr_decay_epochs: list[int] = field(default_factory=list)
    lr_decay: float = 0.1
    schedule: str = "step"  # step: decay at lr_decay_epochs | cosine: anneal to lr x lr_decay by the last epoch
    grad_clip: float = 2.0
    optimizer: str = "adam"  # adam | adamw (decoupled weight decay)
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 5
    init_images: int = 64
    device: str = "auto"
    precision: str = "float32"  # float32 | bfloat16: the training step under bfloat16 autocast

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")

    @classmethod
    def from_params(cls, params: dict, model_name: str | None = None) -> "TrainConfig":
        """The ``train`` section, with ``train.per_model.<model_name>`` (a model's own recipe) applied over it."""
        known = set(cls.__dataclass_fields__)
        per_model = params.get("per_model") or {}
        sections = [("train", set(params) - {"per_model"})] + [
            (f"train.per_model.{m}", set(v)) for m, v in per_model.items()
        ]
        for where, keys in sections:
            unknown = sorted(keys - known)
            if unknown:
                raise ValueError(f"{where}: unknown params {unknown}; known: {sorted(known)}")
        return cls(**train_recipe(params, model_name))

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.optimizer](params, lr=self.lr, weight_decay=self.weight_decay)


SCHEDULES = ("step", "cosine")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
PRECISIONS = ("float32", "bfloat16")


def cpu_has_bfloat16() -> bool:
    """Whether torch runs bfloat16 CPU kernels here (oneDNN on AVX-512; not with kernels pinned to AVX2)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def step_precision(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The context a training step runs in. ``bfloat16``: autocast (convolutions and matmuls in bfloat16; weights,
    optimizer state, VQ-Flow's codebooks and density sums in float32; no loss scaling: bfloat16 has float32's range).
    Refused where it would be slower than float32: a CPU whose oneDNN has no bfloat16 kernels (no AVX-512, or
    kernels pinned to AVX2), a GPU without bfloat16."""
    if precision == "float32":
        return contextlib.nullcontext
    if device.type == "cpu" and not cpu_has_bfloat16():
        raise ValueError(
            f"train.precision: bfloat16 needs bfloat16 CPU kernels, and torch runs its "
            f"{torch.backends.cpu.get_cpu_capability()} kernels here (an older CPU, or kernels pinned with "
            "ATEN_CPU_CAPABILITY / DNNL_MAX_CPU_ISA), where a step takes ~10x longer than in float32: use float32, "
            "or a CPU with AVX-512 (AVX512-BF16 / AMX for the full gain), or a GPU"
        )
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision: bfloat16 is not supported on {torch.cuda.get_device_name(device)}")
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)


class FeatureSet(Protocol):
    """Training features by position: ``__getitems__`` gives the stacked pyramid (one tensor per stage) of a
    batch. ``features.CachedFeatures`` streams from the cache; ``TensorFeatures`` wraps tensors in memory."""

    def __len__(self) -> int: ...

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]: ...


class TensorFeatures:
    """Per-stage tensors already in memory (N, C, H, W) as a FeatureSet."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        picked = torch.as_tensor(list(indices), dtype=torch.long)
        return [t[picked] for t in self.tensors]


def _batch_as_is(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch  # __getitems__ already stacked it


class EpochBatches:
    """The index batches of the current epoch: set before each pass, read by the DataLoader in this process."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def batch_loader(features: FeatureSet, order: EpochBatches | list[list[int]], workers: int = 0) -> DataLoader:
    """Batches in ``order``, read by ``workers`` processes ahead of the training step (0: inline). Workers are
    started once from a fresh forkserver process (a fork of this process can inherit the threads of an
    orchestrator such as Prefect, and die), and kept across epochs."""
    return DataLoader(
        features,
        batch_sampler=order,
        collate_fn=_batch_as_is,
        num_workers=workers,
        persistent_workers=workers > 0,
        multiprocessing_context="forkserver" if workers > 0 else None,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Linear warmup from 0.1 x lr over ``warmup_epochs``, then step decay at ``lr_decay_epochs`` or (``cosine``)
    a half cosine from lr down to lr x lr_decay at the end of the last epoch."""
    progress = epoch + step / max(1, steps_per_epoch)
    if progress < cfg.warmup_epochs:
        return cfg.lr * (0.1 + 0.9 * progress / cfg.warmup_epochs)
    if cfg.schedule == "cosine":
        done = (progress - cfg.warmup_epochs) / max(1e-9, cfg.epochs - cfg.warmup_epochs)
        return cfg.lr * (cfg.lr_decay + (1 - cfg.lr_decay) * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))
    return cfg.lr * cfg.lr_decay ** sum(epoch >= e for e in cfg.lr_decay_epochs)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Checkpoint:
    """``checkpoint/`` holds model weights, optimizer state and RNG state (safetensors) plus progress (JSON)."""

    def __init__(self, path: str | Path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    def save(self, model: AnomalyModel, optimizer: torch.optim.Optimizer, epoch: int, history: list[dict]) -> None:
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        with atomic_dir(self.path) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                str(tmp / "model.safetensors"),
            )
            save_file({**opt_tensors, "rng.torch": torch.get_rng_state()}, str(tmp / "state.safetensors"))
            (tmp / "progress.json").write_text(
                json.dumps({"fingerprint": self.fingerprint, "epoch": epoch, "history": history, "optimizer": opt_meta})
            )

    def load(self, model: AnomalyModel, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]] | None:
        """Restore and return (next epoch, history), or None when there is no compatible checkpoint."""
        progress_path = self.path / "progress.json"
        if not progress_path.is_file():
            return None
        progress = read_json(progress_path)
        if progress.get("fingerprint") != self.fingerprint:
            return None
        model.load_state_dict(load_file(str(self.path / "model.safetensors")), strict=True)
        state = load_file(str(self.path / "state.safetensors"))
        _restore_optimizer(optimizer, state, progress["optimizer"])
        torch.set_rng_state(state["rng.torch"])
        return progress["epoch"] + 1, progress["history"]


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_model(
    model: AnomalyModel,
    features: FeatureSet | Sequence[torch.Tensor],
    cfg: TrainConfig,
    device: torch.device,
    checkpoint: Checkpoint | None = None,
    log: Callable[[list[dict]], None] | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    workers: int = 0,
) -> list[dict]:
    """Train ``model`` on the training features (a FeatureSet, or per-stage tensors). Returns the per-epoch
    history. Only a few batches are in memory at a time; ``workers`` processes read them ahead.

    ``stop_after_epoch`` ends the run early as an interruption would (used to test resumption).
    """
    if not hasattr(features, "__getitems__"):
        features = TensorFeatures(features)
    count = len(features)
    if count == 0:
        raise ValueError("no training images")
    precision = step_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    model.to(device)
    init_ids = torch.randperm(count, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.init_images]
    model.initialize([f.to(device) for f in features.__getitems__(init_ids.tolist())])
    batch = min(cfg.batch_size, count)
    epochs = cfg.epochs if model.trainable else 0  # a statistics-only model is fitted below, in one pass
    start, history = 0, []
    if epochs:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = cfg.make_optimizer(params)
        if checkpoint is not None:
            restored = checkpoint.load(model, optimizer)
            if restored is not None:
                start, history = restored
    steps = count // batch  # drop the ragged last batch: batch norm needs more than one sample
    epoch_batches = EpochBatches()
    loader = batch_loader(features, epoch_batches, workers)
    for epoch in range(start, epochs):
        model.train()
        order = torch.randperm(count, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        usage = {name: torch.zeros(size, dtype=torch.long) for name, size in model.codebook_sizes.items()}
        started = time.perf_counter()
        epoch_batches.batches = [order[step * batch : (step + 1) * batch].tolist() for step in range(steps)]
        bar = tqdm(
            loader,
            total=steps,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            leave=False,
        )
        for step, stages in enumerate(bar):
            lr = learning_rate(cfg, epoch, step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for chunk in model.training_chunks([f.to(device, non_blocking=True) for f in stages]):
                with precision():
                    out = model.training_step(chunk)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(
                        f"epoch {epoch + 1} step {step}: loss is {out.loss.item()} (lower train.lr?)"
                    )
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                for name, value in {"loss": out.loss, **out.terms, "grad_norm": grad_norm}.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                    counts[name] = counts.get(name, 0) + 1
                for name, codes in out.codes.items():
                    usage[name] += torch.bincount(codes.flatten().cpu(), minlength=usage[name].numel())
                bar.set_postfix(loss=f"{float(out.loss.detach()):.4f}")
        row = {"epoch": epoch + 1, "lr": lr, **{k: v / counts[k] for k, v in sums.items()}}
        for name, counts in usage.items():
            row[f"{name}_perplexity"] = perplexity(counts)
            row[f"{name}_used"] = float((counts > 0).float().mean())
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if log is not None:
            log(history)
        last = epoch + 1 == epochs
        if checkpoint is not None and (last or (epoch + 1) % cfg.checkpoint_every == 0):
            checkpoint.save(model, optimizer, epoch, history)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last:
            return history
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        in_order = [list(range(start, min(start + batch, count))) for start in range(0, count, batch)]
        model.fit_statistics([f.to(device) for f in stages] for stages in batch_loader(features, in_order))
    if not epochs:
        history = [{"epoch": 0, "seconds": time.perf_counter() - started}]
        if log is not None:
            log(history)
    return history


def write_history(path: str | Path, history: list[dict]) -> None:
    """The per-epoch log as a DVC plots file (a JSON list of rows), without the epochs' wall-clock seconds (the
    train stage records those in the timing file: a pipeline output must not change between identical runs)."""
    write_json(path, [{k: v for k, v in row.items() if k != "seconds"} for row in history])


__all__ = [
    "TrainConfig",
    "FeatureSet",
    "TensorFeatures",
    "Checkpoint",
    "train_model",
    "write_history",
    "fingerprint",
    "learning_rate",
    "step_precision",
    "cpu_has_bfloat16",
    "seed_everything",
]
