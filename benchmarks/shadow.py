"""Shadow evaluation on live traffic: what it shows, and what it costs /predict.

    python benchmarks/shadow.py --out runs/shadow_benchmark.json [--images 10000] [--seconds 6 --rounds 3]

1. The revised Decoy-MNIST ProtoPNet (models/protopnet_decoy_mnist/revised) as the shadow of its baseline
   (models/protopnet_decoy_mnist/bundle, active) in a throw-away registry, sampling every request; the
   Decoy-MNIST test images (decoys of a random class's shade in a random corner, training/decoy_mnist.py)
   posted to /predict in batches of 64; then the review API's shadow figures (what the page shows) and
   the protoserve_shadow_* series of /metrics.
2. /predict throughput with 64 clients in a closed loop (one digit per call), the shadow off and sampling
   10%, in alternating rounds (medians), every answer checked against the one without a shadow, errors
   counted.
Both with `bentoml serve` (2 API workers) on this machine; the load generator shares its cores.
This file may import torch (the Decoy-MNIST images come from the training side); the service never does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINE = REPO / "models" / "protopnet_decoy_mnist"
KEY = "shadow-benchmark-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def decoy_test_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n Decoy-MNIST test images (uint8 [n, 28, 28]) and labels, as the baseline's config made them."""
    import yaml

    from training.decoy_mnist import Confounder, load_decoy_mnist
    from training.splits import resolve_data_root

    d = yaml.safe_load((BASELINE / "config.yaml").read_text())["data"]
    sets = load_decoy_mnist(resolve_data_root(None), d["split_seed"], d["val_size"], d["train_subset"],
                            Confounder(position=d.get("decoy_position") or Confounder().position))
    return sets["test"].images[:n], sets["test"].labels[:n]


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def registry_with_both(root: Path):
    from registry.versions import Registry

    registry = Registry(root)
    base = registry.register(BASELINE / "bundle", BASELINE / "checkpoint.pt").version
    revised = registry.register(BASELINE / "revised" / "bundle", BASELINE / "revised" / "checkpoint.pt",
                                parent=base).version
    registry.promote(base, actor="benchmark")
    return registry, base, revised


def set_shadow(url: str, version: str | None, sample: float = 0.1) -> None:
    if version is None:
        httpx.request("DELETE", f"{url}/review/api/shadow", headers=AUTH).raise_for_status()
    else:
        httpx.post(f"{url}/review/api/shadow", json={"version": version, "sample": sample},
                   headers=AUTH).raise_for_status()
    time.sleep(3.0)  # every worker polls (0.5 s) and loads or drops the shadow


def decoy_run(url: str, revised: str, images: np.ndarray, labels: np.ndarray) -> dict:
    set_shadow(url, revised, 1.0)
    correct = 0
    with httpx.Client(timeout=120) as http:
        for start in range(0, len(images), 64):
            chunk = [png_base64(x) for x in images[start:start + 64]]
            answer = http.post(f"{url}/predict", json={"images": chunk})
            answer.raise_for_status()
            predicted = [p["label"] for p in answer.json()["predictions"]]
            correct += int(np.sum(np.asarray(predicted) == labels[start:start + 64]))
    deadline = time.monotonic() + 60
    while True:
        state = httpx.get(f"{url}/review/api/shadow").json()
        if state["figures"]["images"] >= len(images) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    series = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
              if line.startswith("protoserve_shadow_") and not line.startswith("protoserve_shadow_seconds_bucket")]
    set_shadow(url, None)
    return {"images": len(images), "served_accuracy": correct / len(images), "shadow": state, "metrics": series}


async def closed_loop(url: str, body: bytes, clients: int, seconds: float, expected: dict) -> dict:
    import aiohttp

    done, errors, changed = 0, 0, 0
    stop = time.monotonic() + seconds

    async def client(session):
        nonlocal done, errors, changed
        while time.monotonic() < stop:
            try:
                async with session.post(f"{url}/predict", data=body,
                                        headers={"content-type": "application/json"}) as r:
                    answer = await r.json()
                    if r.status != 200:
                        errors += 1
                    elif answer["predictions"] != expected:
                        changed += 1
                    done += 1
            except Exception:
                errors += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.monotonic() - started
    return {"requests": done, "per_second": done / elapsed, "errors": errors, "changed_answers": changed}


def throughput(url: str, revised: str, digit: str, seconds: float, rounds: int) -> dict:
    body = json.dumps({"images": [digit]}).encode()
    expected = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"}).json()
    expected = expected["predictions"]
    runs = {"off": [], "shadow_10pct": []}
    asyncio.run(closed_loop(url, body, 64, 2.0, expected))  # warm-up
    for _ in range(rounds):
        for name in runs:
            set_shadow(url, revised if name == "shadow_10pct" else None, 0.1)
            runs[name].append(asyncio.run(closed_loop(url, body, 64, seconds, expected)))
    medians = {name: statistics.median(r["per_second"] for r in rs) for name, rs in runs.items()}
    return {"clients": 64, "seconds_per_round": seconds, "rounds": runs, "median_per_second": medians,
            "ratio": medians["shadow_10pct"] / medians["off"],
            "errors": sum(r["errors"] for rs in runs.values() for r in rs),
            "changed_answers": sum(r["changed_answers"] for rs in runs.values() for r in rs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "shadow_benchmark.json")
    parser.add_argument("--images", type=int, default=10_000, help="Decoy-MNIST test images to post")
    parser.add_argument("--seconds", type=float, default=6.0, help="per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from service.demo import running_service

    images, labels = decoy_test_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        registry, base, revised = registry_with_both(Path(tmp) / "registry")
        env = {"PROTOSERVE_REGISTRY": str(registry.root), "PROTOSERVE_WORKERS": "2", "PROTOSERVE_ADMIN_KEY": KEY,
               "BENTOML_HOME": str(Path(tmp) / "bentoml_home")}
        with running_service(registry.active_bundle(), None, Path(tmp) / "serve.log", 180, env=env) as url:
            result = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
                      "baseline": base, "shadow": revised,
                      "decoy_mnist": decoy_run(url, revised, images, labels),
                      "throughput": throughput(url, revised, png_base64(images[0]), args.seconds, args.rounds)}
            result["machine"]["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    figures, t = result["decoy_mnist"]["shadow"]["figures"], result["throughput"]
    print(json.dumps({"decoy_mnist": {k: figures[k] for k in ("images", "agreement", "out_of_domain")},
                      "changed_answers_top": figures["changed_answers"][:5],
                      "throughput": {k: t[k] for k in ("median_per_second", "ratio", "errors", "changed_answers")}},
                     indent=2))


if __name__ == "__main__":
    main()
