"""The predict-and-explain service: `bentoml serve service.service:Protoserve`.

One BentoML service, two workers, each with its own ONNX Runtime sessions (GPU when a session
really gets one). /predict has adaptive batching: the public API checks and converts the images,
then awaits BentoML's batching dispatcher (service/batching.py), which merges the images of
concurrent requests into one session run; the answer keeps the public shape of ARCHITECTURE.md.
/explain runs its one image directly: there is nothing to batch.
"""

import asyncio
import base64
import logging
import os
import time
from typing import Any

import bentoml
import numpy as np
from starlette.responses import JSONResponse

from export.bundle import read_bundle
from inference.domain import abstain_default, abstention, domain_fields, domain_rule, parse_flag
from inference.explain import (
    heatmap_overlay,
    nearest_prototypes,
    pixels_to_picture,
    png_base64,
    predictions,
    prototype_rows,
)
from inference.model import bundle_location, load_model
from inference.preprocess import DEFAULT_LIMITS, denormalize, parse_top_k, to_batch, to_input
from protoserve.errors import InputError
from service.batching import AdaptiveBatcher, Overloaded
from service.metrics import count_out_of_domain, count_rejection, labelled, metrics, record_answers
from service.middleware import DEFAULT_MAX_BODY_BYTES, RequestGate
from service.openapi import OVERLOADED, api_document
from service.score_task import MAX_TASK_IMAGES, ScoreGate, score_images

log = logging.getLogger("protoserve.service")
log.setLevel(logging.INFO)  # BentoML's server logging keeps only warnings from loggers not its own

# Adaptive batching: batches of up to 64 images (the per-request limit too). BentoML's dispatcher
# decides how long to wait for a batch to fill from its own latency model; max_latency_ms is the cap
# past which it answers 503, so it is set well above what a loaded 2-core machine needs rather than
# as a wait time.
MAX_BATCH_SIZE = int(os.environ.get("PROTOSERVE_MAX_BATCH_SIZE", str(DEFAULT_LIMITS.max_batch)))
MAX_LATENCY_MS = int(os.environ.get("PROTOSERVE_MAX_LATENCY_MS", "2000"))
WORKERS = int(os.environ.get("PROTOSERVE_WORKERS", "2"))
# A /predict call of up to this many images, alone in its worker, runs on the event loop, not in a
# thread (service/batching.py): a few small images run in less time than a hand-off to a thread takes.
# With other requests in flight it goes to a thread through the batcher: the model runs outside the
# GIL while the loop reads the next requests, and those share the next session run. Run inline under
# load, calls would be answered one at a time with nothing to merge, a slower way to serve many.
INLINE_MAX_SIZE = int(os.environ.get("PROTOSERVE_INLINE_MAX_SIZE", "8"))

# BentoML's per-request work that this service does not need by default: the access log (a formatted
# log line per request) and OpenTelemetry spans on the image routes (sampled at rate 0 unless tracing
# is configured, but still built per request).
# PROTOSERVE_ACCESS_LOG=1 and PROTOSERVE_TRACE_IMAGE_ROUTES=1 turn them back on.
ACCESS_LOG = os.environ.get("PROTOSERVE_ACCESS_LOG", "0") == "1"
UNTRACED = [] if os.environ.get("PROTOSERVE_TRACE_IMAGE_ROUTES", "0") == "1" else ["/predict", "/explain"]

INPUT_DOC = """IMAGE is a base64 PNG/JPEG string (a data: URL is fine) or a nested numeric array
([H][W] for one-channel models, or [C][H][W], of exactly the model's size, values in its value
range; the schema below gives the sizes). Pictures are converted to the model's input spec (see
/metadata "input"): to greyscale or RGB as the model's channels say (transparent pixels become
black), resized to its height x width (bilinear), scaled to its value range, then normalised with
its mean and std. The same route takes multipart/form-data uploads (image files in "images", or
"image" for /explain; "top_k", "abstain" and "canonicalize" as form fields). Every refusal is a JSON
{"error", "reason", "model"}; a body that matches the schema can still get a 400 when an image's
bytes are not a decodable PNG/JPEG within the size limits (reason not_an_image, corrupt_image,
image_too_large or bad_base64).

Every prediction carries "in_domain" (is the input like the model's validation images, judged from
its distances to the prototypes against the threshold calibrated at export; null for a bundle
without calibration) and "typicality" (the share of validation images further from the prototypes:
1 typical, 0 beyond all of them), and "abstained". "abstain": true (default: the service setting
PROTOSERVE_ABSTAIN=1, else false) turns an out-of-domain prediction into an abstention: "label" and
"class_name" null, "abstained": true, "reason": "out_of_domain" and a "detail"; the probabilities
and (on /explain) the nearest prototypes are still given, their weight and contribution those of
the class the model would have named. "canonicalize": true first makes a picture the way the
training images were made (/metadata input.canonical: for MNIST, invert a light background, crop
to the ink, fit it into 20x20, centre it by mass in 28x28): for photographed or scanned digits;
a model without a canonical form refuses it (reason no_canonical_form)."""


