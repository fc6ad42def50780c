"""The `bulklabel` command line: label, finetune, run a spec file, demo, query, similar, report, schema."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import reprlib
import sys
import traceback
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from jobs.errors import EXIT_FAILED, EXIT_INTERNAL, EXIT_OK, exit_code_for
from schemas.masking import MASK, is_secret_key, mask_secrets, mask_text
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec, ModelSpec, OutputOptions, StorageOptions

if TYPE_CHECKING:
    from jobs.flags import SpecFlags
    from schemas.finetune import FinetuneJobSpec

# Commands that run a model in this process (workers.ship.commands): their parser is built without the job kinds,
# the service's commands and their specs, half a second of imports before torch's two (`bulklabel predict` in 3 s).
IN_PROCESS_COMMANDS = ("predict", "export", "models")

log = logging.getLogger("bulklabel")

EXIT_INTERRUPTED = 130  # the shell's convention for Ctrl-C
# The exit code of each way a job run can end (jobs.errors). No default: an outcome missing here ends the command
# as an internal error (exit 4), never as a success.
EXIT_BY_OUTCOME: dict[Outcome, int] = {
    Outcome.SUCCEEDED: EXIT_OK,
    Outcome.PARTIAL: EXIT_OK,  # failed shards within max_failed_shards: the summary lists them
    Outcome.ALREADY_COMPLETE: EXIT_OK,
    Outcome.FAILED: EXIT_FAILED,
    Outcome.CANCELLED: EXIT_INTERRUPTED,
}
_MAX_MESSAGE_CHARS = 2000


def main(argv: list[str] | None = None) -> int:
    """Run a command; an error ends it with one line on stderr naming the problem and the exit code of its kind
    (jobs.errors), never a traceback (that is logged at DEBUG: `-v` shows it)."""
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    if first in IN_PROCESS_COMMANDS:
        args = _parser(full=False).parse_args(argv)
    else:
        from jobs.service.commands import normalise_argv

        args = _parser().parse_args(normalise_argv(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # faiss's loader says at INFO which CPU build it tried, a traceback's worth of lines on every machine without AVX2
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
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


def _parser(full: bool = True) -> argparse.ArgumentParser:
    """Every command's parser; `full=False`: only the in-process ones (IN_PROCESS_COMMANDS)."""
    parser = argparse.ArgumentParser(prog="bulklabel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    if not full:
        _in_process_commands(sub)
        return parser
    from jobs.kinds import kinds
    from jobs.service.commands import add_service_commands
    from schemas.finetune import FinetuneDataSpec
    from schemas.ship import CompareBackbonesSpec

    commands = {kind.name: kind for kind in kinds() if kind.flags is not None}  # `bulklabel label`, ...
    for name, kind in commands.items():
        command = sub.add_parser(name, help=kind.command_help)
        kind_arguments(command, kind.flags)
        command.set_defaults(handler=_cmd_job, spec_flags=kind.flags)

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
                         help="auto: a Lance output's own vector index where it has one; else exact on small outputs, "
                         "a cached ANN index (faiss) on large ones. never: exact")  # fmt: skip
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

    review = sub.add_parser("review", help="people's decisions on a review queue (or a label-issues result)")
    review_sub = review.add_subparsers(required=True, metavar="ACTION")
    status = review_sub.add_parser("status", help="reviewed and left, by decision and by reviewer")
    status.add_argument("queue", help="the queue's output: local folder or s3://bucket/prefix")
    status.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    status.set_defaults(handler=_cmd_review_status)
    serve = review_sub.add_parser("serve", help="the review app: a page to decide on the queue's images, keyboard "
                                  "first; prints its URL with the token")  # fmt: skip
    serve.add_argument("queue", help="the queue's output: local folder or s3://bucket/prefix")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need the "
                       "token too)")  # fmt: skip
    serve.add_argument("--port", type=int, default=8470, help="0: any free port")
    serve.add_argument("--classes", help="labels reviewers may pick besides the queue's: a file (one per line) or "
                       "a comma-separated list")  # fmt: skip
    serve.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    serve.set_defaults(handler=_cmd_review_serve)

    _in_process_commands(sub)

    compare = sub.add_parser("compare-backbones", help="which pre-trained model suits a labelled set: a linear "
                             "probe's held-out accuracy per base, its interval and cost, measured here")  # fmt: skip
    compare.add_argument("--data", required=True, help=FinetuneDataSpec.model_fields["uri"].description)
    compare.add_argument("--bases", required=True, help="comma-separated torchvision names, each optionally "
                         "`name:WEIGHTS` (default: the model's DEFAULT weights)")  # fmt: skip
    compare.add_argument("--weights-dir", help=ModelSpec.model_fields["weights_dir"].description)
    compare.add_argument("--budget-ms", type=float, help=CompareBackbonesSpec.model_fields["budget_ms"].description)
    compare.add_argument("--seed", type=int, default=0, help="the split's seed")
    compare.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    compare.set_defaults(handler=_cmd_compare)

    schema = sub.add_parser("schema", help="print the job spec's JSON Schema")
    schema.set_defaults(handler=_cmd_schema)
    add_service_commands(sub, {name: kind.flags for name, kind in commands.items()}, kind_arguments, spec_of)
    return parser


