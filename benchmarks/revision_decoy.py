"""Interactive prototype revision on Decoy-MNIST: baseline, pruning, masking, and Alg. 1 with the
encoder frozen and trained (all rounds, and stopping after a round that rejects nothing), for
ProtoPNet and PrototypeDL, over several seeds.

    PYTHONPATH=. python benchmarks/revision_decoy.py [--out runs/revision_bench] [--seeds 0 1 2]
        [--families protopnet prototypedl] [--train-subset 2000] [--epochs N] [--rounds 5]
        [--confounder square | fixed-corner]
    PYTHONPATH=. python benchmarks/revision_decoy.py --shipped models/protopnet_mnist/checkpoint.pt

Per family and seed: a baseline trained on Decoy-MNIST (the square's shade gives the label away;
--confounder picks where the square goes), then each condition from that same baseline (the controls
continued_* only when named: the same rounds with no verdicts), the simulated user (revision/simulated_user.py)
giving the verdicts. Per condition and round: non-object prototypes, verdicts given (rejections:
the user's clicks), accuracy on the clean, randomised-decoy and adversarial-decoy test images
before and after the last layer is re-fitted, wall time. Writes <out>/results.json, results.md
(the README table), PNG pictures, and resumes: finished conditions are skipped, an interrupted one
continues after its last round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from registry.revision_settings import RevisionSettings
from revision.families import ObjectMasks, revision_family_named
from revision.revise import revise_model
from revision.rounds import STATE_FILE, RevisionRun, file_consult, simulated_consult
from training.checkpoint import load_checkpoint
from training.config import Config
from training.decoy_mnist import Confounder, load_decoy_mnist
from training.families import family as family_entry
from training.splits import Split, resolve_data_root

CONDITIONS = {  # name -> revision settings (None: the baseline as trained)
    "baseline": None,
    "pruning": {"mode": "prune"},
    "masking": {"mode": "mask"},
    # Alg. 1 as written: all N rounds train, also after a round with nothing left to reject
    "revision_frozen": {"mode": "revise", "freeze_encoder": True, "all_rounds": True},
    "revision_trained": {"mode": "revise", "freeze_encoder": False, "all_rounds": True},
    # the CLI's default: stop after the first round in which the user rejects nothing
    "revision_frozen_stop": {"mode": "revise", "freeze_encoder": True, "all_rounds": False},
    "revision_trained_stop": {"mode": "revise", "freeze_encoder": False, "all_rounds": False},
    # controls, only when asked for: the same rounds of training with a user who rejects nothing, to
    # tell what the verdicts change from what more training alone changes
    "continued_frozen": {"mode": "revise", "freeze_encoder": True, "all_rounds": True, "user": False},
    "continued_trained": {"mode": "revise", "freeze_encoder": False, "all_rounds": True, "user": False},
}
DEFAULT_CONDITIONS = [name for name, settings in CONDITIONS.items() if (settings or {}).get("user", True)]
EVAL_SETS = {"clean": "test_clean", "decoy": "test", "adversarial": "test_adversarial"}
# the Decoy-MNIST settings: the 4x4 square in a random corner, and the same square always in
# the top-left corner, which the small baselines lean on (it never touches the central 20x20 digit)
CONFOUNDERS = {"square": Confounder(), "fixed-corner": Confounder(position="top_left")}
DEFAULT_OUT = "runs/revision_bench"


def _protopnet_sections(epochs: int) -> dict:
    return {"model": {"family": "protopnet", "backbone": "small_cnn", "n_prototypes": 30, "prototype_dim": 16},
            "schedule": {"warm_epochs": 1, "push_start": epochs, "push_every": epochs, "last_layer_epochs": 5,
                         "lr_features": 1e-3, "lr_last_layer": 3e-3}}


def _prototypedl_sections(epochs: int) -> dict:
    return {"model": {"family": "prototypedl", "n_prototypes": 15}}


BASELINES = {"protopnet": _protopnet_sections, "prototypedl": _prototypedl_sections}
EPOCHS = {"protopnet": 5, "prototypedl": 6}  # baseline training epochs unless --epochs


def baseline_config(family: str, seed: int, train_subset: int, epochs: int,
                    confounder: Confounder = CONFOUNDERS["square"]) -> Config:
    """A small model of `family` on Decoy-MNIST, no augmentation (a deformation would smear the square)."""
    train = {"epochs": epochs, "batch_size": 100, "lr": 2e-3, "elastic": False, "seed": seed,
             "checkpoint_every": epochs, "eval_batch_size": 1000, "num_threads": 2}
    data = {"dataset": "decoy_mnist", "val_size": 1000, "split_seed": seed, "train_subset": train_subset,
            "decoy_position": confounder.position}
    return Config.from_dict({"data": data, "train": train, **BASELINES[family](epochs)})


def train_baseline(family: str, seed: int, args, root: Path, out: Path) -> Path:
    config = baseline_config(family, seed, args.train_subset, args.epochs or EPOCHS[family],
                             CONFOUNDERS[args.confounder])
    trainer_class = family_entry(family).trainer
    trainer = trainer_class(config, out, data_root=root,
                            log=lambda s: print(f"  [{family} seed {seed}] {s}", flush=True))
    if (out / "last.pt").exists():
        trainer.resume()
    trainer.fit()
    return out / "last.pt"


def condition_settings(name: str, rounds: int, epochs_per_round: int, seed: int) -> tuple[RevisionSettings, bool]:
    """The revision settings of condition `name` and whether the simulated user gives verdicts (the
    baseline runs one round that changes nothing; the controls train every round with no verdicts)."""
    settings = dict(CONDITIONS[name] or {})
    user = bool(settings) and settings.pop("user", True)
    rc = RevisionSettings(**(settings or {"mode": "mask"}), rounds=rounds if settings else 1,
                          epochs_per_round=epochs_per_round, seed=seed)
    return rc, user


def run_condition(name: str, checkpoint: Path, sets: dict, args, out: Path, seed: int) -> dict:
    model, config, _ = load_checkpoint(checkpoint)
    data = {"train": sets["train"].split(), "val": sets["val"].split()}
    evals = {k: sets[v].split() for k, v in EVAL_SETS.items()}
    evals = {k: Split(v.images[:args.test_images], v.labels[:args.test_images]) for k, v in evals.items()}
    rc, user = condition_settings(name, args.rounds, args.epochs_per_round, seed)
    consult = simulated_consult() if user else file_consult([])  # baseline and controls: no verdicts
    masks, log = ObjectMasks.from_decoy(sets["train"]), lambda s: print(f"  [{name}] {s}", flush=True)
    started = time.perf_counter()
    if CONDITIONS[name] is None:  # the parent's figures only: round 0 of a revision that runs no round
        run = RevisionRun(model, config, rc, data, out, consult, masks, evals, log=log)
        run.state.history = [run.figures(0, [], 0.0)]
        run.state.finished = True
    else:
        run = revise_model(model, config, rc, data, consult, out, masks=masks, eval_sets=evals,
                           resume=(out / STATE_FILE).exists(), log=log)
    if name == "revision_frozen" and seed == args.seeds[0]:
        run.save_revised(out / "revised.pt", parent=None)
    return {"history": run.state.history, "seconds": time.perf_counter() - started,
            "prototypes": int(model.prototypes.shape[0]), "comparison": run.comparison()}


def summarise(results: dict) -> dict:
    """Per family and condition: mean and spread over seeds of the last round's figures."""
    table = {}
    for family, by_seed in results.items():
        for name in CONDITIONS:
            rows = [by_seed[s][name] for s in by_seed if name in by_seed[s]]
            if not rows:
                continue
            last = [r["history"][-1] for r in rows]
            figures = {"non_object_start": [r["history"][0]["non_object"] for r in rows],
                       "non_object": [h["non_object"] for h in last],
                       "verdicts": [sum(h["verdicts_given"] for h in r["history"]) for r in rows],
                       "rounds": [len(r["history"]) - 1 for r in rows],
                       "seconds_per_round": [r["seconds"] / max(1, len(r["history"]) - 1) for r in rows]}
            for k in EVAL_SETS:
                figures[f"{k}_before"] = [h["accuracy_before_fine_tuning"][k] for h in last]
                figures[f"{k}_after"] = [h["accuracy"][k] for h in last]
            figures["gap"] = [h["accuracy"]["clean"] - h["accuracy"]["adversarial"] for h in last]
            table[f"{family}/{name}"] = {k: (statistics.mean(v), statistics.pstdev(v)) for k, v in figures.items()}
            table[f"{family}/{name}"]["prototypes"] = (rows[0]["prototypes"], 0.0)
            table[f"{family}/{name}"]["non_object_by_round"] = _by_round(rows)
    return table


