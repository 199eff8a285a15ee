"""The explanation-quality report of a bundle: `protoserve report BUNDLE` and the last step of export.

Computed on the validation split (never the test set), part of it drawn with a fixed seed:
    class_discrimination_auroc   per prototype, AUROC of its similarity for "the image is of my class"
                                 (CaBRNet's prototype discrimination); reference: chance, 0.5
    last_layer_used_share        prototypes whose last-layer weights can move a logit
    near_duplicate_pairs         prototype pairs closer than the median nearest-neighbour distance
                                 between two real encodings (of different images)
    prototype_nearest_encoding   R1 as a distance: each prototype to its nearest real encoding;
                                 reference: that median nearest-neighbour distance
    same_patch_duplicates        prototypes pushed onto one training patch (push provenance)
    activation_precision.<mask>  share of the top 5% pixels of a prototype's upsampled similarity map
                                 inside the mask (IAIA-BL), on images of its class; reference: the
                                 mask's area share (chance)
    stability                    share of (image, prototype) pairs whose most activated grid cell stays
                                 the same under small pixel noise (Huang et al. 2023, grid cells as
                                 parts); reference: a randomly initialised model
    deletion_auc, insertion_auc  the top prototype's similarity while pixels are removed from (added to
                                 a blank) image in its map's order; reference: random order
    sanity_rank_correlation      rank correlation of the similarity maps before and after
                                 re-initialising the backbone (Adebayo et al. 2018); passes below 0.5.
                                 Its detail separates what the number mixes: `across_images`, the
                                 same prototype's trained maps of two different images (the part of a
                                 map that is position, not content); `centred`, the check with each
                                 prototype's mean map over the sample removed
    decoded_prototypes_own_class decoded prototypes an independent model (the shipped ProtoPNet
                                 bundle, through ONNX Runtime) puts in their own class
What a model has decides which figures apply (similarity maps, push sources, a decoder, object
masks), not its family's name; a figure that does not apply is listed in `not_applicable` with the
reason.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bundle.manifest import Bundle, PrototypeQuality, QualityFigure, QualityReport, read_bundle, write_manifest
from export.quality import measures, probes
from export.quality.decoded_figures import DECODED_STAGES
from export.quality.figures import write_figures
from export.quality.map_figures import MAP_STAGES
from export.quality.run import SANITY_LIMIT, QualityOptions, Run
from training import datasets
from training.config import Config
from training.splits import Split, resolve_data_root


def write_quality_report(bundle_dir: str | Path, data_root: str | None = None,
                         options: QualityOptions | None = None, split: Split | None = None, log=print,
                         progress: bool = True) -> QualityReport:
    """Compute the report of the bundle in `bundle_dir` on its validation split (loaded from
    `data_root` unless given), write quality.png and quality.html beside the manifest and the report
    into the manifest as `quality`, with the checksums redone; returns the report."""
    bundle_dir = Path(bundle_dir)
    bundle = read_bundle(bundle_dir)
    config = Config.from_dict(bundle.manifest.training.config, source=f"{bundle.path}: training config")
    if split is None:
        split = validation_split(config, resolve_data_root(data_root, config.data.root))
    report = compute_quality(bundle, split, config.data.dataset, options or QualityOptions(), log, progress)
    picture, page = write_figures(bundle_dir, bundle.manifest, report)
    report = report.model_copy(update={"picture": picture, "page": page})
    write_manifest(bundle_dir, bundle.manifest.model_copy(update={"quality": report}))
    return report


def validation_split(config: Config, root: Path) -> Split:
    """The split the model was selected on; a split may carry named object masks as `masks`
    ({name: bool [N, H, W]}), as Decoy-MNIST's does (its digits and its decoy squares)."""
    row = datasets.dataset(config.data.dataset)
    if row.decoy_sets is not None:
        decoys = row.decoy_sets(root, config.data)["val"]
        split = decoys.split()
        split.masks = {"object": decoys.object_masks, "decoy": decoys.decoy_masks}
        return split
    return datasets.load_run_data(config, root)["val"]


