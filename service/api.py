"""The predict-and-explain service: `bentoml serve service.api:Protoserve`.

One BentoML service, two workers, each with its own ONNX Runtime sessions (GPU when a session
really gets one). /predict has adaptive batching: the public API checks and converts the images,
then awaits the batcher (service/batching.py), which merges the images of concurrent requests into
one session run (small calls on the event loop, many-image calls through BentoML's batching
dispatcher); the answer keeps the public shape of ARCHITECTURE.md.
/explain runs its one image directly: there is nothing to batch. The request gate (service/middleware.py)
answers both routes through the same handlers the APIs call (answer_predict, answer_explain), with the
request it has already parsed, instead of handing the body on to BentoML's routing and validation,
which would parse the body again to call the same handler.

A worker serves one version at a time (service/served_version.py): a fixed bundle, or with a registry
(PROTOSERVE_REGISTRY) the registry's active version, followed without a restart; every answer names
the version that computed it. With a registry the review API and page are mounted at /review
(service/review.py), and a shadow version may be compared with the served one on a sample of /predict
requests (service/shadow.py). The Open Inference Protocol v2 routes (/v2/..., service/open_inference.py) answer
from the same version through /predict's batcher.
"""

import gc
import logging
import os
import time
from typing import Any

import bentoml
import numpy as np
from starlette.responses import JSONResponse

from bundle.manifest import read_bundle
from inference.domain import domain_rule, parse_flag
from inference.explain import predictions
from inference.explanation import PrototypePictures, explanation, judge_answer
from inference.model import load_model
from inference.preprocess import DEFAULT_LIMITS, parse_top_k, to_batch, to_input
from protoserve.blas import one_blas_thread
from protoserve.errors import InputError
from protoserve.settings import settings
from registry.versions import registry_location
from service.batching import AdaptiveBatcher, Overloaded
from service.metrics import count_out_of_domain, count_rejection, metrics, observer, record_answers
from service.middleware import DEFAULT_MAX_BODY_BYTES, RequestGate, ServiceHandle
from service.open_inference import API as INFER_API
from service.open_inference import PREFIX as OPEN_INFERENCE_PREFIX
from service.open_inference import OpenInference
from service.openapi import OVERLOADED, api_document
from service.responses import JSONAnswer, raw_headers
from service.score_task import MAX_TASK_IMAGES, ScoreGate, score_images
from service.served_version import ActiveVersionFollower, ServedVersion, initial_location, served_version
from service.shadow import Shadow

log = logging.getLogger("protoserve.service")
log.setLevel(logging.INFO)  # BentoML's server logging keeps only warnings from loggers not its own

# Read when `bentoml serve` imports this module: the service's shape (workers, logging, tracing) is fixed then.
SETTINGS = settings()
# Adaptive batching: batches of up to the per-request image limit by default. BentoML's dispatcher
# decides how long to wait for a batch to fill from its own latency model; max_latency_ms is the cap
# past which it answers 503, so it is set well above what a loaded machine needs rather than as a
# wait time.
MAX_BATCH_SIZE = SETTINGS.max_batch_size or DEFAULT_LIMITS.max_batch
# /predict calls of up to SETTINGS.inline_max_size images are merged with the others that arrive in the
# same turns of the event loop and run on the loop (service/batching.py): a few small images take less
# time than a hand-off to a thread. Larger calls go through BentoML's adaptive batching, in a thread.

# BentoML's per-request work that this service does not need by default: the access log (a formatted
# log line per request) and OpenTelemetry spans on the image routes (sampled at rate 0 unless tracing
# is configured, but still built per request). PROTOSERVE_ACCESS_LOG=1 and PROTOSERVE_TRACE_IMAGE_ROUTES=1
# turn them back on.
UNTRACED = [] if SETTINGS.trace_image_routes else ["/predict", "/explain"]
SERVICE_NAME = "protoserve"
# The header BentoML puts on its API answers, on the answers the request gate gives itself too.
SERVER_HEADER = {"server": f"BentoML Service/{SERVICE_NAME}"}
UNEXPECTED = "An unexpected error has occurred, please check the server log."  # BentoML's 500 body
# How the request gate reaches this worker's Protoserve instance, which registers itself when built.
SERVICE_HANDLE = ServiceHandle()

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


@bentoml.service(name=SERVICE_NAME, workers=SETTINGS.workers, resources={"gpu": 1}, traffic={"timeout": 60},
                 logging={"access": {"enabled": SETTINGS.access_log}}, tracing={"excluded_urls": UNTRACED})
