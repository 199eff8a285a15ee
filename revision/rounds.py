"""Interactive prototype revision (the paper's Alg. 1), masking and pruning, resumable by round.

    Q <- antitypes of the parent (none at first)
    round 0: push, judge                        the parent's figures
    for round r = 1 .. N:
        consult: verdicts on the prototypes as they are now (a verdict file, the simulated user,
                 or a person at the terminal); Q <- Q u {p_j : j rejected}
        train M epochs: CE + clst + sep + L1 (PrototypeDL: its E + R + R1 + R2)
                        + lambda_refine Refine(P, Q) + lambda_con Con(P)
                        (last layer frozen; the encoder frozen or trained by config)
        push, then re-fit the last layer (masked columns held at zero); judge
    Modes "mask" and "prune" run one round without training: the rejected (mask) or the
    automatically pruned (prune, revision/prune.py) prototypes are masked and the last layer re-fitted.

After every round the whole state (model, optimizer, antitypes, verdicts, RNGs, figures) goes to
<out>/revision_last.pt, so an interrupted revision resumes at the next round exactly. Where the
rounds are goes to a `progress` callback as ProgressEvent values; the log lines are for people.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from registry.revision_settings import RevisionSettings, one_line
from registry.verdicts import Verdict, rejected_ids
from revision.families import ObjectMasks, revision_family
from revision.masking import fit_last_layer, mask_columns
from revision.prune import nearest_labels, prune_candidates
from revision.refine import con_cost, con_count, refine_cost
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.config import Config
from training.splits import Split

STATE_FILE = "revision_last.pt"

# consult(round, model, judgements or None) -> the verdicts given in that round
Consult = Callable[[int, torch.nn.Module, list | None], list[Verdict]]


@dataclass(frozen=True)
class ProgressEvent:
    """Where a revision is: epoch `epoch` of `epochs` in round `round` of `rounds`, and the time left."""

    round: int
    rounds: int
    epoch: int
    epochs: int
    stage: str  # "training" after an epoch, "round done" after a round's push and re-fit
    eta_seconds: float | None


Progress = Callable[[ProgressEvent], None]


def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """The time left when `done` of `total` epochs took `elapsed` seconds (None before the first)."""
    if not done:
        return None
    return round(elapsed / done * (total - done), 1) if total > done else 0.0


@dataclass
class RevisionState:
    round: int = 0
    masked: list[int] = field(default_factory=list)
    antitypes: list[dict] = field(default_factory=list)  # {"prototype_id", "round", "vector": [D floats]}
    verdicts: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # one entry per round, round 0 the parent
    finished: bool = False


class RevisionRun:
    """One revision of a model: rounds of consult, train, push, re-fit; resumable after any round."""

    def __init__(self, model, config: Config, revision: RevisionSettings, data: dict[str, Split], out_dir: Path,
                 consult: Consult, masks: ObjectMasks | None = None, eval_sets: dict[str, Split] | None = None,
                 parent_masked: list[int] | None = None, log=print, progress: Progress | None = None):
        self.model, self.config, self.rc, self.data = model, config, revision, data
        self.out_dir, self.consult, self.masks, self.log = Path(out_dir), consult, masks, log
        self.progress, self.started, self.first_round = progress or (lambda event: None), time.monotonic(), 0
        self.eval_sets = eval_sets or {"val": data["val"]}
        self.family = revision_family(model)
        self.state = RevisionState(masked=sorted(parent_masked or []))
        self.device = next(model.parameters()).device
        torch.manual_seed(revision.seed)
        self.shuffle_rng = torch.Generator().manual_seed(revision.seed + 1)
        params = [{"params": [model.prototypes], "lr": revision.lr_prototypes}]
        if not revision.freeze_encoder:
            params.append({"params": [p for m in self.family.encoder_modules(model) for p in m.parameters()],
                           "lr": revision.lr_encoder})
        self.optimizer = torch.optim.Adam(params)
        self.parent_vectors = self.prototype_vectors().clone()
        self.parent_identities = self.family.class_identities(model)
        self._heads, self._before_fine_tuning, self._judged, self._push_fallback = None, None, None, []

    # -- the rounds --------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> RevisionState:
        """Rounds up to revision.rounds (or only up to round stop_after, as an interruption would)."""
        self.started, self.first_round = time.monotonic(), self.state.round  # the ETA counts this run's epochs
        last = min(self.rc.rounds_run, stop_after or self.rc.rounds_run)
        if not self.state.history:
            self.family.push(self.model, self.data["train"].images, self.data["train"].labels)
            self.state.history.append(self.figures(0, verdicts=[], seconds=0.0))
            self.log(self.describe(self.state.history[-1]))
        while self.state.round < last and not self.state.finished:
            started = time.perf_counter()
            r = self.state.round + 1
            judged = self._judged if self._judged is not None else self.judge()  # of the model as it is now
            given = [] if self.rc.mode == "prune" else self.consult(r, self.model, judged)
            self.state.verdicts += [asdict(v) for v in given]
            rejected = [j for j in rejected_ids(given) if j not in self.state.masked]
            if self.rc.mode == "revise" and not rejected and not self.rc.all_rounds:
                self.state.finished = True  # nothing left to revise: Alg. 1 has converged
                self.log(f"round {r}: no prototype rejected, revision done")
                break
            self.revise_round(r, rejected)
            self.state.round = r
            self.state.history.append(self.figures(r, given, time.perf_counter() - started))
            self.log(self.describe(self.state.history[-1]))
            self.report(r, self.epochs_per_round, "round done")
            self.save()
        self.state.finished = self.state.finished or self.state.round >= self.rc.rounds_run
        self.save()
        return self.state

    def revise_round(self, r: int, rejected: list[int]) -> None:
        if self.rc.mode == "mask":
            self.state.masked = sorted(set(self.state.masked) | set(rejected))
        elif self.rc.mode == "prune":
            train = self.data["train"]
            neighbours = nearest_labels(self.model, train.images, train.labels, batch_size=self.rc.eval_batch_size)
            pruned = prune_candidates(neighbours, self.family.class_identities(self.model))
            self.state.masked = sorted(set(self.state.masked) | set(pruned))
        else:
            vectors, sources = self.prototype_vectors(), self.family.sources(self.model)
            self.state.antitypes += [{"prototype_id": j, "round": r, "vector": vectors[j].tolist(),
                                      **({"source": sources[j]} if sources is not None else {})}
                                     for j in rejected]
            for epoch in range(self.rc.epochs_per_round):
                self.log(f"round {r} epoch {epoch + 1}/{self.rc.epochs_per_round}: "
                         + json.dumps({k: round(v, 4) for k, v in self.train_epoch().items()}))
                self.report(r, epoch + 1, "training")
            self._push_fallback = self.family.push(self.model, self.data["train"].images, self.data["train"].labels,
                                                   self.antitype_tensor())
            if self._push_fallback:
                self.log(f"push in round {r}: no patch clear of the antitypes for {self._push_fallback}")
        mask_columns(self.model.last_layer, self.state.masked)
        self._heads = self.eval_heads()
        self._before_fine_tuning = self.accuracies(self._heads)
        self.fit_last_layer()

    @property
    def epochs_per_round(self) -> int:
        """Epochs a round counts for progress: one in mask and prune mode, and when it trains none."""
        return max(1, self.rc.epochs_per_round) if self.rc.mode == "revise" else 1

    def report(self, r: int, epoch: int, stage: str) -> None:
        """Tell the progress callback where the rounds are and the time left."""
        epochs, rounds = self.epochs_per_round, self.rc.rounds_run
        done, total = (r - 1 - self.first_round) * epochs + epoch, (rounds - self.first_round) * epochs
        self.progress(ProgressEvent(r, rounds, epoch, epochs, stage,
                                    eta_seconds(time.monotonic() - self.started, done, total)))

    def antitype_tensor(self) -> torch.Tensor:
        """Q [S, D]. A ProtoPNet antitype stands for the training patch it was rejected on: with the
        encoder trained, that patch is re-encoded by the encoder as it is now (the stored vector goes
        stale as the latent space moves, and the encoder can carry the rejected kind of patch away from
        it). With the encoder frozen, and for PrototypeDL (no source patch), the stored vector, the
        rejected prototype itself, is the antitype (as the paper has it)."""
        if not self.state.antitypes:
            return torch.empty(0, self.prototype_vectors().shape[1], device=self.device)
        if not self.rc.freeze_encoder and all("source" in a for a in self.state.antitypes):
            sources = [a["source"] for a in self.state.antitypes]
            return self.family.encode_sources(self.model, self.data["train"].images, sources).reshape(len(sources), -1)
        return torch.tensor([a["vector"] for a in self.state.antitypes], device=self.device)

    def train_epoch(self) -> dict:
        """One pass of the revision loss over the training split (last layer frozen)."""
        model, rc, train = self.model, self.rc, self.data["train"]
        model.train()
        encoder = self.family.encoder_modules(model)
        for module in encoder:
            module.train(not rc.freeze_encoder)  # frozen: batch-norm statistics stay the parent's too
        trained = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for p in model.parameters():  # only what the optimizer moves (never the last layer, nor a frozen part)
            p.requires_grad_(id(p) in trained)
        antitypes = self.antitype_tensor()
        order = torch.randperm(len(train), generator=self.shuffle_rng)
        sums, n = {}, 0
        for start in range(0, len(train), rc.batch_size):
            idx = order[start:start + rc.batch_size]
            x, y = train.images[idx].to(self.device), train.labels[idx].to(self.device)
            if not rc.freeze_encoder:
                antitypes = self.antitype_tensor()  # where the rejected patches lie in the latent space now
            base, terms = self.family.loss(model, x, y, self.config.loss)
            refine = refine_cost(model.prototypes, antitypes, rc.refine_epsilon)
            con = con_cost(model.prototypes)
            total = base + rc.lambda_refine * refine + rc.lambda_con * con
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            terms |= {"refine": float(refine.detach()), "con": float(con.detach()), "total": float(total.detach())}
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            n += len(idx)
        model.eval()
        return {k: v / max(1, n) for k, v in sums.items()}

    @torch.no_grad()
    def head_inputs(self, split: Split) -> torch.Tensor:
        self.model.eval()
        bs = self.rc.eval_batch_size
        return torch.cat([self.family.head_inputs(self.model, split.images[i:i + bs].to(self.device))
                          for i in range(0, len(split), bs)])

    def fit_last_layer(self) -> dict:
        train = self.data["train"]
        features, labels = self.head_inputs(train), train.labels.to(self.device)
        return fit_last_layer(self.model.last_layer, features, labels, self.state.masked, self.rc.last_layer_epochs,
                              self.rc.lr_last_layer, self.rc.batch_size,
                              self.family.last_layer_penalty(self.model, self.config.loss), self.shuffle_rng)

    # -- figures -----------------------------------------------------------------------------
    def prototype_vectors(self) -> torch.Tensor:
        return self.model.prototypes.detach().reshape(self.model.prototypes.shape[0], -1)

    @torch.no_grad()
    def accuracies(self, heads: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Accuracy on every evaluation set; `heads` (from eval_heads) spares recomputing the features
        when only the last layer changed."""
        heads = heads or self.eval_heads()
        W = self.model.last_layer.weight
        return {name: float((torch.nn.functional.linear(h, W).argmax(1).cpu() == self.eval_sets[name].labels)
                            .float().mean()) for name, h in heads.items()}

    def eval_heads(self) -> dict[str, torch.Tensor]:
        return {name: self.head_inputs(split) for name, split in self.eval_sets.items()}

    def judge(self) -> list | None:
        return self.family.judge(self.model, self.masks) if self.masks is not None else None

    def figures(self, r: int, verdicts: list[Verdict], seconds: float) -> dict:
        judgements = self._judged = self.judge()
        active = [j for j in range(self.prototype_vectors().shape[0]) if j not in self.state.masked]
        after = self.accuracies(self._heads if r > 0 else None)
        before = self._before_fine_tuning if r > 0 else after
        return {
            "round": r,
            "non_object": (sum(1 for j in judgements if j.non_object and j.prototype_id in active)
                           if judgements is not None else None),
            "non_object_ids": ([j.prototype_id for j in judgements if j.non_object and j.prototype_id in active]
                               if judgements is not None else None),
            "decoy_overlap_mean": _mean([j.decoy_overlap for j in judgements]) if judgements else None,
            "verdicts_given": sum(1 for v in verdicts if v.verdict == "reject"),
            "masked": list(self.state.masked),
            "antitypes": len(self.state.antitypes),
            "accuracy_before_fine_tuning": before,
            "accuracy": after,
            "con_outside": con_count(self.model.prototypes),
            "push_fallback": list(self._push_fallback) if r > 0 else [],
            "seconds": seconds,
        }

    def describe(self, h: dict) -> str:
        acc = " ".join(f"{k} {h['accuracy_before_fine_tuning'][k]:.4f}->{v:.4f}" for k, v in h["accuracy"].items())
        return (f"round {h['round']}: non-object {h['non_object']}, rejected {h['verdicts_given']}, "
                f"masked {len(h['masked'])}, antitypes {h['antitypes']}, accuracy (before -> after last layer) "
                f"{acc}, {h['seconds']:.1f}s")

    def comparison(self) -> dict:
        """The revised model against its parent: accuracies, prototypes moved / masked / changed class."""
        moved = (self.prototype_vectors() - self.parent_vectors.to(self.device)).norm(dim=1)
        identities = self.family.class_identities(self.model)
        first, last = self.state.history[0], self.state.history[-1]
        return {
            "accuracy": {"parent": first["accuracy"], "revised": last["accuracy"]},
            "moved": [{"id": j, "distance": float(d)} for j, d in enumerate(moved.tolist()) if d > 1e-6],
            "masked": list(self.state.masked),
            "changed_class": [{"id": j, "from": a, "to": b}
                              for j, (a, b) in enumerate(zip(self.parent_identities, identities, strict=True))
                              if a != b],
            "non_object": {"parent": first["non_object"], "revised": last["non_object"]},
        }

    # -- state -------------------------------------------------------------------------------
    def revision_record(self) -> dict:
        """What a checkpoint of the revised model carries: masked ids, antitypes, verdicts, figures."""
        return {"masked": list(self.state.masked), "config": self.rc.model_dump(mode="json"),
                "state": _plain_state(self.state), "comparison": self.comparison()}

    def lineage(self, parent: str | None = None, parent_checkpoint_sha256: str | None = None) -> dict:
        """The bundle manifest's `lineage` (bundle/manifest.py Lineage) of this revision."""
        return {"parent": parent, "parent_checkpoint_sha256": parent_checkpoint_sha256, "mode": self.rc.mode,
                "rounds": self.state.round, "verdicts": list(self.state.verdicts),
                "antitypes": list(self.state.antitypes), "masked": list(self.state.masked),
                "config": self.rc.model_dump(mode="json"), "comparison": self.comparison(),
                "history": list(self.state.history)}

    def save_revised(self, path: Path, parent: str | None = None, parent_checkpoint_sha256: str | None = None) -> None:
        """The revised model's checkpoint: what `protoserve export` turns into a bundle with lineage."""
        record = {"masked": list(self.state.masked), "lineage": self.lineage(parent, parent_checkpoint_sha256),
                  "class_identities": {str(j): c for j, c in enumerate(self.parent_identities)}}
        save_checkpoint(path, self.model, self.config, self.state.round, {"revision_round": self.state.round},
                        revision=record)

    def save(self) -> None:
        training_state = {"optimizer": self.optimizer.state_dict(), "shuffle_rng": self.shuffle_rng.get_state(),
                          "torch_rng": torch.get_rng_state(), "parent_vectors": self.parent_vectors.cpu(),
                          "parent_identities": list(self.parent_identities),
                          "before_fine_tuning": self._before_fine_tuning}
        save_checkpoint(self.out_dir / STATE_FILE, self.model, self.config, self.state.round,
                        {"revision_round": self.state.round}, training_state, revision=self.revision_record())

    def resume(self) -> None:
        path = self.out_dir / STATE_FILE
        model, _, payload = load_checkpoint(path, expect_config=self.config)
        record, state = payload.get("revision") or {}, payload.get("training_state") or {}
        # A setting added after the state was written takes its default: what the revision did then.
        try:
            started = RevisionSettings.model_validate(record.get("config") or {})
        except ValidationError as e:
            raise CheckpointError(f"{path}: its revision settings do not validate: {one_line(e)}") from None
        if started != self.rc:
            raise CheckpointError(f"{path}: the revision was started with a different revision config "
                                  f"({record.get('config')}); resume with the same settings")
        self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.shuffle_rng.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.parent_vectors = state["parent_vectors"].to(self.device)
        self.parent_identities = list(state["parent_identities"])
        self._before_fine_tuning = state["before_fine_tuning"]
        self.state = RevisionState(**record["state"])
        self.log(f"resumed {path} after round {self.state.round}")


def _plain_state(state: RevisionState) -> dict:
    return asdict(state)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def simulated_consult(judgements_of: Callable | None = None) -> Consult:
    """The simulated user: rejects every prototype its rule judges non-object (accepts the rest)."""

    def consult(r: int, model, judgements: list | None) -> list[Verdict]:
        if judgements is None:
            raise CheckpointError("the simulated user needs object masks (a data set that has them, e.g. decoy_mnist)")
        return [j.as_verdict(r) for j in judgements]

    return consult


def file_consult(verdicts: list[Verdict]) -> Consult:
    """Verdicts from a file: round r uses the verdicts written for round r (round 1 also takes round 0's)."""

    def consult(r: int, model, judgements) -> list[Verdict]:
        return [v for v in verdicts if v.round == r or (r == 1 and v.round == 0)]

    return consult


def load_revision_record(payload: dict) -> dict:
    """A checkpoint payload's revision record ({} for a model never revised)."""
    return payload.get("revision") or {}