def _by_round(rows: list[dict]) -> list[float]:
    """Mean non-object count per round; a run that converged early keeps its last count."""
    n = max(len(r["history"]) for r in rows)
    return [statistics.mean(r["history"][min(i, len(r["history"]) - 1)]["non_object"] for r in rows) for i in range(n)]


def markdown(table: dict, seeds: int) -> str:
    head = ("| model / condition | non-object (start -> end) | verdicts | clean acc | rand. decoy acc | adv. decoy acc "
            "| clean - adv. gap | s/round |\n|---|---|---|---|---|---|---|---|\n")

    def ms(v, fmt="{:.3f}"):
        return f"{fmt.format(v[0])} ± {fmt.format(v[1])}"

    lines = []
    for key, f in table.items():
        acc = {k: f"{f[f'{k}_before'][0]:.3f} -> {ms(f[f'{k}_after'])}" for k in EVAL_SETS}
        lines.append(f"| {key} | {f['non_object_start'][0]:.1f} -> {ms(f['non_object'], '{:.1f}')} "
                     f"| {f['verdicts'][0]:.1f} of {f['prototypes'][0]} | {acc['clean']} | {acc['decoy']} "
                     f"| {acc['adversarial']} | {ms(f['gap'])} | {f['seconds_per_round'][0]:.0f} |")
    note = (f"\nMean ± spread (population sd) over {seeds} seeds; accuracies before -> after the last-layer re-fit "
            "(the spread is of the 'after' figure); verdicts = rejections over all rounds.\n")
    return head + "\n".join(lines) + "\n" + note


