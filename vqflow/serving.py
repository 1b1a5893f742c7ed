"""The BentoML service: `bentoml serve vqflow.serving:AnomalyService` (thin: decode, check, call Predictor).

It loads the champion of the model store at start, warms up, and reports ready only then.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.exceptions import InvalidArgument
from bentoml.validators import ContentType
from PIL import Image

from .data.images import ImageLoadError
from .inference import Predictor, render_overlay
from .registry import MODEL_NAME, champion

ImageFile = Annotated[Path, ContentType("image/*")]


def _model_ref():
    tag = os.environ.get("VQFLOW_MODEL_TAG")
    ref = bentoml.models.get(tag) if tag else champion()
    if ref is None:
        raise RuntimeError(f"no champion {MODEL_NAME} model in the BentoML store: run `dvc repro` (export stage) first")
    return ref


@bentoml.service(traffic={"timeout": 60, "max_concurrency": 64}, workers=1)
class AnomalyService:
    def __init__(self) -> None:
        self.ready = False
        self.ref = _model_ref()
        max_pixels = int(os.environ.get("VQFLOW_MAX_PIXELS", 40_000_000))
        self.predictor = Predictor(self.ref.path, os.environ.get("VQFLOW_DEVICE", "auto"), max_pixels)
        self.predictor.warmup()
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    def _decode(self, image: Path) -> Image.Image:
        data = Path(image).read_bytes()
        try:
            return self.predictor.decode(data, Path(image).name)
        except ImageLoadError as exc:
            raise InvalidArgument(str(exc)) from exc

    @bentoml.api
    def predict(self, image: ImageFile, category: str | None = None, with_map: bool = False) -> dict:
        """Score one image: {score, is_anomaly, threshold, concept, model_tag, latency_ms, defect_boxes}."""
        result = self.predictor.predict([self._decode(image)], category)[0]
        return result.to_json(str(self.ref.tag), with_map)

    @bentoml.api(batchable=True, max_batch_size=16, max_latency_ms=200)
    def predict_batch(self, images: list[ImageFile]) -> list[dict]:
        """Score many images; concurrent requests are batched adaptively."""
        decoded = [self._decode(image) for image in images]
        return [r.to_json(str(self.ref.tag)) for r in self.predictor.predict(decoded)]

    @bentoml.api
    def render(self, image: ImageFile, category: str | None = None) -> Annotated[Path, ContentType("image/png")]:
        """The overlay image: input + heat map + contour of the predicted defect mask, as PNG."""
        decoded = self._decode(image)
        result = self.predictor.predict([decoded], category)[0]
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"vqflow-render-{os.getpid()}-{id(result)}.png"
        out.write_bytes(render_overlay(decoded, result, self.predictor.spec.image_size))
        return out