def compute_quality(bundle: Bundle, split: Split, dataset: str, options: QualityOptions, log=print,
                    progress: bool = True) -> QualityReport:
    """The report of `bundle` on `split` (its images as the model takes them, and labels)."""
    started = time.perf_counter()
    images = split.images if isinstance(split.images, torch.Tensor) else split.images[torch.arange(len(split))]
    rng = np.random.default_rng(options.seed)
    index = np.sort(rng.choice(len(split), size=min(options.sample, len(split)), replace=False))
    run = Run(bundle=bundle, model=probes.model_from_bundle(bundle), images=images,
              labels=split.labels.numpy(), index=index, dataset=dataset, options=options,
              per_prototype=[{} for _ in bundle.manifest.prototypes])
    stages = COMMON_STAGES + MAP_STAGES + DECODED_STAGES
    bar = tqdm(stages, desc=f"quality {bundle.manifest.tag}", unit="figure", disable=not progress)
    for stage in bar:
        bar.set_postfix_str(stage.__name__.strip("_"))
        stage(run, split)
    report = QualityReport(
        data=dataset, split="validation", split_size=len(split), sample_size=len(index), seed=options.seed,
        settings=_settings(options) | run.settings, computed_at=datetime.now(UTC),
        seconds=round(time.perf_counter() - started, 1), figures=run.figures, not_applicable=run.not_applicable,
        prototypes=[PrototypeQuality(id=row.id, figures=values)
                    for row, values in zip(bundle.manifest.prototypes, run.per_prototype, strict=True)])
    log(f"quality report of {bundle.manifest.tag}: {len(run.figures)} figures on {len(index)} of {len(split)} "
        f"validation images in {report.seconds:.0f} s")
    return report


def _settings(options: QualityOptions) -> dict:
    settings = {k: v for k, v in vars(options).items() if k != "judge"}
    return settings | {"sanity_limit": SANITY_LIMIT}


def _class_discrimination(run: Run, split: Split) -> None:
    # Minus the distance: ranks as ProtoPNet's similarity does (a decreasing function of it), and is what
    # PrototypeDL's logits are linear in; AUROC depends on ranks only.
    distances = probes.outputs(run.model, run.images, "distances").numpy()
    values = measures.class_discrimination(-distances, run.labels, run.identities)
    run.each("auroc", [None if v is None else round(v, 4) for v in values])
    run.summary("class_discrimination_auroc", values, "chance", 0.5, n_images=len(run.labels))


def _last_layer_use(run: Run, split: Split) -> None:
    weights = run.model.last_layer.weight.detach().numpy()
    used = measures.used_by_last_layer(weights, run.active)
    run.each("used_by_last_layer", [bool(u) for u in used])
    run.figures["last_layer_used_share"] = QualityFigure(
        value=float(used.mean()), reference=1.0, reference_kind="every prototype", higher_is_better=True,
        n=len(used), detail={"unused": [row.id for row, u in zip(run.bundle.manifest.prototypes, used, strict=True)
                                        if not u]})


def _encoding_reference(run: Run, split: Split) -> None:
    """The encodings the prototypes are compared with (all positions of every validation image, a seeded
    subsample of `options.encodings`) and the median distance from one to its nearest of another image."""
    encodings, groups = probes.encodings(run.model, run.images)
    if len(encodings) > run.options.encodings:
        keep = np.sort(np.random.default_rng(run.options.seed).choice(len(encodings), run.options.encodings,
                                                                      replace=False))
        encodings, groups = encodings[keep], groups[keep]
    run.encodings = encodings
    run.nearest_neighbour = float(np.median(measures.nearest_neighbour_distances(encodings, groups)))


def _near_duplicates(run: Run, split: Split) -> None:
    """Pairs of active prototypes closer than two typical real encodings of different images are."""
    vectors = run.model.prototypes.detach().flatten(1).numpy()
    ids = [row.id for row in run.bundle.manifest.prototypes]
    active = np.flatnonzero(run.active)
    pairs = [(int(active[a]), int(active[b]), d)
             for a, b, d in measures.near_duplicate_pairs(vectors[active], run.nearest_neighbour)]
    run.each("near_duplicates", [[ids[b] if a == j else ids[a] for a, b, _ in pairs if j in (a, b)]
                                 for j in range(len(ids))])
    run.figures["near_duplicate_pairs"] = QualityFigure(
        value=float(len(pairs)), reference=run.nearest_neighbour, reference_kind="median nearest-neighbour "
        "squared distance between encodings of different images (the pair threshold)", higher_is_better=False,
        n=len(active), detail={"pairs": [{"ids": [ids[a], ids[b]], "squared_distance": round(d, 6)}
                                         for a, b, d in pairs], "encodings": len(run.encodings)})


def _nearest_encoding(run: Run, split: Split) -> None:
    """R1 as a distance: each prototype to its nearest encoding, against the nearest-neighbour distance."""
    vectors = run.model.prototypes.detach().flatten(1).numpy()
    nearest = [float(((run.encodings - p) ** 2).sum(axis=1).min()) for p in vectors]
    run.each("nearest_encoding_distance", [round(d, 6) for d in nearest])
    run.summary("prototype_nearest_encoding", nearest, "median nearest-neighbour squared distance between "
                "encodings of different images", run.nearest_neighbour, higher_is_better=False,
                encodings=len(run.encodings))


COMMON_STAGES = [_class_discrimination, _last_layer_use, _encoding_reference, _near_duplicates, _nearest_encoding]