def picture_prefix(family: str, confounder: str) -> str:
    """The pictures' name stem: the family, and the confounder setting unless it is the default square."""
    return family if confounder == "square" else f"{family}_{confounder.replace('-', '_')}"


def pictures(results: dict, table: dict, out: Path, confounder: str = "square") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for family in results:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name in CONDITIONS:
            key = f"{family}/{name}"
            if key in table:
                a.plot(table[key]["non_object_by_round"], marker="o", label=name)
        a.set_xlabel("round")
        a.set_ylabel("non-object prototypes (mean over seeds)")
        a.legend()
        names = [n for n in CONDITIONS if f"{family}/{n}" in table]
        width = 0.12
        for i, k in enumerate(EVAL_SETS):
            for j, when in enumerate(("before", "after")):
                values = [table[f"{family}/{n}"][f"{k}_{when}"][0] for n in names]
                b.bar([x + (2 * i + j - 2.5) * width for x in range(len(names))], values, width,
                      label=f"{k} {when} FT", alpha=0.5 if when == "before" else 1.0)
        b.set_xticks(range(len(names)), names, rotation=20)
        b.set_ylabel("test accuracy")
        b.set_ylim(0, 1)
        b.legend(fontsize=7, ncol=3)
        fig.suptitle(f"{family} on Decoy-MNIST" + ("" if confounder == "square" else f" ({confounder} confounder)"))
        fig.tight_layout()
        path = out / f"{picture_prefix(family, confounder)}_revision.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def prototype_figure(family: str, base: Path, sets: dict, out: Path, confounder: str = "square") -> Path | None:
    """Seed 0's baseline non-object prototypes before and after revision (encoder frozen), side by side:
    ProtoPNet the source image with the patch (yellow) and high-activation (red) boxes, PrototypeDL
    the decoded prototype."""
    from PIL import Image

    before_path, after_path = base / "baseline_run" / "last.pt", base / "revision_frozen" / "revised.pt"
    if not after_path.exists():
        return None
    train = sets["train"].split()
    masks = ObjectMasks.from_decoy(sets["train"])
    columns = []
    for path, label in ((before_path, "before"), (after_path, "after")):
        model, _, _ = load_checkpoint(path)
        table = revision_family_named(family)
        if label == "before":
            ids = [j.prototype_id for j in table.judge(model, masks) if j.non_object] or [0]
        pictures = table.pictures(model, train, out / f"{family}_prototypes_{label}")
        columns.append([Image.open(next((p for p in pictures[j] if "source" in p.name), pictures[j][0])).convert("RGB")
                        for j in ids])
    size = columns[0][0].size
    sheet = Image.new("RGB", (2 * size[0] + 8, len(ids) * (size[1] + 4)), "white")
    for c, column in enumerate(columns):
        for r, picture in enumerate(column):
            sheet.paste(picture.resize(size), (c * (size[0] + 8), r * (size[1] + 4)))
    path = out / f"{picture_prefix(family, confounder)}_prototypes_before_after.png"
    sheet.save(path)
    return path


