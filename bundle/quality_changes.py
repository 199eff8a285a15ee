"""How each quality figure moved between two versions of a model (a revision and its parent).

Pure Python on the manifests' reports (no torch), so a lineage comparison, the service or a review
page can call it.
"""

from __future__ import annotations

from bundle.manifest import QualityReport


def quality_changes(before: QualityReport | None, after: QualityReport | None) -> dict:
    """{"figures": {name: {before, after, change, improved}}, "prototypes": {id: {name: {before, after}}}}
    for the figures and per-prototype numbers both reports have; `improved` is None where a figure
    has no better direction. Either report missing: empty comparisons."""
    if before is None or after is None:
        return {"figures": {}, "prototypes": {}}
    figures = {}
    for name in sorted(set(before.figures) & set(after.figures)):
        a, b = before.figures[name], after.figures[name]
        if a.value is None or b.value is None:
            continue
        change = b.value - a.value
        better = b.higher_is_better
        improved = None if better is None or change == 0 else (change > 0) == better
        figures[name] = {"before": a.value, "after": b.value, "change": change, "improved": improved}
    old = {p.id: p.figures for p in before.prototypes}
    prototypes = {}
    for p in after.prototypes:
        moved = {k: {"before": old[p.id][k], "after": v} for k, v in p.figures.items()
                 if p.id in old and _number(v) and _number(old[p.id].get(k)) and v != old[p.id][k]}
        if moved:
            prototypes[p.id] = moved
    return {"figures": figures, "prototypes": prototypes}


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
