"""`protoserve demo`: start the service, predict and explain a few test digits, save the picture, stop.

The digits are the bundle's golden-probe images (one test image per class), sent as PNG files
the way a client would send them. Needs nothing but the bundle: no data set, no torch.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from bundle.manifest import read_bundle
from bundle.runtime import load_probe
from inference.explain import pixels_to_picture, png_bytes
from inference.figure import explanation_figure
from inference.model import REPO, bundle_location
from inference.preprocess import denormalize
from protoserve.errors import ProtoserveError
from protoserve.local_processes import free_port, stop_group
from protoserve.settings import environ, variable


class DemoError(ProtoserveError):
    pass


@contextmanager
def running_service(bundle: Path, port: int | None, log: Path, timeout: float = 180.0, env: dict | None = None,
                    host: str = "127.0.0.1"):
    """`bentoml serve` on `bundle` until the block ends; yields the base URL once /readyz says 200.

    `env` adds to (or overrides) the environment of the server, e.g. BENTOML_HOME or PROTOSERVE_WORKERS.
    With `port` None a free port is chosen; should another process take it between the choice and the
    server's bind (the server binds seconds later, after its imports), the start is retried on a new one.
    """
    env = {**os.environ, **environ(bundle=Path(bundle).resolve()), "BENTOML_DO_NOT_TRACK": "True",
           "PYTHONPATH": str(REPO), **(env or {})}
    env.pop(variable("model_tag"), None)
    log.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        chosen = port or free_port()
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service.api:Protoserve",
                                        "--host", host, "--port", str(chosen)], cwd=REPO, env=env,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = wait_ready(process, f"http://127.0.0.1:{chosen}", log, timeout)
        except DemoError:
            stop(process)
            if port is None and attempt < PORT_ATTEMPTS and "Address already in use" in log.read_text(errors="replace"):
                continue
            raise
        try:
            yield url
        finally:
            stop(process)
        return


PORT_ATTEMPTS = 3


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float) -> str:
    """Poll `url`/readyz until it answers 200; DemoError if the server exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise DemoError(f"the service exited with code {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"the service was not ready after {timeout:.0f} s; see {log}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL it if it has not ended after 30 s."""
    stop_group(process, 30)


def probe_labels(probe: dict, class_names: list[str]) -> list[str]:
    """The true class of each probe image. Export stores the first test image of each class present
    in the test set, in class order, so with every class present image i is class i; otherwise the
    label cannot be told and is "?"."""
    n = len(probe["input.image"])
    return list(class_names) if n == len(class_names) else ["?"] * n


def run_demo(out: Path, bundle: Path | None = None, port: int | None = None, index: int = 7) -> dict:
    """Serve `bundle`, call /predict on every probe digit and /explain on one; write the figure to `out`."""
    import httpx

    bundle = Path(bundle) if bundle else bundle_location()
    loaded = read_bundle(bundle)
    manifest = loaded.manifest
    probe = load_probe(loaded)
    pictures = [pixels_to_picture(denormalize(x, manifest.input)) for x in probe["input.image"]]
    encoded = [base64.b64encode(png_bytes(p)).decode() for p in pictures]
    index = index % len(encoded)
    out = Path(out)
    print(f"starting the service on {bundle} ...", flush=True)
    started = time.monotonic()
    with running_service(bundle, port, out.with_suffix(".serve.log")) as url:
        print(f"ready at {url} after {time.monotonic() - started:.1f} s", flush=True)
        with httpx.Client(base_url=url, timeout=60) as client:
            predicted = client.post("/predict", json={"images": encoded}).raise_for_status().json()
            explained = client.post("/explain", json={"image": encoded[index], "top_k": 3}).raise_for_status().json()
            provider = client.get("/metadata").raise_for_status().json()["provider"]
    print(f"model {predicted['model']['name']}:{predicted['model']['version']} on {provider}")
    print_predictions(predicted["predictions"], probe_labels(probe, manifest.class_names))
    print_explanation(explained, index)
    figure = explanation_figure(explained, pictures[index])
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out)
    print(f"explanation written to {out}")
    return explained


def print_predictions(predictions: list[dict], true_labels: list[str]) -> None:
    """One line per probe digit: its true class beside the predicted one and its probability."""
    correct = sum(p["class_name"] == t for p, t in zip(predictions, true_labels, strict=True))
    print(f"POST /predict ({len(predictions)} test digits, the first of each class): {correct} correct")
    for i, (p, true) in enumerate(zip(predictions, true_labels, strict=True)):
        mark = "" if p["class_name"] == true else "   <- wrong"
        print(f"  digit #{i}: true {true}, predicted {p['class_name']} "
              f"(p = {p['probabilities'][p['label']]:.3f}){mark}")


def print_explanation(explained: dict, index: int) -> None:
    """The prediction for one digit and its nearest prototypes (their pictures left out)."""
    prediction = explained["prediction"]
    print(f"POST /explain (test digit #{index}): predicted {prediction['class_name']} "
          f"(p = {prediction['probabilities'][prediction['label']]:.3f}); nearest prototypes:")
    for row in explained["prototypes"]:
        fields = {k: v for k, v in row.items() if k not in ("image", "heatmap", "source_image")}
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}))


def _main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/demo/explanation.png")
    try:
        run_demo(out)
    except ProtoserveError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
