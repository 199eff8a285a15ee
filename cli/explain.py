"""`protoserve explain IMAGE...`: the /explain answer and its picture for local files, without a server.

The answer comes from the same code as the service's (inference/explanation.py), the picture from the
same figure (inference/figure.py). A file that cannot be explained (missing, unreadable, not a PNG or
JPEG, damaged) gets one line on stderr and the others are still explained; the exit code is then 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from inference.explanation import Explainer, explanation_picture
from inference.model import load_model
from inference.preprocess import check_canonical, parse_top_k, to_input
from protoserve.errors import InputError, ProtoserveError

DEFAULT_OUT = Path("runs/explain")


def explain_files(images: list[str], bundle: Path | None, out: Path | None, canonicalize: bool = False,
                  top_k: int | None = None, abstain: bool = False, as_json: bool = False, device: str = "cpu") -> int:
    """Explain each file, write its picture, print its answer; 0 when every file was explained, else 2."""
    targets = picture_paths(images, out)
    model = load_model(bundle, device=device)
    explainer = Explainer(model)
    spec = explainer.manifest.input
    try:
        check_canonical(canonicalize, spec)
        k = parse_top_k(top_k, int(model.active.sum()))
    except InputError as e:
        raise ProtoserveError(str(e)) from None
    failed = 0
    for image, target in zip(images, targets, strict=True):
        try:
            x = to_input(read_file(image), spec, canonical=canonicalize)
        except InputError as e:
            print(f"protoserve explain: {image}: {e.reason}: {e}", file=sys.stderr)
            failed += 1
            continue
        answer = explainer.explain(x, k, abstain)
        target.parent.mkdir(parents=True, exist_ok=True)
        explanation_picture(answer, x, explainer.manifest).save(target, format="PNG")
        print(json.dumps({"input": image, "picture": str(target), **answer}) if as_json
              else summary(image, answer, target), flush=True)
    return 2 if failed else 0


def read_file(image: str) -> bytes:
    """The file's bytes; InputError (one line) when it cannot be read."""
    try:
        return Path(image).read_bytes()
    except IsADirectoryError:
        raise InputError("not_an_image", "is a folder, not an image file") from None
    except OSError as e:
        raise InputError("not_an_image", f"cannot read the file ({e.strerror})") from None


def picture_paths(images: list[str], out: Path | None) -> list[Path]:
    """Where each picture goes: `out` itself for one image and a .png `out`, else `<out>/<image name>.png`
    (a name that repeats gets -2, -3, ...)."""
    if out is not None and out.suffix.lower() == ".png":
        if len(images) > 1:
            raise ProtoserveError(f"--out {out} is one file; give a folder for {len(images)} images")
        return [out]
    folder, seen, paths = out or DEFAULT_OUT, {}, []
    for image in images:
        stem = Path(image).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        paths.append(folder / (f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png"))
    return paths


def summary(image: str, answer: dict, picture: Path) -> str:
    """The answer in two lines: the prediction and its judgement, the nearest prototypes, the picture."""
    p = answer["prediction"]
    if p.get("abstained"):
        said = f"abstained ({p['reason']}: {p['detail']})"
    else:
        said = f"predicted {p['class_name']} (p = {p['probabilities'][p['label']]:.3f})"
    if p.get("in_domain") is not None:
        said += f", {'in' if p['in_domain'] else 'OUT OF'} domain (typicality {p['typicality']:.3f})"
    nearest = ", ".join(f"#{r['id']} class {r['class_name']} d = {r['distance']:.3g}" for r in answer["prototypes"])
    return f"{image}: {said}\n  nearest prototypes: {nearest}\n  picture: {picture}"
