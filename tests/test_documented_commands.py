"""Every `make` target and `protoserve` verb and flag shown in README.md or docs/*.md exists.

Commands are read from the fenced code blocks, and from inline code spans that begin with one
(`make ...`, `protoserve ...`), such as the command column of the results' tables. The documents'
relative links (pages, pictures) must lead to files of the repository too.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import NamedTuple

from cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*```")
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
INLINE_COMMAND = re.compile(r"^(?:make|protoserve|\.venv/bin/protoserve|python -m cli\.main|torchrun)\s")
COMMENT = re.compile(r"(?:^|\s)#.*$")
# `|` is not one: the docs write alternatives with it (`--engine local|ray`, `list | promote VERSION`)
SHELL_SEPARATOR = re.compile(r"&&|\|\||;")
# `protoserve VERB`, `.venv/bin/protoserve VERB`, `python -m cli.main VERB` (also behind torchrun)
PROTOSERVE = re.compile(r"(?:^|[\s/])(?:protoserve|-m\s+cli\.main)\s+([a-z][\w-]*)")
MAKE = re.compile(r"^\s*make\s+(.*)$")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
MAKE_RULE = re.compile(r"^([A-Za-z0-9_.][^:=#$]*?)\s*::?(?!=)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


class Command(NamedTuple):
    """One documented shell command and where it is written (file:line)."""

    where: str
    text: str


def code_lines(path: Path) -> list[tuple[int, str]]:
    """The lines inside the fenced code blocks of a Markdown file, with their line numbers."""
    return [(number, line) for number, line, fenced in _lines(path) if fenced]


def inline_commands(path: Path) -> list[tuple[int, str]]:
    """The inline code spans outside code blocks that begin with a command, with their line numbers."""
    prose = "\n".join("" if fenced else line for _, line, fenced in _lines(path))
    spans = [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())) for m in INLINE_CODE.finditer(prose)]
    return [(number, span) for number, span in spans if INLINE_COMMAND.match(span)]


def _lines(path: Path) -> list[tuple[int, str, bool]]:
    """Each line of a Markdown file with its number and whether it is inside a code block (fences: no)."""
    lines, inside = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = bool(FENCE.match(line))
        lines.append((number, line, inside and not fence))
        inside ^= fence
    return lines


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Comments dropped; a line after a backslash, or an indented `--flag` / `[--flag` line, joins the one before."""
    joined: list[tuple[int, str]] = []
    continues = False
    for number, line in lines:
        text = COMMENT.sub("", line).rstrip()
        follows = line[:1].isspace() and text.lstrip().startswith(("--", "[--"))
        if joined and (continues or follows):
            joined[-1] = (joined[-1][0], f"{joined[-1][1]} {text.strip()}")
        elif text.strip():
            joined.append((number, text))
        continues = text.endswith("\\")
        if continues:
            joined[-1] = (joined[-1][0], joined[-1][1][:-1])
    return joined


def documented_commands(paths: list[Path] = DOCUMENTS) -> list[Command]:
    """Every shell command of every code block (`a && b`, `a || b` and `a; b` are two)."""
    commands = []
    for path in paths:
        for number, line in logical_lines(code_lines(path)) + inline_commands(path):
            where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{number}"
            commands += [Command(where, part.strip()) for part in SHELL_SEPARATOR.split(line) if part.strip()]
    return commands


def make_targets(makefile: Path = REPO / "Makefile") -> set[str]:
    """The targets the Makefile's rules name."""
    targets: set[str] = set()
    for line in makefile.read_text().splitlines():
        if match := MAKE_RULE.match(line):
            targets.update(name for name in match.group(1).split() if not name.startswith("."))
    return targets


def called_targets(command: str) -> list[str]:
    """The targets a `make ...` command asks for (options and VAR=value left out)."""
    match = MAKE.match(command)
    if not match:
        return []
    return [word for word in match.group(1).split() if not word.startswith("-") and "=" not in word]


