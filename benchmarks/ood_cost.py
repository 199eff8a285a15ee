"""What the out-of-domain rule adds to a request, per image: the session run with and without the
features output the rule reads, and the rule's numpy (judge) with and without its latent part (the
distances-only combination), at batch sizes 1 and 64, on test digits; best of several repeats.

    PYTHONPATH=. .venv/bin/python -m benchmarks.ood_cost [--bundles ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from bundle.manifest import read_bundle
from bundle.runtime import open_session
from inference.domain import domain_rule
from inference.explain import active_mask

BUNDLES = ["models/prototypedl_mnist/bundle", "models/protopnet_mnist/bundle"]
SIZES = (1, 64)


def per_image(fns: dict, n: int, repeats: int = 9, calls: int = 200) -> dict[str, float]:
    """Microseconds per image of each fn() (each handles n images): the best of `repeats` runs of `calls`
    calls, the functions taking turns in every repeat so that load from other processes hits them alike."""
    best = dict.fromkeys(fns, np.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - started) / calls)
    return {name: value / n * 1e6 for name, value in best.items()}


def rule_cost(path: str, images: np.ndarray) -> dict:
    """Per-image µs of the session run and of judge, each with and without the latent part."""
    bundle = read_bundle(path)
    rule = domain_rule(bundle.manifest, active_mask(bundle.manifest))
    session, _ = open_session(bundle.model_path, device="cpu", threads=1)
    base = ["probabilities", "distances"]
    extra = [rule.features] if rule.features else []
    parts = {k: v for k, v in (rule.components or {}).items() if k != "latent_mahalanobis"}
    without = dataclasses.replace(rule, components=parts, joint_means=None, joint_precision=None)  # distances only
    result = {"score": rule.calibration.score, "features": rule.features}
    for n in SIZES:
        x = images[:n]
        p, d, *f = session.run(base + extra, {"image": x})
        labels = p.argmax(axis=1)
        features = f[0] if f else None
        result[n] = per_image({"run": lambda x=x: session.run(base, {"image": x}),
                               "run_with_features": lambda x=x: session.run(base + extra, {"image": x})},
                              n, calls=50)
        result[n] |= per_image({"judge_distances_only": lambda d=d, y=labels: without.judge(d, y),
                                "judge": lambda d=d, y=labels, f=features: rule.judge(d, y, f)}, n)
    return result


def print_cost(name: str, r: dict) -> None:
    reads = r["features"] or "the distances only"
    print(f"\n{name}: per-image cost of the out-of-domain rule ({r['score']}, reads {reads}), µs")
    print(f"{'batch':>6s} {'run':>8s} {'run+feat':>9s} {'judge w/o latent':>17s} {'judge':>8s} {'added':>7s}")
    for n in SIZES:
        c = r[n]
        added = c["run_with_features"] - c["run"] + c["judge"] - c["judge_distances_only"]
        print(f"{n:6d} {c['run']:8.1f} {c['run_with_features']:9.1f} {c['judge_distances_only']:17.1f} "
              f"{c['judge']:8.1f} {added:7.1f}")


def test_digits(bundle, n: int) -> np.ndarray:
    """n in-domain inputs: the golden probe's test digits, repeated."""
    with np.load(bundle.probe_path) as probe:
        images = probe["input.image"].astype(np.float32)
    return np.resize(images, (n, *images.shape[1:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", nargs="+", default=BUNDLES)
    args = p.parse_args(argv)
    for path in args.bundles:
        images = test_digits(read_bundle(path), max(SIZES))
        print_cost(read_bundle(path).manifest.tag, rule_cost(path, images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
