"""The predict-and-explain service: `bentoml serve service.service:Protoserve`.

Two BentoML services, so that /predict gets BentoML's adaptive batching and keeps its public shape:
  PrototypeModel   holds the ONNX Runtime sessions (GPU when a session really gets one); its
                   `classify` API is batchable: BentoML merges concurrent calls into one run.
  Protoserve       the public HTTP surface (ARCHITECTURE.md "Service surface"), two workers: checks
                   and converts inputs, calls PrototypeModel, shapes answers, counts metrics.
A batchable API must take and return one list (or array) split along the batch axis, which is not
the public {"model": ..., "predictions": [...]} shape; the public API is the thin wrapper around it.
"""

import base64
import logging
import os
import time
from typing import Any

import bentoml
import numpy as np

from export.bundle import read_bundle
from service.batch_http import ScoreGate, score_images
from service.errors import InputError
from service.explain import (
    active_mask,
    nearest_distance,
    nearest_prototypes,
    pixels_to_picture,
    png_base64,
    predictions,
    prototype_rows,
)
from service.metrics import count_rejection, metrics, record_answers
from service.middleware import DEFAULT_MAX_BODY_BYTES, RequestGate
from service.model import bundle_location, load_model
from service.preprocess import DEFAULT_LIMITS, denormalize, parse_top_k, to_batch, to_input

log = logging.getLogger("protoserve.service")

# Adaptive batching, chosen with benchmarks/serve.py (README "Serving speed"): batches of up to 64
# images (the per-request limit too). BentoML's dispatcher decides how long to wait for a batch to
# fill from its own latency model; max_latency_ms is the cap past which it answers 503, so it is
# set well above what a loaded 2-core machine needs rather than as a wait time.
MAX_BATCH_SIZE = DEFAULT_LIMITS.max_batch
MAX_LATENCY_MS = int(os.environ.get("PROTOSERVE_MAX_LATENCY_MS", "2000"))
WORKERS = int(os.environ.get("PROTOSERVE_WORKERS", "2"))

INPUT_DOC = """IMAGE is a base64 PNG/JPEG string (a data: URL is fine) or a nested numeric array.
Pictures are converted to the model's input spec (see /metadata "input"): to greyscale or RGB as
the model's channels say (transparent pixels become black), resized to its height x width
(bilinear), scaled to its value range, then normalised with its mean and std. Arrays must be
[H][W] (one channel) or [C][H][W] of exactly that size, values in the value range, no NaN or
infinity. The same route takes multipart/form-data uploads (file fields "images" or "image";
"top_k" as a form field). Bad input gets a 4xx JSON {"error", "reason"}."""


@bentoml.service(name="protoserve_model", resources={"gpu": 1}, workers=1, traffic={"timeout": 60})
class PrototypeModel:
    """The ONNX Runtime sessions of one bundle, verified and warmed up before the worker serves."""

    def __init__(self) -> None:
        self.model = load_model()
        manifest = self.model.bundle.manifest
        m = metrics()
        m.model_info.labels(manifest.name, manifest.version, manifest.family, self.model.provider).set(1)
        for q, value in self.model.reference_distance.items():
            m.reference_nearest_distance.labels(manifest.name, manifest.version, q).set(value)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: np.ndarray) -> np.ndarray:
        """[N, C, H, W] model input -> [N, K + M]: probabilities, then distances to the prototypes."""
        probabilities, distances = self.model.classify(images.astype(np.float32, copy=False))
        return np.concatenate([probabilities, distances], axis=1)

    @bentoml.api
    def explain_one(self, image: np.ndarray) -> dict:
        """[1, C, H, W] -> every output of model.onnx for that image, as lists."""
        outputs = self.model.outputs(image.astype(np.float32, copy=False))
        return {name: value[0].tolist() for name, value in outputs.items()}

    @bentoml.api
    def info(self) -> dict:
        manifest = self.model.bundle.manifest
        return {"name": manifest.name, "version": manifest.version, "provider": self.model.provider,
                "bundle": str(self.model.bundle.path), "reference_nearest_distance": self.model.reference_distance}