class Protoserve:
    """Predict and explain with a prototype network; every answer names the model and its version."""

    def __init__(self) -> None:
        # Each worker verifies the bundle (checksums, golden probe), opens its sessions and warms them up.
        path, generation, self.registry = initial_location()
        one_blas_thread()  # concurrency comes from workers and the batcher; BLAS threads would only spin
        self.worker_header = {"x-protoserve-worker": str(os.getpid())}
        self.abstain = settings().abstain  # PROTOSERVE_ABSTAIN: the requests' default
        self.current = self._prepare(served_version(load_model(path), generation))
        self.follower = None
        self.shadow: Shadow | None = None  # registry mode: a version compared on sampled /predict traffic
        SERVICE_HANDLE.register(self)  # the request gate reaches this instance from here on

    def _prepare(self, v: ServedVersion) -> ServedVersion:
        """Give a loaded version its batcher, answer headers, out-of-domain rule and metric series (before
        it takes any request)."""
        # Adaptive batching (service/batching.py): concurrent requests share one session run. /predict's
        # batcher counts the answers of each run at once (service/metrics.py); score_batch has its own, which
        # counts scored images instead (service/score_task.py).
        observe_batch = observer(metrics().batch_size, *v.model_id)
        latency = SETTINGS.max_latency_ms
        v.classify = AdaptiveBatcher(lambda images: self._classify(v, images), MAX_BATCH_SIZE, latency,
                                     observe_batch, coalesce_max_size=SETTINGS.inline_max_size)
        v.score = AdaptiveBatcher(lambda images: self._outputs(v, images), MAX_BATCH_SIZE, latency, observe_batch)
        v.headers = {**SERVER_HEADER, **self.worker_header, "x-model-version": v.version}
        v.raw_headers = raw_headers(v.headers)
        v.domain = domain_rule(v.manifest, v.active)  # None: the bundle has no calibration
        # The explanation-quality report's per-prototype figures (None each when the bundle has no report).
        quality = v.manifest.quality
        v.prototype_quality = {p.id: p.figures for p in quality.prototypes} if quality else {}
        m = metrics()  # built now, in the worker, so a scrape lists them from the start
        m.model_info.labels(*v.model_id, v.manifest.family, v.model.provider).set(1)
        for level, value in v.model.reference_distance.items():
            m.reference_nearest_distance.labels(*v.model_id, level).set(value)
        if v.domain is not None:
            m.out_of_domain_expected.labels(*v.model_id).set(v.domain.calibration.false_alarm_rate)
            for api in ("predict", "explain", "score_batch", INFER_API):  # zero series, so rates exist from the start
                m.out_of_domain.labels(*v.model_id, api)
        return v

    def _switch(self, new: ServedVersion) -> None:
        """Serve `new` from the next request on; requests in flight finish on the version they took."""
        old, self.current = self.current, self._prepare(new)
        gc.unfreeze()  # the startup's objects, the version being replaced among them, are collectable again
        if old.model_id != new.model_id:
            # A multiprocess gauge keeps a removed series in the worker's file: 0 says "not served here".
            # The old version's drift reference stays: it is a fact about that version, and its
            # histograms age out of the alert's window on their own.
            metrics().model_info.labels(*old.model_id, old.manifest.family, old.model.provider).set(0)

    @bentoml.on_startup
    async def follow_registry(self) -> None:
        """In registry mode, poll the registry and switch to the active version when it changes. Then
        freeze what the worker built at startup out of the garbage collector's reach: a full collection
        would walk every object of BentoML, numpy and the model again and again, every request of the
        worker waiting; the first version switch unfreezes them."""
        gc.collect()
        gc.freeze()  # before the follower starts: its first switch unfreezes
        if self.registry is not None:
            self.follower = ActiveVersionFollower(self.registry, self.current.generation, self.current.version,
                                                  self._switch)
            self.follower.start()
            self.shadow = Shadow(self.registry)
            self.shadow.start()

    def __is_ready__(self) -> bool:
        """BentoML builds the instance (load, verify, warm-up) before it serves: ready once it exists."""
        return self.current.model.reference_distance != {}

    def describe(self) -> dict:
        """Which version this worker serves (for /readyz and /metadata)."""
        v = self.current
        held = {"worker": os.getpid(), "model": v.ref(), "generation": v.generation}
        if self.follower is not None and self.follower.failed:
            held["not_loaded"] = list(self.follower.failed.values())[-3:]
        return held

    async def answer_route(self, route: str, request: dict) -> JSONResponse:
        """Answer an image route for the request gate (service/middleware.py): the same handler the BentoML API
        calls, given the fields of the parsed request the API declares (BentoML ignores any other), an
        unexpected error answered as BentoML answers it."""
        name = route.lstrip("/")
        try:
            return await getattr(self, f"answer_{name}")(**{k: request[k] for k in _API_FIELDS[name] if k in request})
        except Exception:
            log.exception("Exception on %s [POST]", route)
            return JSONResponse({"error": UNEXPECTED}, 500, SERVER_HEADER)

    def _classify(self, v: ServedVersion, images: np.ndarray) -> np.ndarray:
        """/predict's session run: [N, C, H, W] model input -> [N, K + M + 2]: the probabilities, the distances
        to the prototypes, then the out-of-domain judgement (in_domain as 1/0, typicality; NaN without
        calibration), the answers counted in the metrics. Both are per image and vectorised, so the images of
        a merged batch are judged and counted at once, not request by request."""
        probabilities, distances, *features = v.model.classify(images.astype(np.float32, copy=False), v.features)
        labels, _, nearest = self._record_answers(v, probabilities, distances)
        K, M = probabilities.shape[1], distances.shape[1]
        output = np.empty((len(images), K + M + 2))  # filled column by column: fewer numpy calls than stacking
        output[:, :K], output[:, K:K + M] = probabilities, distances
        if v.domain is None:
            output[:, K + M:] = np.nan
        else:
            output[:, K + M], output[:, K + M + 1] = v.domain.judge(
                distances, labels, features[0] if features else None, nearest, v.domain.flat(images))
        return output

    @staticmethod
    def _outputs(v: ServedVersion, images: np.ndarray) -> np.ndarray:
        """score_batch's session run: [N, C, H, W] model input -> [N, K + M (+ D)]: the probabilities, the
        distances to the prototypes (and the features the out-of-domain rule reads)."""
        return np.concatenate(v.model.classify(images.astype(np.float32, copy=False), v.features), axis=1)

    # The APIs return their JSON as a ready JSONResponse: BentoML passes a Response through, where for
    # a dict it rebuilds the return type's JSON schema on every response. The
    # request and answer shapes are documented by service/openapi.py. The image routes set their status
    # and headers on that response and take no bentoml.Context: BentoML copies a context's status,
    # headers and cookies onto every response of an API that has one.

    @bentoml.api(route="/predict")
    async def predict(self, images: Any = None, abstain: Any = None, canonicalize: Any = None) -> dict:
        """Classify a batch: {"images": [IMAGE, ...], "abstain": false, "canonicalize": false} -> one
        prediction per image, in order, each with in_domain and typicality."""
        return await self.answer_predict(images, abstain, canonicalize)

    async def answer_predict(self, images: Any = None, abstain: Any = None, canonicalize: Any = None) -> JSONResponse:
        """/predict's answer (the API above and the request gate's fast path both call this)."""
        started, v = time.perf_counter(), self.current
        try:
            abstain = parse_flag(abstain, "abstain", self.abstain)
            batch = to_batch(images, v.manifest.input, canonical=parse_flag(canonicalize, "canonicalize", False))
        except InputError as e:
            return self._answer(v, self._refuse(e, v), e.status)
        K = len(v.manifest.class_names)
        try:
            output = await v.classify(batch)
        except Overloaded as e:
            return self._answer(v, {"error": str(e), "reason": OVERLOADED, "model": v.ref()}, 503)
        probabilities, distances, judged = output[:, :K], output[:, K:-2], output[:, -2:]
        observer(metrics().inference_seconds, *v.model_id, "predict")(time.perf_counter() - started)
        answers = self._judge(v, predictions(probabilities, v.manifest.class_names), distances, "predict", abstain,
                              judged=judged)
        answer = self._answer(v, {"model": v.ref(), "predictions": answers})
        if self.shadow is not None:  # after the answer is made: the shadow runs off the response path
            self.shadow.offer(v, batch, output)
        return answer

    @bentoml.api(route="/explain")
    async def explain(self, image: Any = None, top_k: Any = None, abstain: Any = None,
                      canonicalize: Any = None) -> dict:
        """Explain one image: {"image": IMAGE, "top_k": 3, "abstain": false, "canonicalize": false} -> the
        prediction (with in_domain and typicality) and the top_k nearest prototypes (nearest first) with
        their pictures; PrototypeDL adds the input's reconstruction."""
        return await self.answer_explain(image, top_k, abstain, canonicalize)

    async def answer_explain(self, image: Any = None, top_k: Any = None, abstain: Any = None,
                             canonicalize: Any = None) -> JSONResponse:
        """/explain's answer (the API above and the request gate's fast path both call this)."""
        started, v = time.perf_counter(), self.current
        try:
            if image is None:
                raise InputError("missing_field", 'body needs "image"')
            k = parse_top_k(top_k, int(v.active.sum()))
            abstain = parse_flag(abstain, "abstain", self.abstain)
            x = to_input(image, v.manifest.input, canonical=parse_flag(canonicalize, "canonicalize", False))
        except InputError as e:
            return self._answer(v, self._refuse(e, v), e.status)
        outputs = {name: value[0] for name, value in v.model.outputs(x[None]).items()}  # one image: no batching
        probabilities, distances = outputs["probabilities"][None], outputs["distances"][None]
        self._record_answers(v, probabilities, distances)
        observer(metrics().inference_seconds, *v.model_id, "explain")(time.perf_counter() - started)
        prediction = self._judge(v, predictions(probabilities, v.manifest.class_names), distances, "explain", abstain,
                                 outputs[v.features][None] if v.features else None, image=x[None])[0]
        answer = explanation(v.manifest, v.active, outputs, x, k, prediction,
                             PrototypePictures(v.pictures, v.source_pictures), v.ref())
        return self._answer(v, answer)

    @bentoml.api(route="/metadata")
    async def metadata(self) -> dict:
        """The model: name, version, family, classes, input spec, metrics, explanation quality, prototypes,
        provider, and its out-of-domain rule; `worker` says which process answered and which registry
        generation it holds."""
        v = self.current
        m = v.manifest
        return JSONResponse({"model": v.ref(), "family": m.family, "created_at": m.created_at.isoformat(),
                "class_names": m.class_names, "input": m.input.model_dump(mode="json"),
                "outputs": [t.model_dump(mode="json") for t in m.model.outputs],
                "metrics": m.metrics.model_dump(mode="json"), "prototypes": len(m.prototypes),
                "active_prototypes": int(v.active.sum()), "provider": v.model.provider, "worker": self.describe(),
                "source_commit": m.training.source_commit, "quality": quality_summary(m),
                "domain": self._domain_summary(v),
                "limits": {"max_images_per_request": DEFAULT_LIMITS.max_batch,
                           "max_body_bytes": DEFAULT_MAX_BODY_BYTES,
                           "max_image_side": DEFAULT_LIMITS.max_side}}, headers=v.headers)

    @bentoml.api(route="/prototypes")
    async def prototypes(self) -> dict:
        """The prototype catalogue: every prototype's table row, its picture (base64 PNG) and its
        explanation-quality figures."""
        v = self.current
        rows = [{"id": row.id, "class_identity": row.class_identity,
                 "class_name": v.manifest.class_names[row.class_identity], "weights": row.weights,
                 "status": row.status, "provenance": row.provenance, "image": v.pictures[row.id],
                 "quality": v.prototype_quality.get(row.id)}
                for row in v.manifest.prototypes]
        return JSONResponse({"model": v.ref(), "prototypes": rows}, headers=v.headers)

    @bentoml.task(route="/score_batch")
    async def score_batch(self, ctx: bentoml.Context, images: Any = None, top_k: Any = None,
                          abstain: Any = None) -> dict:
        """Batch scoring as an async task (service/score_task.py): POST /score_batch/submit {"images":
        [IMAGE, ...], "top_k": 3, "abstain": false} -> {"task_id"}; GET /score_batch/status and
        /score_batch/get?task_id= -> one row per image, as `protoserve score` writes them (a bad image is
        a row with an error; in_domain and typicality on each; "abstain" nulls out-of-domain labels)."""
        v = self.current
        try:
            abstain = parse_flag(abstain, "abstain", self.abstain)
            return await score_images(v.manifest, images, top_k, v.score, abstain)
        except InputError as e:
            ctx.response.status_code = e.status
            return self._refuse(e, v)

    def _judge(self, v: ServedVersion, answers: list[dict], distances: np.ndarray, api: str,
               abstain: bool, features: np.ndarray | None = None, judged: np.ndarray | None = None,
               image: np.ndarray | None = None) -> list[dict]:
        """Add in_domain and typicality to each prediction (null without calibration), count the
        out-of-domain ones, and turn them into abstentions when asked; `judged` is _classify's judgement
        of these images, else they are judged here (`features`: the output the rule reads besides the
        distances, v.features; `image`: their model input, for the flat-picture check)."""
        if v.domain is None:
            for answer in answers:
                answer.update(in_domain=None, typicality=None, abstained=False)
            return answers
        if judged is not None:
            in_domain, typicality = judged[:, 0] == 1.0, judged[:, 1]
        else:
            labels = np.fromiter((a["label"] for a in answers), dtype=np.int64, count=len(answers))
            in_domain, typicality = v.domain.judge(distances, labels, features if v.features else None,
                                                   flat=None if image is None else v.domain.flat(image))
        in_domain = in_domain.tolist()  # Python's bools: a few images are counted faster than by numpy
        count_out_of_domain(v.model_id, api, in_domain.count(False))
        for answer, inside, typical in zip(answers, in_domain, typicality.tolist(), strict=True):
            judge_answer(answer, inside, typical, v.domain.calibration, abstain)
        return answers

    def _domain_summary(self, v: ServedVersion) -> dict | None:
        """The out-of-domain rule as /metadata shows it (null: the bundle has no calibration)."""
        if v.domain is None:
            return None
        c, o = v.domain.calibration, v.domain.calibration.outliers
        outliers = None if o is None else {
            "set": o.set, "images": o.images, "flagged": o.flagged, "auroc": o.auroc, "fpr95": o.fpr95,
            "test_flagged": o.test_flagged, "trained_with_outlier_exposure": o.trained_with is not None}
        return {"score": c.score, "threshold": c.threshold, "false_alarm_rate": c.false_alarm_rate,
                "split": c.split, "images": c.images, "abstain_by_default": self.abstain, "outliers": outliers}

    @staticmethod
    def _answer(v: ServedVersion, body: dict, status: int = 200) -> JSONResponse:
        """An image route's answer, naming the worker that gave it (x-protoserve-worker: its pid) and the
        version that computed it (x-model-version)."""
        return JSONAnswer(body, status, v.raw_headers)

    @staticmethod
    def _refuse(error: InputError, v: ServedVersion) -> dict:
        """The refusal's body (the caller sets error.status), counted by reason."""
        count_rejection(error.reason)
        return {**error.body(), "model": v.ref()}

    @staticmethod
    def _record_answers(v: ServedVersion, probabilities: np.ndarray,
                        distances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Count the answers in the metrics; return what the out-of-domain judgement reads again: the predicted
        labels, the nearest active prototypes and their distances (nearest_distance's)."""
        # The nearest active prototype: the first smallest distance with masked ones out of reach (the
        # same index as nearest_prototypes_batch's stable order, in one pass).
        masked = np.where(v.active, distances, np.inf)
        nearest_index, nearest = masked.argmin(axis=1), masked.min(axis=1)
        labels = probabilities.argmax(axis=1)
        record_answers(v.model_id, v.manifest.class_names, v.prototype_ids, probabilities, nearest_index, nearest,
                       labels)
        return labels, nearest_index, nearest


def quality_summary(manifest) -> dict | None:
    """The bundle's explanation-quality report without its per-prototype rows (those are in /prototypes)."""
    if manifest.quality is None:
        return None
    return manifest.quality.model_dump(mode="json", exclude={"prototypes"})


if registry_location() is not None:  # the review API and page exist only where there is a registry to review
    from service.review import app as review_app  # FastAPI and the review models: only where they are served

    Protoserve = bentoml.asgi_app(review_app, path="/review")(Protoserve)

# A missing or damaged bundle must stop `bentoml serve` itself (which imports this module before it
# starts any worker), not leave workers that fail and get restarted forever.
_manifest = read_bundle(initial_location()[0]).manifest


def _document() -> dict:
    return api_document(Protoserve.openapi_spec.asdict(), _manifest, DEFAULT_LIMITS.max_batch, MAX_TASK_IMAGES,
                        fixed_version=registry_location() is None)


# The request gate answers the image routes itself (Protoserve.answer_route), except with tracing on for
# them: then BentoML's API layer answers, with its request id header.
_API_FIELDS = {name: tuple(Protoserve.apis[name].input_spec.model_fields) for name in ("predict", "explain")}
_MODEL_REF = {"name": _manifest.name, "version": _manifest.version}
Protoserve.add_asgi_middleware(RequestGate, max_body_bytes=DEFAULT_MAX_BODY_BYTES, model=_MODEL_REF, document=_document,
                               service=SERVICE_HANDLE, answer_images=not SETTINGS.trace_image_routes,
                               prefixed_apps={OPEN_INFERENCE_PREFIX: OpenInference(SERVICE_HANDLE, _MODEL_REF)})
Protoserve.add_asgi_middleware(ScoreGate, max_body_bytes=DEFAULT_MAX_BODY_BYTES)  # /score_batch submissions
for _api in ("predict", "explain"):  # the OpenAPI description of the image routes
    Protoserve.apis[_api].doc = f"{Protoserve.apis[_api].doc}\n\n{INPUT_DOC}"
