"""`protoserve score --pictures DIR`: the explanation picture of the rows asked for, the picture /explain
describes (inference/explanation.py draws it for the service, `protoserve explain` and this job alike).

Rows (--pictures-for): `errors` (the prediction differs from the class the input says: an IDX labels
file, a class sub-folder; scoring/inputs.py truth), `out-of-domain`, or `all` the scored rows. A picture
needs outputs the rows do not read (the reconstruction, the similarity maps), so the chosen images run
again through the whole graph: the job pays for the pictures it writes only. Each picture is
`DIR/<index>.png` (index: the row's ordinal in the job), written atomically before its chunk commits,
so a committed row's picture exists; the row's `picture` column names it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from bundle.manifest import Bundle
from inference.explain import predictions
from inference.explanation import explanation, explanation_picture, judge_answer, prototype_pictures
from scoring.rows import Columns

PICTURES_FOR = ("errors", "out-of-domain", "all")


class PictureWriter:
    """Writes the explanation pictures of one job's chosen rows with a session on the whole graph."""

    def __init__(self, bundle: Bundle, folder: Path, which: str, session, top_k: int, abstain: bool):
        if which not in PICTURES_FOR:
            raise ValueError(f"pictures for {which!r}: expected {', '.join(PICTURES_FOR)}")
        self.bundle, self.manifest = bundle, bundle.manifest
        self.folder, self.which, self.session = Path(folder), which, session
        self.top_k, self.abstain = top_k, abstain
        self.pictures = prototype_pictures(bundle)
        self.active = np.array([row.status == "active" for row in self.manifest.prototypes], dtype=bool)
        self.calibration = self.manifest.domain
        self.model = {"name": self.manifest.name, "version": self.manifest.version}
        self.folder.mkdir(parents=True, exist_ok=True)

    def chosen(self, c: Columns) -> np.ndarray:
        """Positions among the scored rows (where c.ok) whose pictures are asked for."""
        if self.which == "all":
            return np.arange(len(c.label))
        if self.which == "out-of-domain":
            return np.zeros(0, int) if c.in_domain is None else np.flatnonzero(~c.in_domain)
        truth = np.full(len(c.label), -1) if c.true_label is None else c.true_label[c.ok]
        return np.flatnonzero((truth >= 0) & (truth != c.label))

    def write(self, c: Columns, x: np.ndarray) -> None:
        """Draw the chosen rows of `c` (x: the model input of every row of c) and name them in c.picture."""
        chosen = self.chosen(c)
        c.picture = [None] * len(c)
        if not len(chosen):
            return
        rows = np.flatnonzero(c.ok)[chosen]
        names = self.bundle.output_names
        for lo in range(0, len(rows), 64):
            part = rows[lo:lo + 64]
            outputs = dict(zip(names, self.session.run(names, {"image": x[part]}), strict=True))
            for n, (i, j) in enumerate(zip(part, chosen[lo:lo + 64], strict=True)):
                one = {name: value[n] for name, value in outputs.items()}
                c.picture[i] = str(self.draw(int(c.index[i]), one, x[i], c, int(j)))

    def draw(self, index: int, outputs: dict[str, np.ndarray], x: np.ndarray, c: Columns, j: int) -> Path:
        """One row's /explain answer drawn into DIR/<index>.png; its judgement is the row's."""
        prediction = predictions(outputs["probabilities"][None], self.manifest.class_names)[0]
        in_domain = None if c.in_domain is None else bool(c.in_domain[j])
        typicality = None if c.typicality is None else float(c.typicality[j])
        judge_answer(prediction, in_domain, typicality, self.calibration, self.abstain)
        answer = explanation(self.manifest, self.active, outputs, x, self.top_k, prediction, self.pictures, self.model)
        path = self.folder / f"{index:08d}.png"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
        explanation_picture(answer, x, self.manifest).save(tmp, format="PNG")
        os.replace(tmp, path)
        return path