@bentoml.service(name="protoserve", workers=WORKERS, resources={"gpu": 1}, traffic={"timeout": 60},
                 logging={"access": {"enabled": ACCESS_LOG}}, tracing={"excluded_urls": UNTRACED})
class Protoserve:
    """Predict and explain with a prototype network; every answer names the model and its version."""

    def __init__(self) -> None:
        # Each worker verifies the bundle (checksums, golden probe), opens its sessions and warms them up.
        self.model = load_model()
        manifest = self.model.bundle.manifest
        self.manifest = manifest
        self.model_id = (manifest.name, manifest.version)
        self.active = self.model.active
        self.prototype_ids = [row.id for row in manifest.prototypes]
        self.pictures = {row.id: png_base64_file(self.model.bundle.file(row.image)) if row.image else None
                         for row in manifest.prototypes}
        # ProtoPNet: each prototype's source image with its patch box (from the push provenance).
        self.source_pictures = {row.id: png_base64_file(self.model.bundle.file(row.provenance["source_image"]))
                                for row in manifest.prototypes if (row.provenance or {}).get("source_image")}
        self.provider = self.model.provider
        # The explanation-quality report's per-prototype figures (None each when the bundle has no report).
        self.prototype_quality = {p.id: p.figures for p in manifest.quality.prototypes} if manifest.quality else {}
        self.worker_header = {"x-protoserve-worker": str(os.getpid())}
        self.predicting = 0  # /predict requests in this worker past preprocessing, not yet answered
        self.domain = domain_rule(manifest, self.active)  # None: the bundle has no calibration
        self.abstain = abstain_default()
        # /predict's adaptive batching (service/batching.py): concurrent requests share one session run.
        self.classify = AdaptiveBatcher(self._classify, MAX_BATCH_SIZE, MAX_LATENCY_MS, self._count_batch)
        m = metrics()  # built now, in the worker, so a scrape lists them from the start
        m.model_info.labels(manifest.name, manifest.version, manifest.family, self.provider).set(1)
        for level, value in self.model.reference_distance.items():
            m.reference_nearest_distance.labels(manifest.name, manifest.version, level).set(value)
        if self.domain is not None:
            m.out_of_domain_expected.labels(*self.model_id).set(self.domain.calibration.false_alarm_rate)
            for api in ("predict", "explain", "score_batch"):  # zero series, so rates exist from the start
                m.out_of_domain.labels(*self.model_id, api)

    def __is_ready__(self) -> bool:
        """BentoML builds the instance (load, verify, warm-up) before it serves: ready once it exists."""
        return self.model.reference_distance != {}

    def _classify(self, images: np.ndarray) -> np.ndarray:
        """[N, C, H, W] model input -> [N, K + M]: the probabilities, then the distances to the prototypes."""
        probabilities, distances = self.model.classify(images.astype(np.float32, copy=False))
        return np.concatenate([probabilities, distances], axis=1)

    # The APIs return their JSON as a ready JSONResponse: BentoML passes a Response through, where for
    # a dict it rebuilds the return type's JSON schema on every response (README "Serving speed"). The
    # request and answer shapes are documented by service/openapi.py. The image routes set their status
    # and headers on that response and take no bentoml.Context: BentoML copies a context's status,
    # headers and cookies onto every response of an API that has one.

    @bentoml.api(route="/predict")
    async def predict(self, images: Any = None, abstain: Any = None, canonicalize: Any = None) -> dict:
        """Classify a batch: {"images": [IMAGE, ...], "abstain": false, "canonicalize": false} -> one
        prediction per image, in order, each with in_domain and typicality."""
        started = time.perf_counter()
        try:
            abstain = parse_flag(abstain, "abstain", self.abstain)
            batch = to_batch(images, self.manifest.input, canonical=parse_flag(canonicalize, "canonicalize", False))
        except InputError as e:
            return self._answer(self._refuse(e), e.status)
        K = len(self.manifest.class_names)
        self.predicting += 1
        try:
            # Requests that arrived with this one are tasks not yet started: one turn of the event loop
            # brings them here, so `predicting` counts them and this call runs inline only when alone.
            await asyncio.sleep(0)
            output = await self.classify(batch, inline=self.predicting == 1 and len(batch) <= INLINE_MAX_SIZE)
        except Overloaded as e:
            return self._answer({"error": str(e), "reason": OVERLOADED, "model": self._model_ref()}, 503)
        finally:
            self.predicting -= 1
        probabilities, distances = output[:, :K], output[:, K:]
        self._record(probabilities, distances, "predict", started)
        answers = self._judge(predictions(probabilities, self.manifest.class_names), distances, "predict", abstain)
        return self._answer({"model": self._model_ref(), "predictions": answers})

    @bentoml.api(route="/explain")
    async def explain(self, image: Any = None, top_k: Any = None, abstain: Any = None,
                      canonicalize: Any = None) -> dict:
        """Explain one image: {"image": IMAGE, "top_k": 3, "abstain": false, "canonicalize": false} -> the
        prediction (with in_domain and typicality) and the top_k nearest prototypes (nearest first) with
        their pictures; PrototypeDL adds the input's reconstruction."""
        started = time.perf_counter()
        try:
            if image is None:
                raise InputError("missing_field", 'body needs "image"')
            k = parse_top_k(top_k, int(self.active.sum()))
            abstain = parse_flag(abstain, "abstain", self.abstain)
            x = to_input(image, self.manifest.input, canonical=parse_flag(canonicalize, "canonicalize", False))
        except InputError as e:
            return self._answer(self._refuse(e), e.status)
        outputs = {name: value[0] for name, value in self.model.outputs(x[None]).items()}  # one image: no batching
        probabilities, distances = outputs["probabilities"][None], outputs["distances"][None]
        self._record(probabilities, distances, "explain", started)
        prediction = predictions(probabilities, self.manifest.class_names)[0]
        nearest = nearest_prototypes(distances[0], k, self.active)
        rows = prototype_rows(self.manifest, distances[0], nearest, prediction["label"])
        prediction = self._judge([prediction], distances, "explain", abstain)[0]
        for row in rows:
            row["image"] = self.pictures[row["id"]]
        answer = {"model": self._model_ref(), "prediction": prediction, "prototypes": rows}
        if "similarity_maps" in outputs:  # ProtoPNet: where in the input each prototype was found
            pixels = denormalize(x, self.manifest.input)
            for row, j in zip(rows, nearest, strict=True):
                row["heatmap"] = png_base64(heatmap_overlay(outputs["similarity_maps"][j], pixels))
                row["source_image"] = self.source_pictures.get(row["id"])
        if "reconstruction" in outputs:
            answer["reconstruction"] = png_base64(pixels_to_picture(denormalize(outputs["reconstruction"],
                                                                                self.manifest.input)))
        return self._answer(answer)

    @bentoml.api(route="/metadata")
    async def metadata(self) -> dict:
        """The model: name, version, family, classes, input spec, metrics, explanation quality, prototypes,
        provider, and its out-of-domain rule."""
        m = self.manifest
        return JSONResponse({"model": self._model_ref(), "family": m.family, "created_at": m.created_at.isoformat(),
                "class_names": m.class_names, "input": m.input.model_dump(mode="json"),
                "outputs": [t.model_dump(mode="json") for t in m.model.outputs],
                "metrics": m.metrics.model_dump(mode="json"), "prototypes": len(m.prototypes),
                "active_prototypes": int(self.active.sum()), "provider": self.provider,
                "source_commit": m.training.source_commit, "quality": quality_summary(m),
                "domain": self._domain_summary(),
                "limits": {"max_images_per_request": DEFAULT_LIMITS.max_batch,
                           "max_body_bytes": DEFAULT_MAX_BODY_BYTES,
                           "max_image_side": DEFAULT_LIMITS.max_side}})

    @bentoml.api(route="/prototypes")
    async def prototypes(self) -> dict:
        """The prototype catalogue: every prototype's table row, its picture (base64 PNG) and its
        explanation-quality figures."""
        rows = [{"id": row.id, "class_identity": row.class_identity,
                 "class_name": self.manifest.class_names[row.class_identity], "weights": row.weights,
                 "status": row.status, "provenance": row.provenance, "image": self.pictures[row.id],
                 "quality": self.prototype_quality.get(row.id)}
                for row in self.manifest.prototypes]
        return JSONResponse({"model": self._model_ref(), "prototypes": rows})

    @bentoml.task(route="/score_batch")
    async def score_batch(self, ctx: bentoml.Context, images: Any = None, top_k: Any = None,
                          abstain: Any = None) -> dict:
        """Batch scoring as an async task (service/score_task.py): POST /score_batch/submit {"images":
        [IMAGE, ...], "top_k": 3, "abstain": false} -> {"task_id"}; GET /score_batch/status and
        /score_batch/get?task_id= -> one row per image, as `protoserve score` writes them (a bad image is
        a row with an error; in_domain and typicality on each; "abstain" nulls out-of-domain labels)."""
        try:
            abstain = parse_flag(abstain, "abstain", self.abstain)
            return await score_images(self.manifest, images, top_k, self.classify, abstain)
        except InputError as e:
            ctx.response.status_code = e.status
            return self._refuse(e)

    def _judge(self, answers: list[dict], distances: np.ndarray, api: str, abstain: bool) -> list[dict]:
        """Add in_domain and typicality to each prediction (null without calibration), count the
        out-of-domain ones, and turn them into abstentions when asked."""
        if self.domain is None:
            for answer in answers:
                answer.update(in_domain=None, typicality=None, abstained=False)
            return answers
        labels = np.fromiter((a["label"] for a in answers), dtype=np.int64, count=len(answers))
        in_domain, typicality = self.domain.judge(distances, labels)
        count_out_of_domain(self.model_id, api, int(len(answers) - in_domain.sum()))
        for i, answer in enumerate(answers):
            answer.update(domain_fields(in_domain, typicality, i), abstained=False)
            if abstain and not in_domain[i]:
                abstention(answer, self.domain.calibration)
        return answers

    def _domain_summary(self) -> dict | None:
        """The out-of-domain rule as /metadata shows it (null: the bundle has no calibration)."""
        if self.domain is None:
            return None
        c = self.domain.calibration
        return {"score": c.score, "threshold": c.threshold, "false_alarm_rate": c.false_alarm_rate,
                "split": c.split, "images": c.images, "abstain_by_default": self.abstain}

    def _count_batch(self, size: int) -> None:
        labelled(metrics().batch_size, *self.model_id).observe(size)

    def _model_ref(self) -> dict:
        return {"name": self.manifest.name, "version": self.manifest.version}

    def _answer(self, body: dict, status: int = 200) -> JSONResponse:
        """An image route's answer, naming the worker that gave it (x-protoserve-worker: its pid)."""
        return JSONResponse(body, status, self.worker_header)

    def _refuse(self, error: InputError) -> dict:
        """The refusal's body (the caller sets error.status), counted by reason."""
        count_rejection(error.reason)
        return {**error.body(), "model": self._model_ref()}

    def _record(self, probabilities: np.ndarray, distances: np.ndarray, api: str, started: float) -> None:
        # The nearest active prototype: the first smallest distance with masked ones out of reach (the
        # same index as nearest_prototypes_batch's stable order, in one pass).
        masked = np.where(self.active, distances, np.inf)
        nearest = masked.argmin(axis=1)
        record_answers(self.model_id, self.manifest.class_names, self.prototype_ids, probabilities, nearest,
                       masked[np.arange(len(masked)), nearest])
        labelled(metrics().inference_seconds, *self.model_id, api).observe(time.perf_counter() - started)


def quality_summary(manifest) -> dict | None:
    """The bundle's explanation-quality report without its per-prototype rows (those are in /prototypes)."""
    if manifest.quality is None:
        return None
    return manifest.quality.model_dump(mode="json", exclude={"prototypes"})


def png_base64_file(path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


# A missing or damaged bundle must stop `bentoml serve` itself (which imports this module before it
# starts any worker), not leave workers that fail and get restarted forever.
_manifest = read_bundle(bundle_location()).manifest


def _document() -> dict:
    return api_document(Protoserve.openapi_spec.asdict(), _manifest, DEFAULT_LIMITS.max_batch, MAX_TASK_IMAGES)


Protoserve.add_asgi_middleware(RequestGate, max_body_bytes=DEFAULT_MAX_BODY_BYTES,
                               model={"name": _manifest.name, "version": _manifest.version}, document=_document)
Protoserve.add_asgi_middleware(ScoreGate, max_body_bytes=DEFAULT_MAX_BODY_BYTES)  # /score_batch submissions
for _api in ("predict", "explain"):  # the OpenAPI description of the image routes
    Protoserve.apis[_api].doc = f"{Protoserve.apis[_api].doc}\n\n{INPUT_DOC}"
