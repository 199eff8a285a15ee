"""The review API under /review: read a version's prototypes and verdicts; record verdicts, start
revisions, promote and roll back (those need the admin key: service/auth.py).

A FastAPI app mounted on the BentoML service, so its routes, request bodies and answers appear in
the service's OpenAPI document. It reads and writes the registry (registry/), never the model a
worker is serving: any worker answers for any version. Without PROTOSERVE_REGISTRY every route
answers 409 naming the setting. Errors are JSON {"error", "reason"} like the rest of the service.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from bundle.families import family
from bundle.manifest import Bundle, read_bundle
from protoserve.settings import settings
from registry.revision_settings import RevisionSettings
from registry.store import RegistryError, RegistryUnavailable
from registry.verdicts import VerdictError, verdict
from registry.versions import ENV as REGISTRY_ENV
from registry.versions import Registry, registry_location
from service.auth import AuthError, require_admin
from service.metrics import shadow_figures

# The service's /docs.json documents these routes; the app's own document and docs pages are not served.
app = FastAPI(title="protoserve review", version="1", docs_url=None, redoc_url=None, openapi_url=None)
PAGE = Path(__file__).with_name("review_page.html")


class MethodGate:
    """A method a path does not take is a 405 whose Allow lists every method it does take (Starlette's
    own 405 names only the first route that matched the path)."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            allowed: set[str] = set()
            for route in app.router.routes:
                match, _ = route.matches(scope)
                if match is Match.FULL:
                    return await self.inner(scope, receive, _naming_the_worker(send))
                if match is Match.PARTIAL:
                    allowed |= set(getattr(route, "methods", None) or ()) - {"HEAD"}
            if allowed:
                response = PlainTextResponse("Method Not Allowed", 405, headers={"Allow": ", ".join(sorted(allowed))})
                return await response(scope, receive, send)
        return await self.inner(scope, receive, send)


def _naming_the_worker(send):
    """Every review answer says which worker process gave it (x-protoserve-worker), as /predict's do."""
    worker = str(os.getpid()).encode()

    async def named(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"x-protoserve-worker", worker)]}
        await send(message)

    return named


app.add_middleware(MethodGate)


