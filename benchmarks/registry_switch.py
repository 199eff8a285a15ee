"""What following a registry costs /predict: a fixed bundle against registry mode, and registry mode
while versions switch every second.

    python benchmarks/registry_switch.py --bundle models/prototypedl_mnist/bundle --rounds 5

Two `bentoml serve` processes on the same bundle, one API worker each, run side by side: `fixed`
(PROTOSERVE_BUNDLE, as today) and `registry` (PROTOSERVE_REGISTRY over a registry holding the bundle
twice, as versions A and B). Rounds alternate between them so that the shared machine's noise falls
on both alike: /predict at 1 client (one 28x28 PNG per call) and at 8 clients; then the registry
server again, five times as many requests, while a thread promotes A and B in turn every second
(each switch loads, probes and warms the version in the worker, beside the requests). Prints
medians over the rounds and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve import closed_loop, start_protoserve, test_digit  # noqa: E402


def make_registry(bundle: Path, root: Path):
    """A registry with the bundle as its version and a copy as version `<version>-b`."""
    from bundle.manifest import read_bundle, write_manifest
    from registry.versions import Registry

    registry = Registry(root)
    registry.register(bundle)
    copy = Path(shutil.copytree(bundle, root.parent / "copy"))
    manifest = read_bundle(copy).manifest
    write_manifest(copy, manifest.model_copy(update={"version": f"{manifest.version}-b"}))
    registry.register(copy)
    registry.promote(manifest.version)
    return registry, manifest.version, f"{manifest.version}-b"


def flip(registry, a: str, b: str, stop: threading.Event, every: float, switches: list) -> None:
    while not stop.wait(every):
        active = registry.store.active().version
        registry.promote(b if active == a else a)
        switches.append(time.monotonic())


def run(bundle: Path, rounds: int, requests: int, out: Path) -> dict:
    import os

    load_before = os.getloadavg()
    _, image = test_digit(bundle)
    body = {"images": [image]}
    work = Path(tempfile.mkdtemp(prefix="registry_switch_"))
    registry, a, b = make_registry(bundle, work / "registry")
    one = {"PROTOSERVE_WORKERS": "1"}
    fixed, fixed_url = start_protoserve(bundle, work / "fixed.log", **one)
    followed, registry_url = start_protoserve(bundle, work / "registry.log", PROTOSERVE_REGISTRY=str(registry.root),
                                              **one)
    results: dict[str, list[dict]] = {"fixed c=1": [], "registry c=1": [], "fixed c=8": [], "registry c=8": [],
                                      "registry c=1, switching every 1 s": []}
    try:
        for r in range(rounds):
            for clients in (1, 8):
                for name, url in (("fixed", fixed_url), ("registry", registry_url))[:: 1 if r % 2 else -1]:
                    results[f"{name} c={clients}"].append(
                        asyncio.run(closed_loop(f"{url}/predict", body, clients, requests)))
            stop, switches = threading.Event(), []
            flipper = threading.Thread(target=flip, args=(registry, a, b, stop, 1.0, switches))
            flipper.start()
            measured = asyncio.run(closed_loop(f"{registry_url}/predict", body, 1, 5 * requests))
            stop.set()
            flipper.join()
            results["registry c=1, switching every 1 s"].append({**measured, "switches": len(switches)})
            print(f"round {r + 1}/{rounds} done", flush=True)
    finally:
        fixed.stop()
        followed.stop()
    import os

    print(f"load average before the run: {load_before}, after: {os.getloadavg()}")
    summary = {name: {"p50_ms": statistics.median(x["p50_ms"] for x in runs),
                      "p95_ms": statistics.median(x["p95_ms"] for x in runs),
                      "requests_per_s": statistics.median(x["requests_per_s"] for x in runs),
                      "errors": sum(x["errors"] for x in runs),
                      **({"switches": sum(x["switches"] for x in runs)} if "switches" in runs[0] else {})}
               for name, runs in results.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rounds": results}, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO / "models" / "prototypedl_mnist" / "bundle"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=600, help="requests per measurement")
    parser.add_argument("--out", default=str(REPO / "runs" / "registry_switch.json"))
    args = parser.parse_args()
    summary = run(Path(args.bundle), args.rounds, args.requests, Path(args.out))
    for name, s in summary.items():
        extra = f", {s['switches']} switches" if "switches" in s else ""
        print(f"{name:36s} p50 {s['p50_ms']:.2f} ms  p95 {s['p95_ms']:.2f} ms  {s['requests_per_s']:.0f} req/s  "
              f"errors {s['errors']}{extra}")


if __name__ == "__main__":
    main()
