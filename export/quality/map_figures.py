"""The figures of the quality report that read similarity maps (ProtoPNet's `similarity_maps` output):
activation precision, stability, the sanity check (all on pairs of a sampled validation image and a
prototype of its class), and the deletion / insertion curves of each sampled image's most similar
prototype; and the prototypes pushed onto one training patch (from the push provenance)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bundle.manifest import QualityFigure
from export.quality import measures, probes
from export.quality.run import SANITY_LIMIT, Run

CHUNK_PIXELS = 100 * 28 * 28  # image pixels whose maps are held at once (100 MNIST digits)


NO_MAPS = "the model has no similarity maps (it compares whole-image encodings)"
MAP_FIGURES = ("activation_precision", "stability", "sanity_rank_correlation", "deletion_auc", "insertion_auc")


def _same_patch(run: Run, split) -> None:
    rows = run.bundle.manifest.prototypes
    if not any(_source(row.provenance) for row in rows):
        run.not_applicable["same_patch_duplicates"] = "the prototypes carry no push source (they are not pushed)"
        return
    sources = [_source(row.provenance) if row.status == "active" else None for row in rows]
    groups = measures.same_patch_groups(sources)
    ids = [row.id for row in rows]
    run.each("same_patch_as", [next(([ids[k] for k in g if k != j] for g in groups if j in g), [])
                               for j in range(len(rows))])
    run.figures["same_patch_duplicates"] = QualityFigure(
        value=float(sum(len(g) - 1 for g in groups)), reference=0.0, reference_kind="none",
        higher_is_better=False, n=sum(s is not None for s in sources),
        detail={"groups": [[ids[k] for k in g] for g in groups]})


def _source(provenance: dict | None) -> tuple | None:
    if not provenance or "source_index" not in provenance:
        return None
    return provenance["source_index"], provenance["patch"]["row"], provenance["patch"]["col"]


@dataclass
class PairMaps:
    """For each (image, prototype of its class) pair of one chunk: the maps the figures read."""

    image: np.ndarray  # [P] position in the chunk
    prototype: np.ndarray  # [P]
    trained: np.ndarray  # [P, H, W] upsampled similarity maps
    noisy: np.ndarray  # [P, H, W] the same under pixel noise
    untrained: np.ndarray  # [P, H, W] a randomly initialised model's
    untrained_noisy: np.ndarray
    raw: np.ndarray  # [P, h, w] the trained maps before upsampling
    randomised: np.ndarray  # [P, h, w] with the backbone re-initialised


def _pair_maps(run: Run, models: dict, images: torch.Tensor, noisy: torch.Tensor, labels: np.ndarray) -> PairMaps:
    own = (labels[:, None] == np.array(run.identities)[None, :]) & run.active[None, :]
    image, prototype = np.nonzero(own)
    size = tuple(images.shape[2:])

    def maps(model, x):
        return probes.outputs(model, x, "similarity_maps")[torch.from_numpy(image), torch.from_numpy(prototype)]

    def up(model, x):
        return probes.upsampled(maps(model, x)[:, None], size)[:, 0]

    raw = maps(run.model, images)
    return PairMaps(image=image, prototype=prototype, trained=probes.upsampled(raw[:, None], size)[:, 0],
                    noisy=up(run.model, noisy), untrained=up(models["untrained"], images),
                    untrained_noisy=up(models["untrained"], noisy), raw=raw.numpy(),
                    randomised=maps(models["randomised"], images).numpy())


def _map_figures(run: Run, split) -> None:
    """Activation precision, stability and the sanity check over the sample's (image, own prototype) pairs."""
    if not probes.has_output(run.model, "similarity_maps"):
        run.not_applicable.update({name: NO_MAPS for name in MAP_FIGURES})
        return
    o = run.options
    sample, labels = run.sample, run.labels[run.index]
    masks = probes.object_masks(split, run.index, sample, run.dataset)
    noisy = probes.input_noise(sample, o.noise, run.bundle.manifest.input.std, o.seed)
    models = {"randomised": probes.randomised_backbone(run.model, o.seed), "untrained": probes.random_model(run.bundle,
                                                                                                          o.seed)}
    values: dict[str, list] = {}
    maps: dict[str, list[np.ndarray]] = {"trained": [], "randomised": []}  # small: [h, w] per pair
    step = max(1, CHUNK_PIXELS // (sample.shape[2] * sample.shape[3]))
    for start in range(0, len(sample), step):
        chunk = slice(start, start + step)
        pairs = _pair_maps(run, models, sample[chunk], noisy[chunk], labels[chunk])
        _collect(values, "prototype", pairs.prototype)
        for name, mask in masks.items():
            m = mask[chunk][pairs.image]
            _collect(values, f"precision.{name}", [measures.activation_precision(a, b, o.top_fraction)
                                                   for a, b in zip(pairs.trained, m, strict=True)])
            _collect(values, f"chance.{name}", m.reshape(len(m), -1).mean(axis=1))
        _collect(values, "stable", _same_cell(pairs.trained, pairs.noisy, o.grid))
        _collect(values, "untrained_stable", _same_cell(pairs.untrained, pairs.untrained_noisy, o.grid))
        _collect(values, "rho", [measures.rank_correlation(a, b) for a, b in zip(pairs.raw, pairs.randomised,
                                                                                  strict=True)])
        maps["trained"].append(pairs.raw)
        maps["randomised"].append(pairs.randomised)
    prototype = np.asarray(values.get("prototype", []), dtype=int)
    if len(prototype):
        values |= _image_dependence(np.concatenate(maps["trained"]), np.concatenate(maps["randomised"]), prototype)
    per = {k: _per_prototype(np.asarray(v, dtype=float), prototype, len(run.identities))
           for k, v in values.items() if k != "prototype"}
    run.settings["masks"] = sorted(masks)
    _report_maps(run, per, sorted(masks), n_pairs=len(prototype))


def _image_dependence(trained: np.ndarray, randomised: np.ndarray, prototype: np.ndarray) -> dict[str, list]:
    """Per pair, what the sanity check's one number mixes: `rho_across_images`, the rank correlation of
    the pair's trained map with the same prototype's trained map of another sampled image (a map that
    is mostly *where* and not *what* repeats across images, and a randomised backbone keeps such a
    pattern too); `rho_centred`, the sanity check on the maps with the prototype's mean map over the
    sample removed (what depends on the image). NaN where a prototype has one pair only."""
    across, centred = np.full(len(prototype), np.nan), np.full(len(prototype), np.nan)
    for j in np.unique(prototype):
        rows = np.flatnonzero(prototype == j)
        if len(rows) < 2:
            continue
        a, b = trained[rows] - trained[rows].mean(axis=0), randomised[rows] - randomised[rows].mean(axis=0)
        centred[rows] = [measures.rank_correlation(x, y) for x, y in zip(a, b, strict=True)]
        across[rows] = [measures.rank_correlation(trained[r], trained[o])
                        for r, o in zip(rows, np.roll(rows, 1), strict=True)]
    return {"rho_across_images": across.tolist(), "rho_centred": centred.tolist()}


def _collect(values: dict, key: str, new) -> None:
    values.setdefault(key, []).extend(np.asarray(new).tolist())


def _same_cell(a: np.ndarray, b: np.ndarray, cells: int) -> list[bool]:
    return [measures.grid_cell(x, cells) == measures.grid_cell(y, cells) for x, y in zip(a, b, strict=True)]


def _per_prototype(values: np.ndarray, prototype: np.ndarray, M: int) -> list[float | None]:
    """Each prototype's mean over its pairs (NaN pairs left out; None without any)."""
    kept = ~np.isnan(values)
    return [float(values[(prototype == j) & kept].mean()) if ((prototype == j) & kept).any() else None
            for j in range(M)]


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _report_maps(run: Run, per: dict, mask_names: list[str], n_pairs: int) -> None:
    for name in mask_names:
        run.each(f"activation_precision.{name}", _rounded(per[f"precision.{name}"]))
        run.summary(f"activation_precision.{name}", per[f"precision.{name}"], "chance (the mask's area share)",
                    _mean(per[f"chance.{name}"]), higher_is_better=name != "decoy", pairs=n_pairs)
    if not mask_names:
        run.not_applicable["activation_precision"] = f"no object masks for the {run.dataset} data"
    run.each("stability", _rounded(per["stable"]))
    run.summary("stability", per["stable"], "randomly initialised model", _mean(per["untrained_stable"]),
                pairs=n_pairs, noise=run.options.noise, grid=run.options.grid)
    run.each("sanity_rank_correlation", _rounded(per["rho"]))
    run.summary("sanity_rank_correlation", per["rho"], "limit (1: maps unchanged by a randomised backbone)",
                SANITY_LIMIT, higher_is_better=False, pairs=n_pairs)
    figure = run.figures["sanity_rank_correlation"]
    figure.detail["passes"] = figure.value is not None and figure.value < SANITY_LIMIT
    for name in ("across_images", "centred"):
        kept = [v for j, v in enumerate(per[f"rho_{name}"]) if run.active[j] and v is not None]
        figure.detail[name] = round(float(np.mean(kept)), 4) if kept else None


def _rounded(values: list) -> list:
    return [None if v is None else round(v, 4) for v in values]


def _faithfulness(run: Run, split) -> None:
    """Deletion and insertion curves of each sampled image's most similar active prototype, in the
    order of its similarity map and in a random order."""
    if not probes.has_output(run.model, "similarity_maps"):
        return  # listed as not applicable by _map_figures
    o = run.options
    images = run.sample[:o.curve_images]
    distances = probes.outputs(run.model, images, "distances").numpy()
    top = np.where(run.active[None, :], distances, np.inf).argmin(axis=1)
    maps = probes.outputs(run.model, images, "similarity_maps")[torch.arange(len(images)), torch.from_numpy(top)]
    orders = probes.upsampled(maps[:, None], tuple(images.shape[2:]))[:, 0]
    rng = np.random.default_rng(o.seed)
    curves: dict[str, list] = {"deletion": [], "insertion": [], "deletion_random": [], "insertion_random": []}
    for i in range(len(images)):
        for suffix, order in (("", measures.pixel_order(orders[i])), ("_random", rng.permutation(orders[i].size))):
            deletion, insertion = probes.ordered_pixel_runs(run.model, images[i], int(top[i]), order, o.steps)
            curves["deletion" + suffix].append(deletion)
            curves["insertion" + suffix].append(insertion)
    mean = {k: np.mean(v, axis=0) for k, v in curves.items()}
    for kind, better in (("deletion", False), ("insertion", True)):
        run.figures[f"{kind}_auc"] = QualityFigure(
            value=measures.curve_area(mean[kind]), reference=measures.curve_area(mean[f"{kind}_random"]),
            reference_kind="random pixel order", higher_is_better=better, n=len(images),
            detail={"curve": [round(float(v), 4) for v in mean[kind]],
                    "random_curve": [round(float(v), 4) for v in mean[f"{kind}_random"]],
                    "score": "the top prototype's similarity as a share of its similarity on the whole image"})


MAP_STAGES = [_same_patch, _map_figures, _faithfulness]