@bentoml.service(name="protoserve", workers=WORKERS, traffic={"timeout": 60})
class Protoserve:
    """Predict and explain with a prototype network; every answer names the model and its version."""

    model = bentoml.depends(PrototypeModel)

    def __init__(self) -> None:
        # The manifest only: PrototypeModel verifies the bundle and runs it.
        self.bundle = read_bundle(bundle_location())
        manifest = self.bundle.manifest
        self.manifest = manifest
        self.model_id = (manifest.name, manifest.version)
        self.active = active_mask(manifest)
        self.prototype_ids = [row.id for row in manifest.prototypes]
        self.pictures = {row.id: png_base64_file(self.bundle.file(row.image)) if row.image else None
                         for row in manifest.prototypes}
        self.provider: str | None = None
        metrics()  # build the metric objects now, in the worker, so a scrape lists them from the start

    async def __is_ready__(self) -> bool:
        """Ready once PrototypeModel answers (it loads, verifies and warms up before it does)."""
        return await self._provider() is not None

    async def _provider(self) -> str | None:
        """The provider PrototypeModel's session runs on; None while it is not up yet."""
        if self.provider is None:
            try:
                info = await self.model.to_async.info()
            except Exception as e:  # not up yet: BentoML's client raises several types while it starts
                log.info("protoserve: model service not ready yet (%r)", e)
                return None
            self.provider = info["provider"]
        return self.provider

    @bentoml.api(route="/predict")
    async def predict(self, ctx: bentoml.Context, images: Any = None) -> dict:
        """Classify a batch: {"images": [IMAGE, ...]} -> one prediction per image, in order."""
        started = time.perf_counter()
        ctx.response.headers["x-protoserve-worker"] = str(os.getpid())
        try:
            batch = to_batch(images, self.manifest.input)
        except InputError as e:
            return self._refuse(ctx, e)
        K = len(self.manifest.class_names)
        output = await self.model.to_async.classify(batch)
        probabilities, distances = output[:, :K], output[:, K:]
        self._record(probabilities, distances, "predict", started)
        return {"model": self._model_ref(), "predictions": predictions(probabilities, self.manifest.class_names)}

    @bentoml.api(route="/explain")
    async def explain(self, ctx: bentoml.Context, image: Any = None, top_k: Any = None) -> dict:
        """Explain one image: {"image": IMAGE, "top_k": 3} -> the prediction and the top_k nearest
        prototypes (nearest first) with their pictures; PrototypeDL adds the input's reconstruction."""
        started = time.perf_counter()
        ctx.response.headers["x-protoserve-worker"] = str(os.getpid())
        try:
            if image is None:
                raise InputError("missing_field", 'body needs "image"')
            k = parse_top_k(top_k, int(self.active.sum()))
            x = to_input(image, self.manifest.input)
        except InputError as e:
            return self._refuse(ctx, e)
        outputs = {name: np.asarray(value, dtype=np.float32)
                   for name, value in (await self.model.to_async.explain_one(x[None])).items()}
        probabilities, distances = outputs["probabilities"][None], outputs["distances"][None]
        self._record(probabilities, distances, "explain", started)
        prediction = predictions(probabilities, self.manifest.class_names)[0]
        rows = prototype_rows(self.manifest, distances[0], nearest_prototypes(distances[0], k, self.active),
                              prediction["label"])
        for row in rows:
            row["image"] = self.pictures[row["id"]]
        answer = {"model": self._model_ref(), "prediction": prediction, "prototypes": rows}
        if "reconstruction" in outputs:
            answer["reconstruction"] = png_base64(pixels_to_picture(denormalize(outputs["reconstruction"],
                                                                                self.manifest.input)))
        return answer

    @bentoml.api(route="/metadata")
    async def metadata(self) -> dict:
        """The model: name, version, family, classes, input spec, metrics, prototypes, provider."""
        m = self.manifest
        return {"model": self._model_ref(), "family": m.family, "created_at": m.created_at.isoformat(),
                "class_names": m.class_names, "input": m.input.model_dump(mode="json"),
                "outputs": [t.model_dump(mode="json") for t in m.model.outputs],
                "metrics": m.metrics.model_dump(mode="json"), "prototypes": len(m.prototypes),
                "active_prototypes": int(self.active.sum()), "provider": await self._provider(),
                "source_commit": m.training.source_commit,
                "limits": {"max_images_per_request": DEFAULT_LIMITS.max_batch,
                           "max_body_bytes": DEFAULT_MAX_BODY_BYTES,
                           "max_image_side": DEFAULT_LIMITS.max_side}}

    @bentoml.api(route="/prototypes")
    async def prototypes(self) -> dict:
        """The prototype catalogue: every prototype's table row and its picture (base64 PNG)."""
        rows = [{"id": row.id, "class_identity": row.class_identity,
                 "class_name": self.manifest.class_names[row.class_identity], "weights": row.weights,
                 "status": row.status, "provenance": row.provenance, "image": self.pictures[row.id]}
                for row in self.manifest.prototypes]
        return {"model": self._model_ref(), "prototypes": rows}

    @bentoml.task(route="/score_batch")
    async def score_batch(self, ctx: bentoml.Context, images: Any = None, top_k: Any = None) -> dict:
        """Batch scoring as an async task (service/batch_http.py): POST /score_batch/submit {"images":
        [IMAGE, ...], "top_k": 3} -> {"task_id"}; GET /score_batch/status and /score_batch/get?task_id=
        -> one row per image, as `protoserve score` writes them (a bad image is a row with an error)."""
        try:
            return await score_images(self.manifest, images, top_k, self.model.to_async.classify)
        except InputError as e:
            return self._refuse(ctx, e)

    def _model_ref(self) -> dict:
        return {"name": self.manifest.name, "version": self.manifest.version}

    def _refuse(self, ctx: bentoml.Context, error: InputError) -> dict:
        count_rejection(error.reason)
        ctx.response.status_code = error.status
        return error.body()

    def _record(self, probabilities: np.ndarray, distances: np.ndarray, api: str, started: float) -> None:
        nearest = np.array([nearest_prototypes(row, 1, self.active)[0] for row in distances])
        record_answers(self.model_id, self.manifest.class_names, self.prototype_ids, probabilities, nearest,
                       nearest_distance(distances, self.active))
        metrics().inference_seconds.labels(*self.model_id, api).observe(time.perf_counter() - started)


def png_base64_file(path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


# A missing or damaged bundle must stop `bentoml serve` itself (which imports this module before it
# starts any worker), not leave workers that fail and get restarted forever.
read_bundle(bundle_location())
Protoserve.add_asgi_middleware(RequestGate, max_body_bytes=DEFAULT_MAX_BODY_BYTES)
Protoserve.add_asgi_middleware(ScoreGate, max_body_bytes=DEFAULT_MAX_BODY_BYTES)  # /score_batch submissions
for _api in ("predict", "explain"):  # the OpenAPI description of the image routes
    Protoserve.apis[_api].doc = f"{Protoserve.apis[_api].doc}\n\n{INPUT_DOC}"
