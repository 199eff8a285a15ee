"""The quality report as people look at it: quality.png (figures against their references) and
quality.html (the tables, the picture, each prototype's row with its picture) inside the bundle."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bundle.manifest import Manifest, QualityReport  # noqa: E402

PICTURE, PAGE = "quality.png", "quality.html"


def write_figures(bundle_dir: Path, manifest: Manifest, report: QualityReport) -> tuple[str, str]:
    """Write quality.png and quality.html into `bundle_dir`; return their names in the bundle."""
    write_picture(Path(bundle_dir) / PICTURE, manifest, report)
    (Path(bundle_dir) / PAGE).write_text(page(manifest, report))
    return PICTURE, PAGE


def write_picture(path: Path, manifest: Manifest, report: QualityReport) -> None:
    precisions = sorted(name for name in report.figures if name.startswith("activation_precision."))
    panels = [_auroc_bars, _against_references] + [_precision_bars(name) for name in precisions[:2]]
    panels.append(_curves if "deletion_auc" in report.figures else _nearest_encoding)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2))
    for panel, ax in zip(panels, axes, strict=True):
        panel(ax, report)
    fig.suptitle(f"{manifest.tag} ({manifest.family}): explanation quality on the {report.data} {report.split} "
                 f"split ({report.split_size} images, {report.sample_size} sampled with seed {report.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _auroc_bars(ax, report: QualityReport) -> None:
    ids = [p.id for p in report.prototypes]
    values = [p.figures.get("auroc") or 0.0 for p in report.prototypes]
    ax.bar(range(len(ids)), values, color="#4c72b0")
    ax.axhline(0.5, color="grey", linestyle="--", label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("prototype id")
    ax.set_ylabel("AUROC for its own class")
    ax.set_title("class discrimination per prototype")
    ticks = list(range(0, len(ids), max(1, len(ids) // 10)))
    ax.set_xticks(ticks, [ids[i] for i in ticks])
    ax.legend(loc="lower right")


def _precision_bars(name: str):
    """A panel: each prototype's activation precision for one mask, the mask's area share beside it."""

    def panel(ax, report: QualityReport) -> None:
        ids = [p.id for p in report.prototypes]
        values = [p.figures.get(name) or 0.0 for p in report.prototypes]
        ax.bar(range(len(ids)), values, color="#dd8452")
        ax.axhline(report.figures[name].reference, color="grey", linestyle="--", label="chance (mask area share)")
        ax.set_ylim(0, 1.02)
        ticks = list(range(0, len(ids), max(1, len(ids) // 10)))
        ax.set_xticks(ticks, [ids[i] for i in ticks])
        ax.set_xlabel("prototype id")
        ax.set_ylabel("share of its top 5% pixels in the mask")
        ax.set_title(name.replace("_", " "))
        ax.legend(loc="upper right", fontsize=8)

    return panel


def _against_references(ax, report: QualityReport) -> None:
    """Each figure on a 0..1 scale beside its reference."""
    shown = [(name, f) for name, f in report.figures.items()
             if f.value is not None and f.reference is not None and 0 <= f.value <= 1.5 and 0 <= f.reference <= 1.5
             and name not in ("near_duplicate_pairs", "same_patch_duplicates", "prototype_nearest_encoding")]
    y = range(len(shown))
    ax.barh([i + 0.2 for i in y], [f.value for _, f in shown], height=0.4, color="#4c72b0", label="this model")
    ax.barh([i - 0.2 for i in y], [f.reference for _, f in shown], height=0.4, color="#bbbbbb", label="reference")
    ax.set_yticks(list(y), [f"{name}\n(ref: {f.reference_kind.split(' (')[0]})" for name, f in shown], fontsize=7)
    ax.set_title("figures against their references")
    ax.legend(loc="lower right", fontsize=8)


def _curves(ax, report: QualityReport) -> None:
    for kind, colour in (("deletion", "#c44e52"), ("insertion", "#55a868")):
        detail = report.figures[f"{kind}_auc"].detail
        x = [i / (len(detail["curve"]) - 1) for i in range(len(detail["curve"]))]
        ax.plot(x, detail["curve"], color=colour, label=f"{kind} (map order)")
        ax.plot(x, detail["random_curve"], color=colour, linestyle="--", label=f"{kind} (random order)")
    ax.set_xlabel("share of pixels removed / inserted")
    ax.set_ylabel("top prototype's similarity / on the whole image")
    ax.set_title("faithfulness")
    ax.legend(fontsize=8)


def _nearest_encoding(ax, report: QualityReport) -> None:
    ids = [p.id for p in report.prototypes]
    values = [p.figures.get("nearest_encoding_distance") or 0.0 for p in report.prototypes]
    ax.bar(range(len(ids)), values, color="#4c72b0")
    figure = report.figures.get("prototype_nearest_encoding")
    if figure is not None and figure.reference is not None:
        ax.axhline(figure.reference, color="grey", linestyle="--", label="median nearest-neighbour distance")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(ids)), ids)
    ax.set_xlabel("prototype id")
    ax.set_ylabel("squared distance to the nearest encoding")
    ax.set_title("R1 as a distance")


def page(manifest: Manifest, report: QualityReport) -> str:
    """The report as one self-contained HTML page (pictures by their paths inside the bundle)."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{_fmt(f.value)}</td><td>{_fmt(f.reference)}</td><td>{e(f.reference_kind or '')}"
        f"</td><td>{'higher' if f.higher_is_better else 'lower' if f.higher_is_better is not None else ''}</td>"
        f"<td>{f.n if f.n is not None else ''}</td></tr>" for name, f in report.figures.items())
    missing = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in report.not_applicable.items())
    keys = sorted({k for p in report.prototypes for k in p.figures})
    by_id = {row.id: row for row in manifest.prototypes}
    proto_rows = "".join(
        f"<tr><td>{p.id}</td><td>{e(manifest.class_names[by_id[p.id].class_identity])}</td>"
        f"<td>{e(by_id[p.id].status)}</td><td>{_picture(by_id[p.id].image)}</td>"
        + "".join(f"<td>{e(_fmt(p.figures.get(k)))}</td>" for k in keys) + "</tr>" for p in report.prototypes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(manifest.tag)}: explanation quality</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}} img.p{{height:40px;image-rendering:pixelated}}</style>
</head><body>
<h1>{e(manifest.tag)} ({e(manifest.family)}): explanation quality</h1>
<p>The {e(report.data)} {e(report.split)} split ({report.split_size} images; {report.sample_size} sampled
with seed {report.seed} for the map-based figures and the patch encodings),
computed {e(report.computed_at.isoformat())} in {report.seconds} s.</p>
<img src="{PICTURE}" alt="figures against their references" style="max-width:100%">
<h2>Figures</h2>
<table><tr><th>figure</th><th>value</th><th>reference</th><th>reference is</th><th>better</th><th>n</th></tr>
{rows}</table>
<h2>Not applicable</h2><ul>{missing}</ul>
<h2>Prototypes</h2>
<table><tr><th>id</th><th>class</th><th>status</th><th>picture</th>{''.join(f'<th>{e(k)}</th>' for k in keys)}</tr>
{proto_rows}</table>
</body></html>
"""


def _picture(path: str | None) -> str:
    return f'<img class="p" src="{html.escape(path)}" alt="">' if path else ""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return ""
    return str(value)