class ReviewError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@app.exception_handler(ReviewError)
@app.exception_handler(AuthError)
async def _refuse(request: Request, e: ReviewError | AuthError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse({"error": e.message, "reason": e.reason}, status_code=e.status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_refusal(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (a body that is not JSON) in the service's error shape."""
    reason = "invalid_json" if e.status_code == 400 else "http_error"
    return JSONResponse({"error": str(e.detail), "reason": reason}, status_code=e.status_code, headers=e.headers)


@app.exception_handler(RegistryError)
async def _registry_refusal(request: Request, e: RegistryError) -> JSONResponse:
    if isinstance(e, RegistryUnavailable):  # the database is down or unusable: try again later, not a conflict
        return JSONResponse({"error": str(e), "reason": "registry_unavailable"}, status_code=503)
    missing = "not registered" in str(e) or "does not exist" in str(e)
    return JSONResponse({"error": str(e), "reason": "not_found" if missing else "conflict"},
                        status_code=404 if missing else 409)


@functools.cache
def _registry(root: str, db: str | None) -> Registry:
    return Registry(root, db)


def registry() -> Registry:
    root = registry_location()
    if root is None:
        raise ReviewError(409, "no_registry", f"the service serves a fixed bundle; set {REGISTRY_ENV} to review "
                          "and revise model versions")
    return _registry(str(root), settings().registry_db)


@functools.lru_cache(maxsize=16)
def _bundle(path: Path) -> Bundle:
    return read_bundle(path)  # versions are immutable: read (and checksum) once per process


def version_or_active(reg: Registry, version: str | None) -> str:
    version = version or reg.store.active().version
    if version is None:
        raise ReviewError(409, "no_active_version", "no version is active yet")
    reg.store.version(version)  # 404 when unknown
    return version


class Refusal(BaseModel):
    error: str
    reason: str


READ_ERRORS = {404: {"model": Refusal, "description": "no such version, verdict, job or picture"},
               409: {"model": Refusal, "description": "no registry configured, or no active version"},
               503: {"model": Refusal, "description": "the registry's database cannot be reached (reason "
                     "registry_unavailable): try again later"}}
CHANGE_ERRORS = {**READ_ERRORS,
                 400: {"model": Refusal, "description": "a prototype id the version does not have, or a revision "
                       "option its family cannot take"},
                 401: {"model": Refusal, "description": "missing or wrong admin key: nothing changed"},
                 403: {"model": Refusal, "description": "no admin key configured: changing routes are closed"}}

READING = {"responses": READ_ERRORS}
CHANGING = {"responses": CHANGE_ERRORS, "dependencies": [Depends(require_admin)]}


# -- request bodies ----------------------------------------------------------------------------
class VerdictIn(BaseModel):
    """One verdict on one prototype of a version (the format of registry/verdicts.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no false for 0, no "1" for 1
    version: str | None = Field(None, description="the version judged (default: the active one)")
    prototype_id: int = Field(ge=0, description="the prototype's stable id")
    verdict: Literal["reject", "accept", "unsure"]
    source: str = Field(min_length=1, max_length=200, description="who judged: a name, or simulated:<rule>")
    round: int = Field(1, ge=0, le=1000)
    note: str | None = Field(None, max_length=2000)


class JobIn(RevisionSettings):
    """A revision of a version from its checkpoint, using its open verdicts: the revision's settings
    (registry/revision_settings.py) and the version to revise."""

    parent: str | None = Field(None, description="the version to revise (default: the active one)")


class ShadowIn(BaseModel):
    """A version to run beside the active one on a share of the live /predict requests."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: str
    sample: float = Field(0.1, ge=0.001, le=1, description="the share of /predict requests the shadow also answers "
                          "(OpenAPI 3.0 has no exclusiveMinimum number: 0.1% is the least)")


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no false for 0, no "1" for 1
    version: str


# -- read-only ---------------------------------------------------------------------------------
@app.get("/", response_class=HTMLResponse, summary="The review page")
def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


def min_train_subset(bundle: Bundle) -> int:
    """The fewest training images a revision of the bundle can take: a family whose prototypes are pushed
    needs an image of each class they stand for (the worker checks which classes the images hold)."""
    m = bundle.manifest
    return len({row.class_identity for row in m.prototypes}) if family(m.family).pushed else 1


@app.get("/api/versions", **READING, summary="The versions, the active and previous one, the generation")
def versions() -> dict:
    reg = registry()
    active = reg.store.active()
    open_counts = reg.store.open_verdict_counts()
    return {"active": active.version, "previous": active.previous, "generation": active.generation,
            "versions": [{**r.public(), "open_verdicts": open_counts.get(r.version, 0)} for r in reg.store.versions()],
            "changes": reg.store.changes()[-20:]}


@app.get("/api/versions/{version}/prototypes", **READING, summary="A version's prototypes with pictures and verdicts")
def prototypes(version: str) -> dict:
    """Each prototype: class, weight, status, its pictures (URLs), the training patch it was pushed onto
    (ProtoPNet provenance), its nearest training images (when computed: revision/neighbours.py), its
    explanation-quality figures (when the bundle has the report), its latest verdict and how many it has."""
    reg = registry()
    version = version_or_active(reg, None if version == "active" else version)
    bundle = _bundle(reg.bundle_path(version))
    m = bundle.manifest
    given: dict[int, list[dict]] = {}
    for v in reg.store.verdicts(version):
        given.setdefault(v["prototype_id"], []).append(v)
    base = f"/review/api/versions/{version}/files/"
    neighbours = (reg.neighbours(version) or {}).get("nearest", {})
    quality = {p.id: p.figures for p in m.quality.prototypes} if getattr(m, "quality", None) else {}
    rows = []
    for row in m.prototypes:
        provenance = row.provenance or {}
        pictures = {"prototype": row.image, "source": provenance.get("source_image"),
                    "activation": provenance.get("activation_image")}
        history = given.get(row.id, [])
        rows.append({"id": row.id, "class_identity": row.class_identity,
                     "class_name": m.class_names[row.class_identity], "weight": row.weights[row.class_identity],
                     "status": row.status, "pictures": {k: base + p for k, p in pictures.items() if p},
                     "nearest_training_patch": {k: provenance[k] for k in ("source_index", "source_label", "patch",
                                                                           "receptive_field_box") if k in provenance}
                     or None,
                     "nearest_training_images": [{**n, "image": f"/review/api/versions/{version}/{n['image']}"}
                                                 for n in neighbours.get(str(row.id), [])],
                     "quality": quality.get(row.id),
                     "verdict": history[-1] if history else None, "verdicts": len(history)})
    return {"version": version, "name": m.name, "family": m.family, "prototypes": rows,
            "open_verdicts": reg.store.open_verdict_counts().get(version, 0),
            "min_train_subset": min_train_subset(bundle)}


@app.get("/api/versions/{version}/files/{name:path}", **READING, summary="A picture of a version's bundle (PNG)")
def picture(version: str, name: str) -> FileResponse:
    reg = registry()
    bundle = _bundle(reg.bundle_path(version))
    if name not in bundle.manifest.files or not name.endswith(".png"):
        raise ReviewError(404, "not_found", f"{name}: no such picture in version {version}")
    return FileResponse(bundle.file(name), media_type="image/png",
                        headers={"cache-control": "public, max-age=86400, immutable"})


@app.get("/api/versions/{version}/neighbours/{name}", **READING,
         summary="A training image nearest to a prototype (PNG), when the version's neighbours were computed")
def neighbour(version: str, name: str) -> FileResponse:
    reg = registry()
    reg.store.version(version)  # 404 when unknown
    path = reg.version_dir(version) / "neighbours" / name
    if not re.fullmatch(r"\d{3}_\d{1,2}\.png", name) or not path.is_file():
        raise ReviewError(404, "not_found", f"{name}: no such neighbour picture in version {version}")
    return FileResponse(path, media_type="image/png", headers={"cache-control": "public, max-age=86400, immutable"})


@app.get("/api/versions/{version}/lineage", **READING, summary="The version and its ancestors")
def lineage(version: str) -> dict:
    return {"lineage": [r.public() for r in registry().store.lineage(version)]}


@app.get("/api/verdicts", **READING, summary="Verdicts in the order they were given")
def verdicts(version: str | None = None, include_withdrawn: bool = False) -> dict:
    return {"verdicts": registry().store.verdicts(version, include_withdrawn)}


@app.get("/api/jobs", **READING, summary="Revision jobs")
def jobs() -> dict:
    return {"jobs": registry().store.jobs()}


@app.get("/api/jobs/{job_id}", **READING, summary="One revision job: status, progress (round, epoch, ETA), log tail")
def job(job_id: int) -> dict:
    return registry().store.job(job_id)


# -- changing (admin key) ----------------------------------------------------------------------
@app.post("/api/verdicts", status_code=201, **CHANGING, summary="Record a verdict")
def add_verdict(body: VerdictIn) -> dict:
    reg = registry()
    version = version_or_active(reg, body.version)
    ids = {row.id for row in _bundle(reg.bundle_path(version)).manifest.prototypes}
    if body.prototype_id not in ids:
        raise ReviewError(400, "unknown_prototype", f"version {version} has no prototype {body.prototype_id}")
    try:
        v = verdict(body.prototype_id, body.verdict, body.round, body.source, body.note)
    except VerdictError as e:
        raise ReviewError(400, "bad_verdict", str(e)) from None
    return reg.store.add_verdict(version, v)


@app.post("/api/verdicts/{verdict_id}/withdraw", **CHANGING, summary="Withdraw one")
def withdraw_verdict(verdict_id: int) -> dict:
    return registry().store.withdraw_verdict(verdict_id)


@app.post("/api/jobs", responses=CHANGE_ERRORS, status_code=201, dependencies=[Depends(require_admin)],
          summary="Start a revision of a version with its open verdicts (a worker runs it)")
def start_job(body: JobIn) -> dict:
    reg = registry()
    parent = version_or_active(reg, body.parent)
    row = reg.store.version(parent)
    if row.checkpoint is None:
        raise ReviewError(409, "no_checkpoint", f"version {parent} was registered without its checkpoint: "
                          "it cannot be revised")
    check_options(body, _bundle(reg.bundle_path(parent)))
    return reg.store.add_job(parent, body.settings())


def check_options(body: JobIn, bundle: Bundle) -> None:
    """Refuse up front (400) a revision option the parent's family cannot take; the job is never queued."""
    fewest = min_train_subset(bundle)
    if body.train_subset is not None and body.train_subset < fewest:
        m = bundle.manifest
        raise ReviewError(400, "train_subset_too_small", f"train_subset {body.train_subset}: version {m.version} "
                          f"({m.family}) has each prototype pushed onto a training image of its class, so a "
                          f"revision needs at least {fewest} images (one of each class its prototypes stand for)")


@app.post("/api/promote", **CHANGING, summary="Verify a version and make it active")
def promote(body: PromoteIn) -> dict:
    active = registry().promote(body.version, actor="review")
    return {"active": active.version, "previous": active.previous, "generation": active.generation}


@app.post("/api/rollback", **CHANGING, summary="Make the previous version active")
def rollback() -> dict:
    active = registry().rollback(actor="review")
    return {"active": active.version, "previous": active.previous, "generation": active.generation}



# -- shadow evaluation (service/shadow.py) -------------------------------------------------------
def shadow_state(reg: Registry) -> dict:
    version, sample, started_at = reg.store.shadow()
    return {"version": version, "sample": sample if version else None, "started_at": started_at,
            "active": reg.store.active().version, "figures": shadow_figures(version) if version else None}


@app.get("/api/shadow", **READING, summary="The shadow version and how it compares with the served one, live")
def shadow() -> dict:
    """The shadow (null: none) and its figures over every worker since the service started: images compared,
    how many times it agreed with the served answer on the label, the top-1 prototype and in_domain, the
    changed answers by class, the out-of-domain counts of each side, failures, mean run time."""
    return shadow_state(registry())


@app.post("/api/shadow", **CHANGING, summary="Run a version beside the active one on a sample of /predict")
def start_shadow(body: ShadowIn) -> dict:
    reg = registry()
    reg.verify(body.version)
    reg.store.start_shadow(body.version, body.sample, actor="review")
    return shadow_state(reg)


@app.delete("/api/shadow", **CHANGING, summary="End the shadow")
def end_shadow() -> dict:
    reg = registry()
    reg.store.end_shadow(actor="review")
    return shadow_state(reg)
