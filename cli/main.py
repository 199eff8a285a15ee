"""`protoserve <verb>`: the one command-line entry point.

Each verb imports its part only when it runs, so verbs for serving and bundles work without
torch installed. A ProtoserveError from any part becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from protoserve.errors import ProtoserveError


def _train(args) -> None:
    from training.config import load_config
    from training.distributed import init_distributed, shutdown_distributed
    from training.families import config_family
    from training.splits import resolve_data_root

    config = load_config(args.config)
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.device is not None:
        config.train.device = args.device
    if args.seed is not None:
        config.train.seed = args.seed
    if args.threads is not None:
        if args.threads < 1:
            raise ProtoserveError(f"--threads {args.threads}: give 1 or more CPU threads")
        config.train.num_threads = args.threads
    if args.init_from is not None:
        config.train.init_from = args.init_from
    if config.train.init_from and not Path(config.train.init_from).is_file():
        raise ProtoserveError(f"{config.train.init_from}: checkpoint not found (train.init_from / --init-from)")
    if args.outlier_exposure is not None:
        config.outlier_exposure.weight = args.outlier_exposure
        config.validate(f"{args.config} with --outlier-exposure {args.outlier_exposure}")
    root = resolve_data_root(args.data_root, config.data.root)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    family = config_family(config)
    if family.distributed:
        init_distributed(config.train.device)  # under torchrun: DistributedDataParallel, push across ranks
    trainer = family.trainer(config, out, data_root=root)
    if args.resume:
        trainer.resume()
    elif (out / "last.pt").exists():
        raise ProtoserveError(f"{out}: holds a run already; pass --resume to continue it or choose another --out")
    trainer.fit()
    if family.distributed:
        shutdown_distributed()
    print(f"run written to {out} (best.pt: best validation accuracy {trainer.best_val_accuracy:.4f})")


def _evaluate(args) -> None:
    import json

    from training.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(Path(args.checkpoint), args.data_root, args.batch_size)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _visualize(args) -> None:
    from training.visualize import visualize_checkpoint

    written = visualize_checkpoint(Path(args.checkpoint), Path(args.out), args.data_root, args.metrics)
    for path in written:
        print(path)


def _ship(args) -> None:
    from training.resumable import ship_run

    print(f"shipped {ship_run(Path(args.run), Path(args.out), args.checkpoint, args.average_from)}")


def _download(args) -> None:
    from training.mnist import download

    download(Path(args.data_root), args.dataset)
    print(f"{args.dataset} written under {args.data_root}")


def _export(args) -> None:
    from export.build import export_bundle
    from export.quality.report import QualityOptions

    if not 0 < args.false_alarm_rate < 1:
        raise SystemExit(f"--false-alarm-rate {args.false_alarm_rate} is not between 0 and 1")
    quality = None if args.no_quality else QualityOptions(sample=args.quality_sample)
    result = export_bundle(Path(args.checkpoint), Path(args.out), args.name, args.version, args.data_root,
                           force=args.force, false_alarm_rate=args.false_alarm_rate, quality=quality,
                           parent=Path(args.parent) if args.parent else None)
    m = result.bundle.manifest
    print(f"bundle {m.tag} written to {args.out} (test accuracy {m.metrics.test_accuracy:.4f})")


def _report(args) -> None:
    from export.quality.report import QualityOptions, write_quality_report

    if args.sample < 1:
        raise ProtoserveError(f"--sample is {args.sample}; it must be at least 1")
    options = QualityOptions(sample=args.sample, seed=args.seed, judge=Path(args.judge) if args.judge else None)
    report = write_quality_report(Path(args.bundle), args.data_root, options, progress=not args.quiet)
    for name, f in report.figures.items():
        reference = "" if f.reference is None else f"  (reference {f.reference:.4g}: {f.reference_kind})"
        print(f"{name:34s} {f.value if f.value is None else format(f.value, '.4g')}{reference}")
    print(f"quality written into {Path(args.bundle) / 'manifest.json'}, {report.picture} and {report.page}")


# `protoserve revise` flags that set a RevisionSettings field (registry/revision_settings.py holds the
# defaults and help); a flag left out takes the field's default.
SETTINGS_FLAGS = ("mode", "rounds", "all_rounds", "epochs_per_round", "lambda_refine", "lambda_con", "lr_prototypes",
                  "seed", "train_subset")


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    from registry.revision_settings import RevisionSettings

    fields = RevisionSettings.model_fields
    for name in SETTINGS_FLAGS:
        f = fields[name]
        flag, text = "--" + name.replace("_", "-"), f"{f.description} (default: {f.default})"
        if f.annotation is bool:
            p.add_argument(flag, action="store_true", default=None, help=text)
        elif name == "mode":
            p.add_argument(flag, choices=["mask", "prune", "revise"], help=text)
        else:
            p.add_argument(flag, type=float if f.annotation is float else int, help=text)
    p.add_argument("--freeze-encoder", dest="freeze_encoder", action="store_true", default=None,
                   help=f"{fields['freeze_encoder'].description} (the default)")
    p.add_argument("--train-encoder", dest="freeze_encoder", action="store_false",
                   help="train the encoder with the prototypes")


def _revise(args) -> None:
    from registry.revision_settings import RevisionSettings
    from revision.revise import Consultation, resolve_parent, revise

    given = {name: getattr(args, name) for name in (*SETTINGS_FLAGS, "freeze_encoder")}
    settings = RevisionSettings.of(**{k: v for k, v in given.items() if v is not None})
    parent = resolve_parent(args.checkpoint, args.bundle)
    consultation = Consultation.from_flags(args.verdicts, args.simulate, args.interactive, args.reviewer)
    result = revise(parent, settings, consultation, Path(args.out), data_root=args.data_root, name=args.name,
                    version=args.version, resume=args.resume, export=not args.no_export)
    if result is None:
        print(f"revised checkpoint written to {Path(args.out) / 'checkpoint.pt'}")
        return
    m = result.bundle.manifest
    print(f"bundle {m.tag} written to {Path(args.out) / 'bundle'} (parent {m.lineage.parent}, mode {m.lineage.mode}, "
          f"{m.lineage.rounds} round(s), masked {len(m.lineage.masked)}, test accuracy {m.metrics.test_accuracy:.4f})")


def _verify(args) -> None:
    from bundle.runtime import verify_bundle

    bundle, probe = verify_bundle(Path(args.bundle), device=args.device)
    worst = max(probe.max_abs_diff.values(), default=0.0)
    print(f"{args.bundle}: ok ({bundle.manifest.tag}, {len(bundle.manifest.files)} files checked, golden probe "
          f"of {probe.images} images on {probe.provider}, max |diff| {worst:.2e})")


def _import(args) -> None:
    from bundle.store import import_bundle

    stored = import_bundle(Path(args.bundle), force=args.force)
    print(f"imported {stored.tag} into the BentoML model store ({stored.path})")


def _models(args) -> None:
    from bundle.store import bentoml_home, list_models

    rows = list_models()
    if not rows:
        print(f"no protoserve models in {bentoml_home() / 'models'}")
    for r in rows:
        accuracy = f"{r.test_accuracy:.4f}" if r.test_accuracy is not None else "-"
        print(f"{r.tag:40s} {r.family:12s} test accuracy {accuracy}  created {r.created_at}")


def _score(args) -> None:
    import time

    from scoring.job import CHUNK_SIZE, JobSpec
    from scoring.metrics import publish
    from scoring.run import run_scoring_job

    if args.pictures_for and not args.pictures:
        raise ProtoserveError("--pictures-for needs --pictures DIR (the folder for the pictures)")
    spec = JobSpec(model=args.model, inputs=args.input, output=args.output, top_k=args.top_k,
                   chunk_size=CHUNK_SIZE if args.chunk_size is None else args.chunk_size, workers=args.workers,
                   device=args.device, image_column=args.image_column, canonicalize=args.canonicalize,
                   abstain=args.abstain, pictures=Path(args.pictures) if args.pictures else None,
                   pictures_for=args.pictures_for or "errors")
    started = time.time()
    try:
        summary = run_scoring_job(spec, engine=args.engine, restart=args.restart, progress=not args.quiet,
                          ray_address=args.ray_address)
    except ProtoserveError:
        if args.pushgateway or args.metrics_file:
            publish(None, None, time.time() - started, succeeded=False, pushgateway=args.pushgateway,
                    metrics_file=args.metrics_file, grouping_key={"output": Path(args.output).name})
        raise
    if args.pushgateway or args.metrics_file:
        publish(summary.images - summary.failed, summary.failed, summary.seconds, succeeded=True,
                pushgateway=args.pushgateway, metrics_file=args.metrics_file,
                grouping_key={"output": Path(args.output).name})
    print(summary.line())


def _explain(args) -> int:
    from cli.explain import explain_files

    return explain_files(args.images, Path(args.bundle) if args.bundle else None, Path(args.out) if args.out else None,
                         canonicalize=args.canonicalize, top_k=args.top_k, abstain=args.abstain, as_json=args.json,
                         device=args.device)


def _serve(args) -> None:
    from bundle.manifest import read_bundle
    from protoserve.settings import Settings, environ

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    if args.bundle:
        env.update(environ(bundle=Path(args.bundle).resolve()))
    if args.model:
        env.update(environ(model_tag=args.model))
    if args.registry:
        env.update(environ(registry=Path(args.registry).resolve()))
    if args.registry_db:
        env.update(environ(registry_db=args.registry_db))
    env.update(environ(device=args.device, workers=args.workers))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    served = Settings.from_env(env)  # a bad PROTOSERVE_* value: one readable line before BentoML starts
    if served.registry is not None:
        from registry.versions import Registry

        read_bundle(Registry(served.registry, served.registry_db).active_bundle())  # one readable line first
    elif not args.model:
        from inference.model import DEFAULT_BUNDLE

        read_bundle(served.bundle or DEFAULT_BUNDLE)  # one readable line before BentoML starts
    os.chdir(repo)
    command = [sys.executable, "-m", "bentoml", "serve", "service.api:Protoserve", "--host", args.host,
               "--port", str(args.port)]
    os.execve(sys.executable, command, env)


def _registry(args) -> None:
    import json

    from registry.versions import open_registry

    registry = open_registry(args.registry, args.registry_db)
    if args.action == "register":
        if args.if_missing and (same := _registered_already(registry, args.bundle)) is not None:
            print(f"{same}: registered already, the same bundle; nothing done")
            return
        row = registry.register(args.bundle, args.checkpoint, parent=args.parent,
                                status="candidate" if args.candidate else "registered")
        print(f"registered {row.name}:{row.version} ({row.family}) at {row.bundle}")
        if args.promote:
            print(f"active: {registry.promote(row.version, actor='cli').version}")
    elif args.action == "list":
        active = registry.store.active()
        for r in registry.store.versions():
            mark = "*" if r.version == active.version else ("-" if r.version == active.previous else " ")
            accuracy = (r.metrics or {}).get("test_accuracy")
            print(f"{mark} {r.version:20s} {r.name:24s} {r.status:10s} parent {r.parent or '-':12s} "
                  f"test accuracy {accuracy if accuracy is not None else '-'}  {r.created_at}")
        print(f"active {active.version or '-'}, previous {active.previous or '-'}, generation {active.generation}")
    elif args.action == "promote":
        active = registry.promote(args.version, actor="cli")
        print(f"active: {active.version} (previous {active.previous}, generation {active.generation})")
    elif args.action == "rollback":
        active = registry.rollback(actor="cli")
        print(f"active: {active.version} (previous {active.previous}, generation {active.generation})")
    elif args.action == "neighbours":
        from revision.neighbours import write_neighbours

        version = args.version or registry.store.active().version
        print(f"written {write_neighbours(registry, version, args.data_root, limit=args.images)}")
    elif args.action == "verdicts":
        from registry.verdicts import FIELDS, parse_verdict

        version = args.version or registry.store.active().version
        for row in registry.store.verdicts(version):  # the JSON-lines format `protoserve revise --verdicts` reads
            print(parse_verdict({k: row[k] for k in FIELDS}, f"verdict {row['id']}").to_json())
    elif args.action == "lineage":
        version = args.version or registry.store.active().version
        for r in registry.store.lineage(version):
            print(json.dumps({"version": r.version, "parent": r.parent, "status": r.status,
                              "lineage": r.lineage}))


def _registered_already(registry, bundle: str) -> str | None:
    """name:version when the bundle's version is in the registry with the same manifest; None when it is
    not registered; a RegistryError when that version holds another bundle (versions are immutable)."""
    from bundle.manifest import read_bundle
    from registry.errors import RegistryError

    manifest = read_bundle(bundle).manifest
    if registry.store.find_version(manifest.version) is None:
        return None
    if read_bundle(registry.bundle_path(manifest.version)).manifest.manifest_sha256 != manifest.manifest_sha256:
        raise RegistryError(f"version {manifest.version!r} is registered already with another bundle than {bundle}")
    return manifest.tag


def _worker(args) -> None:
    from registry.versions import open_registry
    from worker.loop import run_worker

    done = run_worker(open_registry(args.registry, args.registry_db), args.data_root, once=args.once,
                      poll_seconds=args.poll, lease=args.lease)
    print(f"protoserve worker: {done} job(s) run")


def _review(args) -> None:
    from cli.review import run_review

    run_review(Path(args.bundle), Path(args.checkpoint), Path(args.registry), args.port, args.data_root, args.host)


def _demo(args) -> None:
    from service.demo import run_demo

    run_demo(Path(args.out), Path(args.bundle) if args.bundle else None, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protoserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _training_verbs(sub)
    _bundle_verbs(sub)
    _score_verb(sub)
    _serving_verbs(sub)
    return parser


def _training_verbs(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--data-root", help="folder with the IDX files (default: $PROTOSERVE_DATA_ROOT)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--device", help="override train.device (cpu, cuda, auto)")
    p.add_argument("--seed", type=int, help="override train.seed (another run of the same schedule)")
    p.add_argument("--threads", type=int, help="override train.num_threads (CPU threads; the results do not "
                   "depend on it beyond float rounding, and --resume may change it)")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (a fine-tune; sets train.init_from)")
    p.add_argument("--outlier-exposure", type=float, metavar="WEIGHT",
                   help="override outlier_exposure.weight: the margin term on non-digit outliers "
                   "(docs/outlier_exposure.md; 0 turns it off)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="accuracy on each split and the family's own figures (reconstruction "
                       "error, push purity)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--out", help="also write the figures as JSON here")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("visualize", help="PNG pictures of the paper's figures (PrototypeDL) and the training "
                       "curves")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--data-root")
    p.add_argument("--metrics", help="metrics.jsonl for the curves (default: beside the checkpoint)")
    p.set_defaults(func=_visualize)

    p = sub.add_parser("ship", help="copy a finished run into a model folder: checkpoint.pt without optimizer "
                       "state, config.yaml, metrics.jsonl and (ProtoPNet) the push pictures of that checkpoint")
    p.add_argument("--run", required=True, help="the run folder (protoserve train --out)")
    p.add_argument("--out", required=True, help="the model folder to write, e.g. models/protopnet_mnist")
    p.add_argument("--checkpoint", default="best.pt", help="which checkpoint of the run (default best.pt)")
    p.add_argument("--average-from", type=int, metavar="EPOCH",
                   help="instead, the mean of the run's epoch checkpoints from EPOCH to the last (a weight "
                   "average over the schedule's tail; PrototypeDL only)")
    p.set_defaults(func=_ship)

    p = sub.add_parser("download", help="fetch MNIST or Fashion-MNIST with torchvision's downloader")
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    p.set_defaults(func=_download)


def _bundle_verbs(sub) -> None:
    p = sub.add_parser("export", help="checkpoint -> model bundle (ONNX graphs, manifest, prototype pictures)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--name", default="prototypedl-mnist", help="model name (lowercase, digits, - _ .)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--data-root", help="IDX files for the parity check (default: $PROTOSERVE_DATA_ROOT)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--parent", help="the bundle this checkpoint was retrained to replace (lineage mode retrain)")
    p.add_argument("--no-quality", action="store_true", help="skip the explanation-quality report")
    p.add_argument("--quality-sample", type=int, default=500, help="validation images for the report's "
                   "map-based figures (default 500)")
    p.add_argument("--false-alarm-rate", type=float, default=0.01,
                   help="share of in-domain (validation) images the out-of-domain threshold may flag (default 0.01)")
    p.set_defaults(func=_export)

    p = sub.add_parser("report", help="the explanation-quality report of a bundle, on the validation split, "
                       "written into its manifest (quality), quality.png and quality.html")
    p.add_argument("bundle")
    p.add_argument("--data-root", help="the data the model was trained on (default: $PROTOSERVE_DATA_ROOT)")
    p.add_argument("--sample", type=int, default=500, help="validation images drawn for the map-based "
                   "figures (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, noise and random references")
    p.add_argument("--judge", help="PrototypeDL: the independent model's bundle that classifies the decoded "
                   "prototypes (default: models/protopnet_mnist/bundle)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_report)


    p = sub.add_parser("revise", help="revise a model from verdicts on its prototypes (mask, prune or Alg. 1 "
                       "rounds with antitypes) and export the new version with its lineage")
    p.add_argument("--checkpoint", help="the parent checkpoint (default with --bundle: checkpoint.pt beside it)")
    p.add_argument("--bundle", help="the parent bundle (its name:version becomes the lineage's parent)")
    p.add_argument("--out", required=True, help="folder for the revision state, checkpoint.pt and bundle/")
    p.add_argument("--verdicts", help="JSON-lines verdict file (read; with --interactive/--simulate: appended to)")
    p.add_argument("--simulate", action="store_true", help="the simulated user judges (data with object masks)")
    p.add_argument("--interactive", action="store_true", help="judge each prototype at the terminal")
    p.add_argument("--reviewer", default=os.environ.get("USER", "user"), help="source name for --interactive")
    _add_settings_flags(p)
    p.add_argument("--name", help="bundle name (default: the parent's)")
    p.add_argument("--version", help="bundle version (default: the parent's version + '-' + mode)")
    p.add_argument("--data-root")
    p.add_argument("--resume", action="store_true", help="continue the revision in --out after its last round")
    p.add_argument("--no-export", action="store_true", help="write checkpoint.pt only")
    p.set_defaults(func=_revise)

    p = sub.add_parser("verify", help="check a bundle: schema, checksums, golden probe through ONNX Runtime")
    p.add_argument("bundle")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.set_defaults(func=_verify)

    p = sub.add_parser("import", help="verify a bundle and add it to the BentoML model store as name:version")
    p.add_argument("bundle")
    p.add_argument("--force", action="store_true", help="replace the same name:version if present")
    p.set_defaults(func=_import)

    p = sub.add_parser("models", help="list the bundles in the BentoML model store ($BENTOML_HOME)")
    p.set_defaults(func=_models)


def _score_verb(sub) -> None:
    p = sub.add_parser("score", help="batch scoring: one row per input (prediction, nearest prototypes, error), "
                       "resumable")
    p.add_argument("--model", required=True, help="a bundle directory or a BentoML store tag (name:version)")
    p.add_argument("--input", required=True, nargs="+", help="folders of image files (recursive), IDX files, "
                   ".npy/.npz arrays, Parquet files with an image-bytes column; or s3://bucket/prefix (the image "
                   "objects under it, in key order) or s3://bucket/key of one such file")
    p.add_argument("--output", required=True, help="out.parquet or out.jsonl (chunks kept in <output>.job/), or "
                   "s3://bucket/prefix/out.parquet: the job's plan and committed chunks are kept in the bucket "
                   "under <output>.job/ (a re-run resumes from them), staged on this machine under "
                   "$PROTOSERVE_CACHE_DIR/scoring/; endpoint $PROTOSERVE_S3_ENDPOINT_URL, credentials the AWS "
                   "variables")
    p.add_argument("--workers", type=int, default=0, help="parallel ONNX Runtime sessions (local engine) or "
                   "Ray actors (default: one per core)")
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--ray-address", help="Ray cluster to join: the head's host:port, ray://head:10001 or auto "
                   "(default: $RAY_ADDRESS, else a local Ray started for the job)")
    p.add_argument("--top-k", type=int, default=3, help="nearest prototypes per row")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="inputs per committed chunk (default 4096: scoring/job.py CHUNK_SIZE)")
    p.add_argument("--image-column", help="Parquet column of image bytes (default: the first binary column)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--restart", action="store_true", help="discard an earlier job's chunks and output, start over")
    p.add_argument("--pushgateway", help="push job metrics to this Prometheus Pushgateway (host:port or URL)")
    p.add_argument("--metrics-file", help="write job metrics here for the node exporter's textfile collector "
                   "(*.prom)")
    p.add_argument("--canonicalize", action="store_true", help="make photo-like pictures the way the training "
                   "images were made first (as /explain's \"canonicalize\"; the model's input.canonical)")
    p.add_argument("--abstain", action="store_true", help="out-of-domain rows withhold their label (label and "
                   "class_name null, abstained true), as /explain's \"abstain\"")
    p.add_argument("--pictures", metavar="DIR", help="write the explanation picture of the rows --pictures-for "
                   "names into DIR (<index>.png; the row's picture column names it)")
    p.add_argument("--pictures-for", choices=["errors", "out-of-domain", "all"],
                   help="which rows get a picture: errors (prediction differs from the input's class: an IDX labels "
                   "file beside the images, a class sub-folder), out-of-domain, all (default: errors)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_score)

    p = sub.add_parser("explain", help="explain local image files without a server: the /explain answer and its "
                       "picture for each")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--bundle", help="bundle folder (default: $PROTOSERVE_BUNDLE, else the shipped model)")
    p.add_argument("--out", help="where the pictures go: a .png file for one IMAGE, else a folder "
                   "(default: runs/explain/, <image name>.png)")
    p.add_argument("--canonicalize", action="store_true", help="make photo-like pictures the way the training "
                   "images were made first (as /explain's \"canonicalize\")")
    p.add_argument("--top-k", type=int, help="nearest prototypes (default 3)")
    p.add_argument("--abstain", action="store_true", help="an out-of-domain answer withholds its label")
    p.add_argument("--json", action="store_true", help="print each answer as one line of JSON (the /explain body "
                   "with \"input\" and \"picture\") instead of text")
    p.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    p.set_defaults(func=_explain)


REGISTRY_DB_HELP = ("the registry's database, sqlite:///PATH or postgresql://... (default: $PROTOSERVE_REGISTRY_DB, "
                    "else registry.sqlite in the registry directory); a password is better kept in the variable "
                    "or libpq's PGPASSWORD than on a command line")


def _serving_verbs(sub) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP with BentoML (predict, explain, metadata, /metrics)")
    p.add_argument("--bundle", help="bundle folder (default: $PROTOSERVE_BUNDLE, else the shipped model)")
    p.add_argument("--model", help="name:version in the BentoML model store instead of a folder")
    p.add_argument("--registry", help="follow the active version of this registry (default: $PROTOSERVE_REGISTRY); "
                   "promote and rollback switch every worker without a restart")
    p.add_argument("--registry-db", help=REGISTRY_DB_HELP)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--workers", type=int, default=2, help="API worker processes")
    p.set_defaults(func=_serve)

    p = sub.add_parser("registry", help="model versions: register, list, promote, rollback, lineage")
    p.add_argument("--registry", help="registry directory (default: $PROTOSERVE_REGISTRY)")
    p.add_argument("--registry-db", help=REGISTRY_DB_HELP)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("register", help="verify a bundle and add it (with its checkpoint) as a version")
    a.add_argument("bundle")
    a.add_argument("--checkpoint", help="the checkpoint it was exported from (needed to revise it later)")
    a.add_argument("--parent", help="the version it was revised from")
    a.add_argument("--promote", action="store_true", help="make it active at once")
    a.add_argument("--candidate", action="store_true",
                   help='register it as a candidate (status "candidate", as a revision job\'s result): a version '
                        'waiting for a person to promote it, "released" once promoted')
    a.add_argument("--if-missing", action="store_true",
                   help="do nothing when this version is registered already with the same bundle (a set-up step "
                        "run again); another bundle under that version is still refused")
    actions.add_parser("list", help="the versions; * active, - previous")
    a = actions.add_parser("promote", help="verify a version and make it active")
    a.add_argument("version")
    actions.add_parser("rollback", help="make the previous version active again")
    a = actions.add_parser("neighbours", help="the training images nearest to each prototype of a version "
                           "(for the review page; needs the training install and data)")
    a.add_argument("version", nargs="?")
    a.add_argument("--data-root", help="default: $PROTOSERVE_DATA_ROOT")
    a.add_argument("--images", type=int, default=10_000, help="search the first N training images")
    a = actions.add_parser("verdicts", help="a version's verdicts (default: the active one's) as JSON lines")
    a.add_argument("version", nargs="?")
    a = actions.add_parser("lineage", help="a version (default: the active one) and its ancestors, as JSON lines")
    a.add_argument("version", nargs="?")
    p.set_defaults(func=_registry)

    p = sub.add_parser("worker", help="run the registry's revision jobs (needs the training install)")
    p.add_argument("--registry", help="registry directory (default: $PROTOSERVE_REGISTRY)")
    p.add_argument("--registry-db", help=REGISTRY_DB_HELP)
    p.add_argument("--data-root", help="the training data (default: $PROTOSERVE_DATA_ROOT)")
    p.add_argument("--once", action="store_true", help="run the queued jobs, then exit")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks for a queued job")
    p.add_argument("--lease", type=float,
                   help="seconds a job stays ours without a heartbeat (default: PROTOSERVE_JOB_LEASE_SECONDS or 60)")
    p.set_defaults(func=_worker)

    p = sub.add_parser("review", help="the review page on one machine: registry, service and revision worker")
    p.add_argument("--bundle", default="models/protopnet_mnist/bundle", help="first version if the registry is empty")
    p.add_argument("--checkpoint", default="models/protopnet_mnist/checkpoint.pt")
    p.add_argument("--registry", default="runs/review/registry")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to open the page from a phone on the same network")
    p.add_argument("--data-root", help="training data for revisions (default: $PROTOSERVE_DATA_ROOT)")
    p.set_defaults(func=_review)

    p = sub.add_parser("demo", help="start the service, predict and explain test digits, write the picture, stop")
    p.add_argument("--bundle", help="bundle folder (default: the shipped model)")
    p.add_argument("--out", default="runs/demo/explanation.png")
    p.add_argument("--port", type=int, help="default: a free port")
    p.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)  # None, or the exit code of a verb that went on past bad inputs
    except ProtoserveError as e:
        print(f"protoserve {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"protoserve {args.verb}: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
