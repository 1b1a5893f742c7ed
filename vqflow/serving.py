"""The BentoML service (thin: check uploads, decode, queue for the batcher, answer JSON).

The service declares the model it serves, so ``bentoml build`` packages it into the bento: the champion named by
the champion record (``outputs.champions`` of params.yaml, shipped in the bento), or ``VQFLOW_MODEL_TAG``.
Settings: ``ServeSettings`` (vqflow/config.py), the ``serve`` section of params.yaml under ``VQFLOW_<KEY>``
environment variables.
Every 4xx answer has one JSON shape: ``{"status": <code>, "error": "<message naming the upload>"}``.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import os
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
import torch
import yaml
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import ContentType
from PIL import Image
from starlette.responses import Response

from .batching import MicroBatcher
from .config import ServeSettings
from .data.images import ImageLoadError
from .feedback import FeedbackError, FeedbackStore
from .inference import Predictor, UnknownCategoryError, render_overlay
from .model_store import DEFAULT_RECORD, MODEL_NAME, champion

SOURCE = Path(__file__).resolve().parents[1]  # the repository, or the bento's src/ directory
ImageFile = Annotated[Path, ContentType("image/*")]


def upload_name(path: Path) -> str:
    """The client's file name of an upload: BentoML stores it as a NamedTemporaryFile whose suffix is that name
    (tempfile's names are "tmp" + 8 random characters + suffix)."""
    name = Path(path).name
    return name[11:] if name.startswith("tmp") and len(name) > 11 else "upload"


def _params() -> dict:
    path = SOURCE / "params.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def served_tag() -> str:
    """The tag of the model to serve: ``VQFLOW_MODEL_TAG``, else the champion record's current champion."""
    if os.environ.get("VQFLOW_MODEL_TAG"):
        return os.environ["VQFLOW_MODEL_TAG"]
    record = SOURCE / _params().get("outputs", {}).get("champions", DEFAULT_RECORD)
    current = champion(record)
    if current is None:
        raise RuntimeError(
            f"no champion {MODEL_NAME} model: {record} names none. Run the pipeline (`dvc repro`, "
            "whose export stage promotes) or `vqflow promote TAG`, or set VQFLOW_MODEL_TAG"
        )
    return current["tag"]


class UploadTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class Unauthorized(BentoMLException):
    error_code = HTTPStatus.UNAUTHORIZED


class FeedbackNotConfigured(BentoMLException):
    error_code = HTTPStatus.NOT_FOUND


class FeedbackNotSecured(RuntimeError):
    """A service with a retrain inbox and no feedback token: anyone reaching the port could add training data."""


def feedback_store(settings: ServeSettings, token: str) -> FeedbackStore | None:
    """The inbox /feedback writes to (None: no /feedback). An inbox without a token is refused unless
    ``serve.feedback_unauthenticated`` opts in to an open endpoint."""
    if not settings.inbox:
        return None
    if not token and not settings.feedback_unauthenticated:
        raise FeedbackNotSecured(
            f"serve.inbox is set ({settings.inbox}) but VQFLOW_FEEDBACK_TOKEN is not: /feedback would let anyone who "
            "reaches this port put images into the retrain inbox as normal. Set VQFLOW_FEEDBACK_TOKEN to a secret "
            "(clients send 'Authorization: Bearer <token>'), or, on a closed test network only, opt in to an open "
            "endpoint with VQFLOW_FEEDBACK_UNAUTHENTICATED=true (serve.feedback_unauthenticated)"
        )
    return FeedbackStore(settings.inbox, settings.review)


def token_matches(expected: str, authorization: str | None) -> bool:
    """``Authorization: Bearer <token>`` against the shared token (constant time); no token: open (allowed only
    when the service opted in, see ``feedback_store``)."""
    if not expected:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


class UniformErrors:
    """ASGI middleware: every 4xx body becomes ``{"status": code, "error": message}`` (BentoML's own
    validation errors included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}

        async def send_uniform(message):
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                held["start"], held["body"] = message, b""
                return
            if "start" in held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                status = held["start"]["status"]
                body = json.dumps({"status": status, "error": _error_text(held["body"])}).encode()
                headers = [
                    (k, v) for k, v in held["start"]["headers"] if k.lower() not in (b"content-length", b"content-type")
                ]
                await send(
                    {
                        **held["start"],
                        "headers": headers
                        + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                    }
                )
                return await send({"type": "http.response.body", "body": body})
            await send(message)

        await self.app(scope, receive, send_uniform)


MULTIPART_MARGIN = 64 * 1024  # the form's boundaries, headers and small fields around the files


class BodyLimit:
    """ASGI middleware: a request body larger than its endpoint can accept (``serve.max_upload_bytes`` per file,
    ``serve.max_batch_images`` files on /predict_batch) is refused with 413 from its Content-Length, before any
    of it is read or stored; a body without one (chunked) is cut off as soon as it passes the limit."""

    def __init__(self, app, per_file: int, files_per_batch: int):
        self.app, self.per_file, self.files_per_batch = app, per_file, files_per_batch

    def limit(self, path: str) -> int:
        files = self.files_per_batch if path.rstrip("/").endswith("predict_batch") else 1
        return files * self.per_file + MULTIPART_MARGIN

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        limit = self.limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, f"request body: {int(declared)} bytes declared, the limit is {limit}")
        received, refused = 0, False

        async def counted():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not refused:
                    refused = True
                    await _refuse(send, f"request body: more than {limit} bytes, the limit")
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)


async def _refuse(send, message: str) -> None:
    body = json.dumps({"status": 413, "error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers + [(b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()
    data = data[0] if isinstance(data, list) and len(data) == 1 else data
    if isinstance(data, dict):
        detail = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', '')}"
            for d in data.get("detail", [])
            if isinstance(d, dict)
        )
        return str(data.get("error", data)) + (f" ({detail})" if detail else "")
    return str(data)


SETTINGS = ServeSettings.load(_params())


def building_a_bento() -> bool:
    """Whether this import is `bentoml build`'s (which packs the service: the token is the serving machine's)."""
    return sys.argv[1:2] == ["build"] and Path(sys.argv[0]).name in ("bentoml", "__main__.py")


if not building_a_bento():
    # at import, so that `bentoml serve` itself stops: a worker that fails in __init__ leaves the server up, unready
    feedback_store(SETTINGS, os.environ.get("VQFLOW_FEEDBACK_TOKEN", ""))


@bentoml.service(traffic={"timeout": 60, "max_concurrency": 64}, workers=1)
class AnomalyService:
    model = bentoml.models.BentoModel(served_tag())

    def __init__(self) -> None:
        self.ready = False
        self.tag = str(self.model.tag)
        self.feedback_token = os.environ.get("VQFLOW_FEEDBACK_TOKEN", "")
        self.feedback_store = feedback_store(SETTINGS, self.feedback_token)  # before the model loads: fail fast
        workers = SETTINGS.batch_workers
        threads = SETTINGS.torch_threads or max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        self.predictor = Predictor(self.model.path, SETTINGS.device, SETTINGS.max_pixels, SETTINGS.runtime, threads)
        self.predictor.warmup()
        self.batcher = MicroBatcher(self._score, SETTINGS.max_batch_size, SETTINGS.max_latency_ms, workers)
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    def _score(self, items: list[tuple[Image.Image, str | None]]):
        return self.predictor.predict([image for image, _ in items], [category for _, category in items])

    async def _decoded(self, paths: list[Path]) -> list[Image.Image]:
        """Check the uploads' sizes and decode them; errors name the uploaded file."""
        decoded = []
        for path in paths:
            name = upload_name(path)
            size = Path(path).stat().st_size
            if size > SETTINGS.max_upload_bytes:
                raise UploadTooLarge(f"{name}: {size} bytes exceeds the upload limit of {SETTINGS.max_upload_bytes}")
            try:
                decoded.append(await asyncio.to_thread(self.predictor.decode, Path(path).read_bytes(), name))
            except ImageLoadError as exc:
                raise InvalidArgument(str(exc)) from exc
        return decoded

    def _category(self, category: str | None) -> str | None:
        try:
            self.predictor.check_category(category)
        except UnknownCategoryError as exc:
            raise InvalidArgument(str(exc)) from exc
        return category

    @bentoml.api
    async def predict(self, image: ImageFile, category: str | None = None, with_map: bool = False) -> dict:
        """Score one image: {score, is_anomaly, threshold, threshold_source, concept, model_tag, latency_ms,
        defect_boxes[, anomaly_map_png]}. Without ``category`` the global (all categories) threshold applies."""
        category = self._category(category)
        (decoded,) = await self._decoded([image])
        (result,) = await self.batcher.submit([(decoded, category)])
        return result.to_json(self.tag, with_map)

    @bentoml.api
    async def predict_batch(self, images: list[ImageFile], category: str | None = None) -> list[dict]:
        """Score many images (one category, or the global threshold); they share batches with other requests."""
        if len(images) > SETTINGS.max_batch_images:
            raise InvalidArgument(
                f"images: {len(images)} files in one request, the limit is "
                f"{SETTINGS.max_batch_images} (split the request)"
            )
        category = self._category(category)
        decoded = await self._decoded(images)
        results = await self.batcher.submit([(image, category) for image in decoded])
        return [r.to_json(self.tag) for r in results]

    @bentoml.api
    async def feedback(
        self, image: ImageFile, category: str, label: str = "normal", ctx: bentoml.Context = None
    ) -> dict:
        """An operator's verdict on an image: ``normal`` (a false alarm: it goes to the retrain inbox) or
        ``defective`` (kept for review, never trained on). Needs ``Authorization: Bearer <VQFLOW_FEEDBACK_TOKEN>``
        when that is set. Answers what was stored: {label, category, location, sha256, duplicate, sidecar}."""
        if not token_matches(self.feedback_token, ctx.request.headers.get("authorization") if ctx else None):
            raise Unauthorized("feedback: missing or wrong token (send 'Authorization: Bearer <token>')")
        if self.feedback_store is None:
            raise FeedbackNotConfigured(
                "feedback: this service has no inbox (set VQFLOW_INBOX to a folder or s3:// prefix)"
            )
        category = self._category(category)
        if category is None:
            raise InvalidArgument("category: feedback needs the image's category")
        (decoded,) = await self._decoded([image])
        (result,) = await self.batcher.submit([(decoded, category)])
        data = Path(image).read_bytes()
        try:
            stored = await asyncio.to_thread(
                self.feedback_store.put,
                data,
                Image.open(io.BytesIO(data)).format,
                category,
                label,
                **result.decision(self.tag),
            )
        except FeedbackError as exc:
            raise InvalidArgument(str(exc)) from exc
        return stored.to_json()

    @bentoml.api
    async def render(self, image: ImageFile, category: str | None = None) -> Annotated[Path, ContentType("image/png")]:
        """The overlay image (input + heat map + contour of the predicted defect mask) as PNG."""
        category = self._category(category)
        (decoded,) = await self._decoded([image])
        (result,) = await self.batcher.submit([(decoded, category)])
        png = await asyncio.to_thread(render_overlay, decoded, result, self.predictor.spec.image_size)
        return Response(png, media_type="image/png")


AnomalyService.add_asgi_middleware(UniformErrors)
AnomalyService.add_asgi_middleware(
    BodyLimit, per_file=SETTINGS.max_upload_bytes, files_per_batch=SETTINGS.max_batch_images
)