def _in_process_commands(sub) -> None:
    predict = sub.add_parser("predict", help="label a few images in this process, no cluster: a zoo model or a "
                             "fine-tuned artifact, the same answers as a label job")  # fmt: skip
    predict.add_argument("images", nargs="+", help="image files or s3:// objects")
    predict.add_argument("--model", required=True, help=ModelSpec.model_fields["name"].description)
    predict.add_argument("--weights", default="DEFAULT", help="a zoo model's weights (IMAGENET1K_V2, a file); "
                         "DEFAULT: torchvision's default for the model; ignored for an artifact")  # fmt: skip
    predict.add_argument("--weights-dir", help=ModelSpec.model_fields["weights_dir"].description)
    predict.add_argument("--top-k", type=int, default=5, help="labels shown per image")
    predict.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    predict.add_argument("--json", action="store_true", help="one JSON object per image")
    predict.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    predict.set_defaults(handler=_in_process("predict"))

    export = sub.add_parser("export", help="a model as ONNX or TorchScript with a JSON sidecar (classes, "
                            "preprocessing), refused unless it agrees with the model on sample images")  # fmt: skip
    export.add_argument("model", help=ModelSpec.model_fields["name"].description)
    export.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    export.add_argument("--out", help="the file to write (its sidecar: the same name + .json); default: the "
                        "model's name + .onnx or .pt here")  # fmt: skip
    export.add_argument("--weights", default="DEFAULT", help="a zoo model's weights; ignored for an artifact")
    export.add_argument("--weights-dir", help=ModelSpec.model_fields["weights_dir"].description)
    export.add_argument("--samples", nargs="*", default=[], help="images (or folders) to check parity on, besides "
                        "an artifact's own validation images")  # fmt: skip
    export.add_argument("--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL_S3 / the AWS chain)")
    export.set_defaults(handler=_in_process("export"))

    models = sub.add_parser("models", help="torchvision's zoo: ImageNet accuracy, GFLOPs, parameters, embedding "
                            "width, and whether the weights are on this machine")  # fmt: skip
    models.add_argument("names", nargs="*", help="only models whose name contains one of these")
    models.add_argument("--max-gflops", type=float, help="only models of at most this many GFLOPs per image")
    models.add_argument("--offline", action="store_true", help="only weights already on this machine")
    models.add_argument("--json", action="store_true", help="one JSON object per weights entry")
    models.set_defaults(handler=_in_process("models"))


def kind_arguments(parser: argparse.ArgumentParser, flags: SpecFlags) -> None:
    """A job kind's flags (derived from its spec, jobs.flags) and what every job command takes besides."""
    flags.add_to(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def spec_of(args: argparse.Namespace) -> LabelJobSpec | FinetuneJobSpec:
    """The job spec a `label`, `finetune` or `submit <kind>` command line describes."""
    return args.spec_flags.build(args)


def _cmd_job(args: argparse.Namespace) -> int:
    return _run(spec_of(args), quiet=args.quiet)


def _cmd_run(args: argparse.Namespace) -> int:
    from jobs.kinds import load_job_spec

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


def _cmd_review_status(args: argparse.Namespace) -> int:
    from jobs.output.corrections import open_queue, read_decisions
    from jobs.review.decisions import review_status
    from jobs.review.items import review_items

    queue = open_queue(args.queue, StorageOptions(endpoint_url=args.endpoint_url))
    keys = [item.key for item in review_items(queue)]
    print("\n".join(review_status(keys, read_decisions(queue.storage, queue.uri)).lines()))
    return 0


def _cmd_review_serve(args: argparse.Namespace) -> int:
    from jobs.review.server import ServeOptions, read_classes, serve

    options = ServeOptions(queue=args.queue, host=args.host, port=args.port, classes=read_classes(args.classes),
                           storage=StorageOptions(endpoint_url=args.endpoint_url))  # fmt: skip
    serve(options, lambda url: print(f"review {args.queue} at {url}", flush=True))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from jobs.backbones import compare_backbones
    from workers.io.storage import normalise_uri

    bases = []
    for item in filter(None, (b.strip() for b in args.bases.split(","))):
        name, _, weights = item.partition(":")
        bases.append(ModelSpec(name=name, weights=weights or "DEFAULT", weights_dir=args.weights_dir))
    from schemas.finetune import FinetuneDataSpec
    from schemas.ship import CompareBackbonesSpec

    data = FinetuneDataSpec(uri=args.data if "://" in args.data else normalise_uri(args.data))
    spec = CompareBackbonesSpec(data=data, bases=tuple(bases),
                                budget_ms=args.budget_ms, seed=args.seed,
                                storage=StorageOptions(endpoint_url=args.endpoint_url))  # fmt: skip
    print("\n".join(compare_backbones(spec).lines()))
    return 0


def _in_process(command: str):
    """A command that runs a model in this process (workers.ship.commands): imported by name when it runs, so the
    driver's own modules never load torch (tests/test_structure.py) and every other command starts without it."""

    def handler(args: argparse.Namespace) -> int:
        lines, code = getattr(importlib.import_module("workers.ship.commands"), command)(args)
        print("\n".join(lines))
        return code

    return handler


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
    from jobs.kinds import job_spec_json_schema

    print(json.dumps(job_spec_json_schema(), indent=2))
    return 0


def _run(spec: LabelJobSpec | FinetuneJobSpec, quiet: bool) -> int:
    from jobs.kinds import kind_of

    summary = kind_of(spec).run_here(spec, quiet)
    print("\n".join(summary.lines()))
    return exit_code_of(summary.status)


class UnmappedOutcome(RuntimeError):
    """A job ended with an outcome EXIT_BY_OUTCOME does not know: a bug, reported as one (exit 4)."""


def exit_code_of(outcome: Outcome) -> int:
    """The command's exit code for how its job ended; an outcome without one is an internal error."""
    try:
        return EXIT_BY_OUTCOME[outcome]
    except KeyError:
        raise UnmappedOutcome(f"no exit code for the job outcome {outcome!r}") from None


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