def shipped_non_object(checkpoint: Path, root: Path) -> None:
    """The simulated user's verdicts on a shipped MNIST model: the object is the source digit's ink."""
    from training.train_protopnet import load_run_data

    model, config, _ = load_checkpoint(checkpoint)
    masks = ObjectMasks.from_split(load_run_data(config, root)["train"])
    judged = revision_family_named(config.model.family).judge(model, masks)
    bad = [j for j in judged if j.non_object]
    print(f"{checkpoint}: {len(bad)} of {len(judged)} prototypes non-object (high-activation box off the digit): "
          f"{[j.prototype_id for j in bad]}")
    for j in judged:
        print(f"  prototype {j.prototype_id}: {j.object_overlap:.3f} of its box on the digit")


def output_dir(confounder: str) -> str:
    """Where a confounder setting's runs go unless --out says: each setting its own directory."""
    return DEFAULT_OUT if confounder == "square" else f"{DEFAULT_OUT}_{confounder.replace('-', '_')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"default {DEFAULT_OUT}, {DEFAULT_OUT}_<confounder> for another confounder")
    parser.add_argument("--confounder", choices=list(CONFOUNDERS), default="square",
                        help="square: 4x4 in a random corner (the issue's); fixed-corner: 4x4 always top left")
    parser.add_argument("--data-root")
    parser.add_argument("--families", nargs="+", default=["protopnet", "prototypedl"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, help="baseline epochs (default: 5 ProtoPNet, 6 PrototypeDL)")
    parser.add_argument("--conditions", nargs="+", default=DEFAULT_CONDITIONS, choices=list(CONDITIONS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs-per-round", type=int, default=1)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shipped", type=Path, help="only judge this shipped MNIST checkpoint's prototypes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = resolve_data_root(args.data_root)
    if args.shipped:
        return shipped_non_object(args.shipped, root)
    out = Path(args.out or output_dir(args.confounder))
    confounder = CONFOUNDERS[args.confounder]
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    started = time.perf_counter()
    for family in args.families:
        for seed in args.seeds:
            base = out / family / f"seed{seed}"
            sets = load_decoy_mnist(root, seed, 1000, args.train_subset, confounder)
            checkpoint = train_baseline(family, seed, args, root, base / "baseline_run")
            done = results.setdefault(family, {}).setdefault(str(seed), {})
            for name in args.conditions:
                if name in done:
                    continue
                print(f"{family} seed {seed} {name} ({(time.perf_counter() - started) / 60:.1f} min so far)",
                      flush=True)
                done[name] = run_condition(name, checkpoint, sets, args, base / name, seed)
                out.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=1))
    table = summarise(results)
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    md = markdown(table, len(args.seeds))
    (out / "results.md").write_text(md)
    print(md)
    for path in pictures(results, table, out, args.confounder):
        print(path)
    for family in args.families:
        seed = args.seeds[0]
        sets = load_decoy_mnist(root, seed, 1000, args.train_subset, confounder)
        sheet = prototype_figure(family, out / family / f"seed{seed}", sets, out, args.confounder)
        if sheet:
            print(sheet)
    print(f"wall time {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
