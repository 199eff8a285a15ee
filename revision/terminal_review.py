"""A person at the terminal judges prototypes: `protoserve revise --interactive`.

Each round, every active prototype's pictures are written as PNGs (ProtoPNet: the patch, its
source image with boxes, the activation map; PrototypeDL: the decoded prototype); their paths are
printed (and the picture shown inline where the terminal speaks the iTerm2 image protocol), and
the person answers accept / reject / skip (or quit for this round). Each answer is appended to the
verdict file at once, so an interrupted session keeps everything answered so far.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

from registry.verdicts import Verdict, append_verdicts, verdict
from revision.families import revision_family

ANSWERS = {"a": "accept", "r": "reject", "u": "unsure", "s": None, "q": "quit"}


def show_inline(path: Path, write=print) -> None:
    """The picture itself, for terminals that speak the iTerm2 inline-image protocol (iTerm2, WezTerm)."""
    if os.environ.get("TERM_PROGRAM") not in ("iTerm.app", "WezTerm"):
        return
    data = base64.b64encode(path.read_bytes()).decode()
    write(f"\033]1337;File=inline=1;width=12:{data}\a")


def ask(prompt: str, read: Callable[[str], str]) -> str | None:
    """One of ANSWERS' values; asks again on anything else."""
    while True:
        answer = read(prompt).strip().lower()[:1]
        if answer in ANSWERS:
            return ANSWERS[answer]


def terminal_consult(verdict_path: Path, pictures_dir: Path, reviewer: str, train=None,
                     read: Callable[[str], str] = input, write=print):
    """A Consult (revision/rounds.py) that asks a person about each active prototype."""

    def consult(r: int, model, judgements) -> list[Verdict]:
        family = revision_family(model)
        pictures = family.pictures(model, train, Path(pictures_dir) / f"round_{r:02d}")
        identities = family.class_identities(model)
        given = []
        write(f"round {r}: {len(pictures)} prototypes; answer a(ccept), r(eject), u(nsure), s(kip), q(uit round)")
        for j, paths in sorted(pictures.items()):
            write(f"prototype {j} (class {identities[j]}):")
            for path in paths:
                write(f"  {path}")
                show_inline(path, write)
            answer = ask(f"prototype {j} [a/r/u/s/q]? ", read)
            if answer == "quit":
                break
            if answer is None:
                continue
            v = verdict(j, answer, r, reviewer)
            append_verdicts(verdict_path, [v])
            given.append(v)
        return given

    return consult