def verb_options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Each verb of the `protoserve` parser and the options it and its sub-actions take."""
    return {name: _options(verb) for name, verb in _subparsers(parser).items()}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    options = {option for action in parser._actions for option in action.option_strings}
    for sub in _subparsers(parser).values():
        options |= _options(sub)
    return options


def protoserve_problems(command: Command, verbs: dict[str, set[str]]) -> list[str]:
    """What a `protoserve VERB --flag ...` command names that the parser does not have."""
    match = PROTOSERVE.search(command.text)
    if not match:
        return []
    verb = match.group(1)
    if verb not in verbs:
        return [f"{command.where}: `{command.text}`: no verb `protoserve {verb}`"]
    return [f"{command.where}: `{command.text}`: `protoserve {verb} --help` has no {flag}"
            for flag in FLAG.findall(command.text[match.end():]) if flag not in verbs[verb]]


def test_documented_make_targets_exist():
    targets = make_targets()
    problems = [f"{c.where}: `{c.text}`: no target {t} in the Makefile"
                for c in documented_commands() for t in called_targets(c.text) if t not in targets]
    assert not problems, "\n".join(problems)


def test_documented_protoserve_verbs_and_flags_exist():
    verbs = verb_options(build_parser())
    problems = [p for c in documented_commands() for p in protoserve_problems(c, verbs)]
    assert not problems, "\n".join(problems)


def test_relative_links_lead_to_files():
    missing = [f"{path.relative_to(REPO)}:{number}: {target}"
               for path in DOCUMENTS for number, line, fenced in _lines(path) if not fenced
               for target in LINK.findall(line)
               if "://" not in target and not target.startswith("#")
               and not (path.parent / target.split("#")[0]).exists()]
    assert not missing, "\n".join(missing)


def test_the_walk_finds_the_documented_commands():
    commands = documented_commands()
    assert {"demo", "test"} <= {t for c in commands for t in called_targets(c.text)}
    assert {"serve", "score", "revise", "train"} <= {m.group(1) for c in commands if (m := PROTOSERVE.search(c.text))}


def test_the_walk_joins_continuations_drops_comments_and_reads_inline_spans(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text `protoserve nope --x`, `serve --y`\n```\n"
                   "protoserve score --model m   # --not-a-flag\n    --input a b\n    [--workers N]\n"
                   "protoserve revise --out o \\\n    --rounds 5\n"
                   "torchrun --nproc_per_node 2 -m cli.main train --config c.yaml\n"
                   "make demo test && make lint\n"
                   "protoserve serve [--bundle DIR | --model T] [--device auto|cpu]\n```\n")
    commands = documented_commands([doc])
    assert [c.where for c in commands] == [f"{doc}:{n}" for n in (3, 6, 8, 9, 9, 10, 1)]
    texts = [c.text for c in commands]
    assert texts[0].split() == ["protoserve", "score", "--model", "m", "--input", "a", "b", "[--workers", "N]"]
    assert texts[1].split() == ["protoserve", "revise", "--out", "o", "--rounds", "5"]
    assert texts[3:5] == ["make demo test", "make lint"]
    assert FLAG.findall(texts[5]) == ["--bundle", "--model", "--device"]
    assert texts[6] == "protoserve nope --x"
    assert called_targets(texts[3]) == ["demo", "test"]


def test_a_missing_verb_or_flag_is_reported_with_its_place():
    verbs = verb_options(build_parser())
    torchrun = Command("x.md:1", "torchrun --nproc_per_node 2 -m cli.main train --config c")
    assert protoserve_problems(torchrun, verbs) == []
    assert protoserve_problems(Command("x.md:2", "protoserve serve --no-such-flag"), verbs) == [
        "x.md:2: `protoserve serve --no-such-flag`: `protoserve serve --help` has no --no-such-flag"]
    assert protoserve_problems(Command("x.md:3", "protoserve fly"), verbs) == [
        "x.md:3: `protoserve fly`: no verb `protoserve fly`"]
