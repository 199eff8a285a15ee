"""One loaded bundle: its verified manifest and ONNX Runtime sessions on the best usable provider.

Where the bundle comes from (first that is set, protoserve/settings.py):
    PROTOSERVE_BUNDLE      a bundle directory
    PROTOSERVE_MODEL_TAG   a tag (name:version) in the BentoML model store (`protoserve import`)
    the shipped default    models/prototypedl_mnist_headline/bundle
PROTOSERVE_DEVICE and PROTOSERVE_THREADS (ONNX Runtime intra-op threads per session) tune the
sessions. Threads default to 1: the service runs one worker per core, and a multi-thread pool in
each worker's sessions would spin on cores that the other worker and the HTTP stack need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bundle.manifest import Bundle, drift_quantiles
from bundle.runtime import classify, load_probe, open_session, verify_bundle
from bundle.store import bundle_dir
from bundle.subgraph import restrict_outputs
from inference.explain import active_mask, nearest_distance
from protoserve.settings import settings

log = logging.getLogger("protoserve.service")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "models" / "prototypedl_mnist_headline" / "bundle"


def bundle_location() -> Path:
    """The bundle directory the environment asks for (see the module docstring)."""
    s = settings()
    if s.bundle is not None:
        return s.bundle
    if s.model_tag is not None:
        return bundle_dir(s.model_tag)
    return DEFAULT_BUNDLE


@dataclass
class LoadedModel:
    """A verified bundle with its sessions, ready to answer."""
    bundle: Bundle
    session: object
    decoder: object | None
    provider: str
    active: np.ndarray  # [M] bool, False for masked prototypes
    # quantile -> nearest-prototype distance on the bundle's test set (its manifest; the probe images
    # for a bundle whose manifest carries none): the drift alert's reference
    reference_distance: dict[str, float] = field(default_factory=dict)
    # model.onnx cut to the outputs classify asks for (classifier_outputs), when it gives the same numbers
    # as the whole graph on the probe images: ONNX Runtime runs every node of a graph on every call, and
    # PrototypeDL's includes the decoder (bundle/subgraph.py). None: classify runs the whole graph.
    classifier: object | None = None
    classifier_reads: tuple[str, ...] = ()  # the outputs the classifier session has

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    def classify(self, images: np.ndarray, features: str | None = None) -> tuple[np.ndarray, ...]:
        """[N, C, H, W] -> probabilities [N, K], distances [N, M] (and the output named `features`)."""
        cut = self.classifier is not None and (features is None or features in self.classifier_reads)
        return classify(self.classifier if cut else self.session, images, features)

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of model.onnx for [N, C, H, W] images, by name."""
        names = self.bundle.output_names
        return dict(zip(names, self.session.run(names, {"image": images}), strict=True))

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """decoder.onnx: latent [N, q] -> image [N, C, H, W] (families with a decoder)."""
        name_in = self.bundle.manifest.decoder.inputs[0].name
        return self.decoder.run(None, {name_in: latent.astype(np.float32)})[0]


def load_model(path: Path | None = None, device: str | None = None, threads: int | None = None) -> LoadedModel:
    """Read and verify the bundle (checksums and golden probe), open sessions and warm them up."""
    path = Path(path) if path else bundle_location()
    device = device or settings().device
    threads = settings().threads if threads is None else threads
    bundle, _ = verify_bundle(path, device)  # checksums and the golden probe, or BundleError
    session, provider = open_session(bundle.model_path, device, threads=threads)
    decoder = open_session(bundle.decoder_path, device, threads=threads)[0] if bundle.decoder_path else None
    model = LoadedModel(bundle, session, decoder, provider, active_mask(bundle.manifest))
    model.reference_distance = warm_up(model)
    cut = classifier_graph(bundle, session, device, threads)
    if cut is not None:
        model.classifier, model.classifier_reads = cut[1], tuple(classifier_outputs(bundle))
    log.info("protoserve: serving %s (%s) from %s on %s", bundle.manifest.tag, bundle.manifest.family,
             path, provider)
    return model


def classifier_outputs(bundle: Bundle) -> list[str]:
    """What classify reads: the probabilities, the distances and the output the out-of-domain rule reads."""
    domain = bundle.manifest.domain
    return ["probabilities", "distances", *([domain.features] if domain is not None and domain.features else [])]


def classifier_graph(bundle: Bundle, whole, device: str, threads: int = 1) -> tuple[bytes, object] | None:
    """model.onnx cut to classifier_outputs (bundle/subgraph.py: ONNX Runtime runs every node of a graph
    whatever is asked of it, PrototypeDL's decoder included) and a session on it, when that session gives
    the numbers of `whole` (a session on the whole graph) on the probe images; None otherwise."""
    outputs = classifier_outputs(bundle)
    cut = restrict_outputs(bundle.model_path.read_bytes(), outputs)
    if cut is None:
        return None
    session = open_session(cut, device, threads=threads)[0]
    images = load_probe(bundle)["input.image"].astype(np.float32)
    reference = whole.run(outputs, {"image": images})
    if not all(np.array_equal(a, b) for a, b in zip(reference, session.run(outputs, {"image": images}), strict=True)):
        log.warning("protoserve: %s: the graph cut to %s differs from the whole graph; classify runs the whole",
                    bundle.manifest.tag, outputs)
        return None
    return cut, session


def warm_up(model: LoadedModel) -> dict[str, float]:
    """Run the probe images through the sessions once; return the drift reference: the manifest's
    test-set quantiles when it has them and no prototype is masked, else the probe images' own."""
    images = load_probe(model.bundle)["input.image"].astype(np.float32)
    outputs = model.outputs(images)
    if model.decoder is not None:
        model.decode(outputs["latent"][:1])
    reference = model.bundle.manifest.metrics.nearest_distance_quantiles
    if reference and model.active.all():
        return dict(reference)
    return drift_quantiles(nearest_distance(outputs["distances"], model.active))
