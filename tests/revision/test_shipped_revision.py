"""The shipped Decoy-MNIST ProtoPNet and its revised version: both verify, and the revised one's
lineage names its parent, keeps every prototype id and records the verdicts that made it."""

from pathlib import Path

from bundle.runtime import verify_bundle
from registry.verdicts import read_verdicts, rejected_ids

MODEL = Path(__file__).resolve().parents[2] / "models" / "protopnet_decoy_mnist"


def test_revised_bundle_traces_back_to_its_parent_and_verdicts():
    parent, _ = verify_bundle(MODEL / "bundle")
    revised, _ = verify_bundle(MODEL / "revised" / "bundle")
    p, r = parent.manifest, revised.manifest
    assert parent.manifest.lineage is None
    assert r.name == p.name and r.version != p.version
    assert r.lineage.parent == p.tag and r.lineage.mode == "revise"
    assert [row.id for row in r.prototypes] == [row.id for row in p.prototypes]
    file_verdicts = read_verdicts(MODEL / "revised" / "verdicts.jsonl")
    assert [v.to_json() for v in file_verdicts] == [read_verdicts_line(v) for v in r.lineage.verdicts]
    antitypes = {(a["round"], a["prototype_id"]) for a in r.lineage.antitypes}
    assert antitypes == {(k, j) for k in range(1, r.lineage.rounds + 1) for j in rejected_ids(file_verdicts, round=k)}
    assert r.lineage.comparison["non_object"]["revised"] == 0
    assert all(a["source"][0] >= 0 for a in r.lineage.antitypes)  # the training patch each antitype stands for
    assert p.domain is not None and r.domain is not None  # both calibrated for out-of-domain answers


def read_verdicts_line(raw: dict) -> str:
    from registry.verdicts import parse_verdict

    return parse_verdict(raw, "lineage").to_json()
