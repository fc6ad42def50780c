"""The `bulklabel` command line: label, finetune, run a spec file, demo, query, similar, report, schema."""

from __future__ import annotations

import argparse
import json
import logging
import reprlib
import sys
import traceback
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from jobs.errors import EXIT_FAILED, EXIT_INTERNAL, exit_code_for
from jobs.kinds import job_spec_json_schema, kind_of, load_job_spec, parse_job_spec
from jobs.service.commands import add_service_commands, normalise_argv
from schemas.finetune import FinetuneDataSpec, FinetuneJobSpec
from schemas.masking import MASK, is_secret_key, mask_secrets, mask_text
from schemas.specs import LabelJobSpec, ModelSpec, OutputOptions, StorageOptions

log = logging.getLogger("bulklabel")

EXIT_INTERRUPTED = 130  # the shell's convention for Ctrl-C
_MAX_MESSAGE_CHARS = 2000


def main(argv: list[str] | None = None) -> int:
    """Run a command; an error ends it with one line on stderr naming the problem and the exit code of its kind
    (jobs.errors), never a traceback (that is logged at DEBUG: `-v` shows it)."""
    args = _parser().parse_args(normalise_argv(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        _report("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error ends in one line and its exit code, bugs included
        # The traceback's messages may hold what the user typed (a pydantic error echoes its input): masked too.
        log.debug("the command failed:\n%s", mask_text("".join(traceback.format_exception(exc))).rstrip())
        code = exit_code_for(exc)
        _report(mask_text(_describe_error(exc, code, getattr(args, "spec", None))))
        return code


def _describe_error(exc: Exception, code: int, spec_path: Path | None) -> str:
    if isinstance(exc, ValidationError):
        return f"invalid job spec{f' {spec_path}' if spec_path else ''}: {_describe_validation(exc)}"
    if code == EXIT_INTERNAL:
        return f"internal error: {type(exc).__name__}: {_one_line(exc)} (run with -v for the traceback)"
    if code == EXIT_FAILED:
        return str(exc)  # the job's summary, one line per fact
    return f"error: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    """The message on one line, bounded: storage and library errors may carry multi-line or huge details."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[:_MAX_MESSAGE_CHARS] + "..."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bulklabel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    label = sub.add_parser("label", help="label the images under --input, write Parquet to --output")
    _label_arguments(label)
    label.set_defaults(handler=_cmd_label)

    tune = sub.add_parser("finetune", help="fine-tune a torchvision model on labelled images → <output>/vN/")
    _finetune_arguments(tune)
    tune.set_defaults(handler=_cmd_finetune)

    run = sub.add_parser("run", help="run a job spec file (YAML or JSON), of any kind")
    run.add_argument("spec", type=Path)
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(handler=_cmd_run)

    demo = sub.add_parser("demo", help="label the bundled sample photos with MobileNetV2 on this machine")
    demo.add_argument("--output", default="demo-output", help="where to write the Parquet output")
    demo.set_defaults(handler=_cmd_demo)

    query = sub.add_parser("query", help="SQL (DuckDB) over a label output's committed rows, as the view `labels`")
    query.add_argument("output", help="the label job's output: local folder or s3://bucket/prefix")
    query.add_argument("sql", help='e.g. "SELECT label, count(*) FROM labels GROUP BY ALL ORDER BY 2 DESC"')
    query.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"],
                       help="json: JSON Lines, one object per row; parquet needs --out")  # fmt: skip
    query.add_argument("--out", type=Path, help="write the result to this local file (csv, json, parquet)")
    query.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    query.set_defaults(handler=_cmd_query)

    similar = sub.add_parser("similar", help="the images nearest KEY by embedding cosine, the image first")
    similar.add_argument("output", help="the label job's output: local folder or s3://bucket/prefix")
    similar.add_argument("key", help="a row's key, the URI of the image file it came from, or its image_id")
    similar.add_argument("-k", type=int, default=10, help="how many rows to show, the image itself included")
    similar.add_argument("--index", default="auto", choices=["auto", "always", "never"],
                         help="auto: exact on small outputs, a cached ANN index (faiss) on large ones")  # fmt: skip
    similar.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    similar.set_defaults(handler=_cmd_similar)

    report = sub.add_parser("report", help="one self-contained HTML page: labels, confidence, throughput, errors, "
                            "slowest shards, least-confident thumbnails")  # fmt: skip
    report.add_argument("output", help="the label job's output: local folder or s3://bucket/prefix")
    report.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file to write")
    report.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    report.set_defaults(handler=_cmd_report)

    compact = sub.add_parser("compact", help="merge a finished label output's small data files into files of a "
                             "target size (one atomic switch; resume and readers unaffected)")  # fmt: skip
    compact.add_argument("output", help="the label job's output: local folder or s3://bucket/prefix")
    compact.add_argument("--target-mb", type=int, default=OutputOptions.model_fields["target_file_mb"].default,
                         help="the size each merged file aims at")  # fmt: skip
    compact.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                         help="wait this long for another writer of the output (a job, a compaction) to finish; "
                         "then refused, naming it (exit 3)")  # fmt: skip
    compact.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    compact.set_defaults(handler=_cmd_compact)

    schema = sub.add_parser("schema", help="print the job spec's JSON Schema")
    schema.set_defaults(handler=_cmd_schema)
    add_service_commands(sub, _label_arguments, _finetune_arguments, _label_spec, _finetune_spec)
    return parser


def _label_arguments(label: argparse.ArgumentParser) -> None:
    label.add_argument("--input", required=True, help="local folder/manifest or s3://bucket/prefix")
    label.add_argument("--output", required=True, help="local folder or s3://bucket/prefix")
    output = OutputOptions.model_fields
    label.add_argument("--output-format", default=output["format"].default, choices=["parquet", "delta"],
                       help="parquet: Parquet files; delta: also a Delta table in OUTPUT/table")  # fmt: skip
    label.add_argument("--compact", default=output["compact"].default, choices=["auto", "never"],
                       help="auto: merge many small data files at the end of the job")  # fmt: skip
    label.add_argument("--target-file-mb", type=int, default=output["target_file_mb"].default,
                       help="the size compaction aims each data file at")  # fmt: skip
    label.add_argument("--model", required=True, help="torchvision model name, e.g. resnet50, mobilenet_v2")
    label.add_argument("--weights", default="DEFAULT", help="weights name (IMAGENET1K_V1), file path/URI, or 'none'")
    label.add_argument("--weights-dir", help="folder of weight files for air-gapped machines")
    label.add_argument("--format", default="auto", choices=["auto", "tar", "files", "manifest", "parquet"])
    label.add_argument("--image-field", help="tar samples with several images: the one to label, e.g. 'jpg;png'")
    label.add_argument("--decoder", default="auto", choices=["auto", "pillow", "torchvision", "nvjpeg"])
    label.add_argument("--files-per-shard", type=int, default=1000)
    label.add_argument("--top-k", type=int, help="classes kept per image (default 5, or all if fewer)")
    label.add_argument("--batch-size", type=int, default=32)
    label.add_argument("--workers", type=int, default=0, help="model replicas (0: one per GPU, or 1 on CPU)")
    label.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    label.add_argument("--compile", default=str(ModelSpec.model_fields["compile"].default).lower(),
                       choices=["false", "true", "auto"],
                       help="torch.compile the model (auto: when the job is large enough to repay it)")  # fmt: skip
    label.add_argument("--no-embeddings", action="store_true", help="do not store penultimate-layer features")
    label.add_argument("--probabilities", action="store_true",
                       help=LabelJobSpec.model_fields["probabilities"].description)  # fmt: skip
    label.add_argument("--shared-storage", action="store_true",
                       help="local paths are on storage every Ray node mounts at the same path (NFS)")  # fmt: skip
    label.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    label.add_argument("--job-id", help="defaults to a hash of input, output, model and top-k")
    label.add_argument("--quiet", action="store_true", help="no progress bar")


def _finetune_arguments(tune: argparse.ArgumentParser) -> None:
    tune.add_argument("--data", required=True, help="folder/s3 prefix with a sub-folder per class, or a CSV/Parquet "
                      "labels file (key, label)")  # fmt: skip
    tune.add_argument("--base", required=True, help="torchvision model name, e.g. mobilenet_v2, resnet50")
    tune.add_argument("--weights", default="DEFAULT", help="weights to start from (IMAGENET1K_V1), a file, or 'none'")
    tune.add_argument("--weights-dir", help="folder of weight files for air-gapped machines")
    tune.add_argument("--output", required=True, help="folder or s3://bucket/prefix; each run adds v1, v2, ...")
    training, data = FinetuneJobSpec.model_fields["training"].default, FinetuneDataSpec.model_fields
    tune.add_argument("--method", default=training.method, choices=["lp-ft", "full", "linear-probe"],
                      help="lp-ft: fit the head on frozen features, then train every layer from it; full: "
                      "every layer from a random head; linear-probe: a convex fit on embeddings")  # fmt: skip
    tune.add_argument("--epochs", type=int, default=training.epochs)
    tune.add_argument("--min-steps", type=int, default=training.min_steps,
                      help="optimizer steps at least: small sets repeat within an epoch")  # fmt: skip
    tune.add_argument("--no-group-duplicates", action="store_true",
                      help="split without keeping near-duplicate images on one side")  # fmt: skip
    tune.add_argument("--duplicate-cosine", type=float, default=data["duplicate_cosine"].default,
                      help="embedding cosine from which two images of a class are near-duplicates")  # fmt: skip
    tune.add_argument("--batch-size", type=int, default=32)
    tune.add_argument("--lr", type=float, default=1e-3, help="the new head's peak learning rate")
    tune.add_argument("--image-size", type=int, help="training crop side (default: the weights' eval crop)")
    tune.add_argument("--val-data", help="a separate validation set (else a stratified split of --data)")
    tune.add_argument("--val-fraction", type=float, default=0.2)
    tune.add_argument("--key-column", default="key", help="labels-file column of image keys")
    tune.add_argument("--label-column", default="label", help="labels-file column of class names")
    tune.add_argument("--class-weights", default="none", choices=["none", "balanced"])
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    tune.add_argument("--gpus-per-worker", type=float, default=0)
    tune.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    tune.add_argument("--job-id", help="defaults to a hash of data, model, training settings and output")
    tune.add_argument("--name", help="artifact name in its id <name>:vN (default: the output folder's name)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_label(args: argparse.Namespace) -> int:
    return _run(_label_spec(args), quiet=args.quiet)


def _label_spec(args: argparse.Namespace) -> LabelJobSpec:
    spec = {
        "kind": "label",
        "input": {
            "uri": args.input,
            "format": args.format,
            "files_per_shard": args.files_per_shard,
            "image_field": args.image_field,
        },
        "decoder": args.decoder,
        "output": {
            "uri": args.output,
            "format": args.output_format,
            "compact": args.compact,
            "target_file_mb": args.target_file_mb,
        },
        "model": {
            "name": args.model,
            "weights": None if args.weights.lower() == "none" else args.weights,
            "weights_dir": args.weights_dir,
            "device": args.device,
            "compile": {"true": True, "false": False}.get(args.compile, args.compile),
        },
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "embeddings": not args.no_embeddings,
        "probabilities": args.probabilities,
        "shared_storage": args.shared_storage,
        "storage": {"endpoint_url": args.endpoint_url},
    }
    if args.job_id:
        spec["job_id"] = args.job_id
    if args.top_k is not None:
        spec["top_k"] = args.top_k
    return parse_job_spec(spec)


def _cmd_finetune(args: argparse.Namespace) -> int:
    return _run(_finetune_spec(args), quiet=args.quiet)


def _finetune_spec(args: argparse.Namespace) -> FinetuneJobSpec:
    spec = {
        "kind": "finetune",
        "data": {
            "uri": args.data,
            "validation_uri": args.val_data,
            "val_fraction": args.val_fraction,
            "key_column": args.key_column,
            "label_column": args.label_column,
            "group_duplicates": not args.no_group_duplicates,
            "duplicate_cosine": args.duplicate_cosine,
        },
        "base": {
            "name": args.base,
            "weights": None if args.weights.lower() == "none" else args.weights,
            "weights_dir": args.weights_dir,
        },
        "output": args.output,
        "training": {
            "method": args.method,
            "epochs": args.epochs,
            "min_steps": args.min_steps,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "image_size": args.image_size,
            "class_weights": args.class_weights,
            "seed": args.seed,
        },
        "num_workers": args.workers,
        "gpus_per_worker": args.gpus_per_worker,
        "storage": {"endpoint_url": args.endpoint_url},
    }
    spec |= {key: value for key, value in (("job_id", args.job_id), ("name", args.name)) if value}
    return parse_job_spec(spec)


def _cmd_run(args: argparse.Namespace) -> int:
    return _run(load_job_spec(args.spec), quiet=args.quiet)


def _cmd_demo(args: argparse.Namespace) -> int:
    photos = resources.files("jobs") / "demo_photos"
    spec = LabelJobSpec(
        input={"uri": str(photos), "format": "files"},
        output=args.output,
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        top_k=3,
        num_workers=1,
    )
    code = _run(spec, quiet=False)
    if code == 0:
        print(format_labels_table(spec.output))
    return code


def _cmd_query(args: argparse.Namespace) -> int:
    from jobs.output.query import run_query  # DuckDB is loaded only by the commands that use it

    run_query(args.output, args.sql, args.format, args.out, StorageOptions(endpoint_url=args.endpoint_url), sys.stdout)
    return 0


def _cmd_similar(args: argparse.Namespace) -> int:
    from jobs.output.query import format_neighbours, similar

    options = StorageOptions(endpoint_url=args.endpoint_url)
    print(format_neighbours(similar(args.output, args.key, args.k, options, use_index=args.index)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from jobs.output.report_page import write_report

    data = write_report(args.output, args.out, StorageOptions(endpoint_url=args.endpoint_url))
    print(f"report of {data.rows} images ({data.errors} errors, {data.shards} shards) written to {args.out}")
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    from jobs.output.compact import compact_output

    options = StorageOptions(endpoint_url=args.endpoint_url)
    done = compact_output(args.output, args.target_mb << 20, options, wait_s=args.wait)
    print(f"{args.output}: {done.files_before} data files -> {done.files_after} (generation {done.generation}; "
          f"{done.files_merged} merged, {done.rows_merged} rows, {done.bytes_before >> 20} MB -> "
          f"{done.bytes_after >> 20} MB) in {done.seconds:.1f} s")  # fmt: skip
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(job_spec_json_schema(), indent=2))
    return 0


def _run(spec: LabelJobSpec | FinetuneJobSpec, quiet: bool) -> int:
    summary = kind_of(spec).run_here(spec, quiet)
    print("\n".join(summary.lines()))
    return 0


def format_labels_table(output: str) -> str:
    """A readable table of a local output: key, top-1 label and score, the runners-up."""
    import pyarrow.dataset as ds

    table = ds.dataset(output, format="parquet").to_table(columns=["key", "label", "score", "topk_labels", "error"])
    rows = sorted(table.to_pylist(), key=lambda r: r["key"])
    width = max([len(r["key"]) for r in rows] + [5])
    lines = [f"{'image':<{width}}  {'label':<24} {'score':>6}  runners-up", "-" * (width + 60)]
    for row in rows:
        if row["error"]:
            lines.append(f"{row['key']:<{width}}  ERROR: {row['error']}")
            continue
        others = ", ".join(row["topk_labels"][1:])
        lines.append(f"{row['key']:<{width}}  {row['label']:<24} {row['score']:>6.3f}  {others}")
    return "\n".join(lines)


_MAX_LISTED_ERRORS = 20
_MAX_EXCERPT_CHARS = 200


def _excerpt_repr() -> reprlib.Repr:
    """A repr bounded in depth and width, so an excerpt of a huge input costs what a small one does."""
    bounded = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
    bounded.maxlevel, bounded.maxstring, bounded.maxother = 3, 120, 120
    bounded.maxdict = bounded.maxlist = bounded.maxtuple = bounded.maxset = 6
    return bounded


_EXCERPT = _excerpt_repr()


def _describe_validation(exc: ValidationError) -> str:
    """One line for one error; else a count and one indented line per error, at most 20, each with a bounded
    excerpt of what was given (secrets masked)."""
    errors = exc.errors()
    lines = []
    for err in errors[:_MAX_LISTED_ERRORS]:
        where = ".".join(str(p) for p in err["loc"]) or "(spec)"
        secret = any(is_secret_key(str(p)) for p in err["loc"][-1:])
        lines.append(f"{where}: {mask_text(err['msg'])} (got {MASK if secret else _excerpt(err.get('input'))})")
    if len(errors) == 1:
        return lines[0]
    if len(errors) > _MAX_LISTED_ERRORS:
        lines.append(f"... and {len(errors) - _MAX_LISTED_ERRORS} more")
    return f"{len(errors)} problems\n" + "\n".join(f"  {line}" for line in lines)


def _excerpt(value: object) -> str:
    # Masked before the repr cuts it short: a secret cut in half by the bound would no longer be recognised.
    text = _EXCERPT.repr(mask_secrets(value))
    return text if len(text) <= _MAX_EXCERPT_CHARS else text[: _MAX_EXCERPT_CHARS - 3] + "..."


def _report(message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
