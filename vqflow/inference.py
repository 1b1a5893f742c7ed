"""One inference path for the service and the `vqflow predict` CLI: bytes or files in, decisions and maps out."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from .backbones import resolve_device
from .data.images import DEFAULT_MAX_PIXELS, decode_image, image_to_array, to_rgb
from .bundle import ModelBundle
from .config import SERVE_CHOICES
from .scoring import score_images
from .thresholds import calibrated_categories, threshold_for


RUNTIMES = SERVE_CHOICES["runtime"]


class UnknownCategoryError(ValueError):
    """A request named a category the model has no threshold for."""


@dataclass
class Result:
    score: float
    is_anomaly: bool
    threshold: float
    concept: int | None
    anomaly_map: np.ndarray
    defect_mask: np.ndarray
    boxes: list[list[int]]
    latency_ms: float
    threshold_source: str = "global"  # "category": the image's category threshold, "global": all categories pooled

    def decision(self, model_tag: str) -> dict:
        """What the model said of the image (a feedback sidecar records it)."""
        return {"score": self.score, "is_anomaly": self.is_anomaly, "threshold": self.threshold, "model_tag": model_tag}

    def to_json(self, model_tag: str, with_map: bool = False) -> dict:
        payload = {
            "score": self.score,
            "is_anomaly": self.is_anomaly,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "concept": self.concept,
            "model_tag": model_tag,
            "latency_ms": round(self.latency_ms, 3),
            "defect_boxes": self.boxes,
        }
        if with_map:
            payload["anomaly_map_png"] = base64.b64encode(map_png(self.anomaly_map)).decode()
        return payload


def map_png(anomaly_map: np.ndarray) -> bytes:
    """The anomaly map as an 8-bit grayscale PNG (min-max scaled per image)."""
    span = max(float(anomaly_map.max() - anomaly_map.min()), 1e-12)
    gray = np.round((anomaly_map - anomaly_map.min()) / span * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


def boxes_of(mask: np.ndarray, scale_x: float, scale_y: float) -> list[list[int]]:
    """Bounding boxes [x0, y0, x1, y1] (original image pixels) of the 8-connected regions of a mask."""
    labelled, _ = ndimage.label(mask, structure=np.ones((3, 3), int))
    boxes = []
    for rows, cols in ndimage.find_objects(labelled):
        boxes.append(
            [
                int(cols.start * scale_x),
                int(rows.start * scale_y),
                int(np.ceil(cols.stop * scale_x)),
                int(np.ceil(rows.stop * scale_y)),
            ]
        )
    return boxes


class Predictor:
    """A trained model with its backbone and calibrated thresholds, ready to score decoded images."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        runtime: str = "torch",
        threads: int = 0,
    ):
        """``runtime``: torch (the bundle's weights) or onnx (its model.onnx in ONNX Runtime with ``threads``
        intra-op threads, 0 = all cores)."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r}: expected one of {RUNTIMES}")
        bundle = ModelBundle(model_dir)
        self.device = resolve_device(device)
        self.meta, self.thresholds, self.spec = bundle.meta, bundle.thresholds, bundle.spec
        self.runtime = runtime
        if runtime == "onnx":
            from .onnx_graph import OnnxScorer

            self.onnx = OnnxScorer(bundle.onnx_path, threads, str(self.device))
        else:
            self.model, self.backbone = bundle.load_model(self.device), bundle.load_backbone(self.device)
        self.max_pixels = max_pixels

    @property
    def categories(self) -> list[str]:
        """The categories with a calibrated threshold of their own."""
        return calibrated_categories(self.thresholds)

    def decode(self, data: bytes, name: str = "upload") -> Image.Image:
        """Decode uploaded bytes (any supported mode) to RGB at the model's working size, at once: a queued upload
        holds its working copy, not its full resolution. ``info["source_size"]`` keeps the original (width, height)
        for the defect boxes. Raises ImageLoadError naming the problem."""
        full = to_rgb(decode_image(data, name, self.max_pixels))
        size = self.spec.image_size
        working = full if full.size == (size, size) else full.resize((size, size), Image.BICUBIC)
        working.info["source_size"] = full.size
        return working

    def tensor(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([image_to_array(img, self.spec.image_size) for img in images]))

    def check_category(self, category: str | None) -> None:
        """An unknown category is an error (its parts would be judged by another category's threshold)."""
        if category is not None and category not in self.categories:
            raise UnknownCategoryError(
                f"category {category!r} has no calibrated threshold; known categories: "
                f"{self.categories} (omit it for the global threshold)"
            )

    def predict(self, images: list[Image.Image], categories: str | None | list[str | None] = None) -> list[Result]:
        """Score decoded images; ``categories`` (one for all, or one per image) selects the thresholds,
        None the global one."""
        if categories is None or isinstance(categories, str):
            categories = [categories] * len(images)
        for category in set(categories):
            self.check_category(category)
        started = time.perf_counter()
        batch = self.tensor(images)
        if self.runtime == "onnx":
            scored = self.onnx.score(batch)
        else:
            scored = score_images(self.model, self.backbone, batch, self.device)
        latency = (time.perf_counter() - started) * 1000 / max(1, len(images))
        concepts = scored.extras.get("concept")
        size = scored.maps.shape[-1]
        results = []
        for i, (img, category) in enumerate(zip(images, categories)):
            score = float(scored.scores[i])
            image_threshold = threshold_for(self.thresholds, category, "image")
            mask = scored.maps[i] > threshold_for(self.thresholds, category, "pixel")
            anomalous = score > image_threshold
            width, height = img.info.get("source_size", img.size)
            boxes = boxes_of(mask, width / size, height / size) if anomalous else []
            results.append(
                Result(
                    score,
                    anomalous,
                    image_threshold,
                    int(concepts[i]) if concepts is not None else None,
                    scored.maps[i],
                    mask,
                    boxes,
                    latency,
                    "category" if category else "global",
                )
            )
        return results

    def warmup(self) -> None:
        self.predict([Image.new("RGB", (self.spec.image_size, self.spec.image_size), (127, 127, 127))])


def render_overlay(image: Image.Image, result: Result, size: int) -> bytes:
    """Input + heat map + contour of the predicted defect mask, as PNG bytes."""
    from .plots import overlay

    base = image_to_array(image, size).transpose(1, 2, 0)
    picture = overlay(base, result.anomaly_map, result.defect_mask)
    buf = io.BytesIO()
    Image.fromarray(np.round(picture * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
