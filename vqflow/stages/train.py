"""train: the configured model on the train split (all categories mixed, no labels); writes its weights and the
training log, nothing else (calibrate and package follow)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .. import timing
from ..config import section
from .common import channels, manifest_and_cache


def run(params: dict, stop_after_epoch: int | None = None) -> Path:
    """Train and save the weights (``outputs.weights``); resumes from its checkpoint when one fits."""
    from ..backbones import resolve_device
    from ..code import digest, stage_files
    from ..features import CachedFeatures
    from ..models import config_from_params, create_model
    from ..train import Checkpoint, TrainConfig, fingerprint, seed_everything, train_model, write_history
    from ..weights import save_model

    manifest, cache = manifest_and_cache(params)
    name, config = config_from_params(
        section(params, "model", ("name",)), in_channels=channels(cache), image_size=cache.spec.image_size
    )
    train_section = dict(section(params, "train"))
    workers = int(train_section.pop("loader_workers", 0))  # how fast batches are read, not a training setting
    cfg = TrainConfig.from_params(train_section, name)
    seed_everything(cfg.seed)
    model = create_model(name, config)
    train_ids = manifest.loc[manifest.split == "train", "image_id"].tolist()
    features = CachedFeatures(cache, train_ids)
    out = section(params, "outputs", ("weights", "train_log", "checkpoints"))
    # a checkpoint is resumed only by the code that wrote it: this stage's own code (dvc.yaml's deps), so a fix
    # elsewhere neither restarts training nor lets an older model pass as this code's output
    key = fingerprint(name, dataclasses.asdict(config), cfg.__dict__, cache.index["key"], digest(stage_files("train")))
    checkpoint = Checkpoint(Path(out["checkpoints"]) / key, key)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    history = train_model(
        model,
        features,
        cfg,
        device,
        checkpoint,
        lambda h: write_history(out["train_log"], h),
        stop_after_epoch=stop_after_epoch,
        workers=workers,
    )
    write_history(out["train_log"], history)  # also when a finished checkpoint was restored
    if model.trainable and len(history) < cfg.epochs:
        raise RuntimeError(f"training stopped after epoch {len(history)} of {cfg.epochs}; run again to resume")
    save_model(
        model,
        name,
        config,
        out["weights"],
        extra={
            "backbone": cache.index["backbone"],
            "feature_cache_key": cache.index["key"],
            "train": cfg.__dict__,
            "train_images": len(train_ids),
            "epochs": cfg.epochs if model.trainable else 0,
        },
    )
    timing.record(
        params,
        "train",
        seconds=time.perf_counter() - started,
        training_seconds=sum(row.get("seconds", 0.0) for row in history),
        seconds_per_epoch=[row.get("seconds") for row in history],
    )
    return Path(out["weights"])
