"""The job service's commands: submit, list, status, wait, logs, cancel, resume, service (start | status | stop)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from jobs.errors import EXIT_FAILED
from jobs.flags import SpecFlags
from jobs.kinds import kinds
from jobs.service.records import JobRecord, JobState


def normalise_argv(argv: list[str]) -> list[str]:
    """`bulklabel submit job.yaml` is `bulklabel submit file job.yaml` (argparse cannot mix a positional with
    sub-commands)."""
    for index, arg in enumerate(argv):
        if arg == "submit":
            rest = argv[index + 1 :]
            if rest and not rest[0].startswith("-") and rest[0] not in (*(k.name for k in kinds() if k.flags), "file"):
                return [*argv[: index + 1], "file", *rest]
            return argv
        if not arg.startswith("-"):
            return argv
    return argv


def add_service_commands(sub, kinds: Mapping[str, SpecFlags], kind_arguments, spec_of) -> None:
    """Add the commands to the CLI's sub-parsers. `submit <kind>` takes the kind's flags exactly as the CLI's own
    command does (`kind_arguments`, derived from the spec by jobs.flags) and builds its spec the same way
    (`spec_of`)."""
    submit = sub.add_parser("submit", help="queue a job on the job service and print its id (returns at once)")
    choices = submit.add_subparsers(required=True, metavar="KIND")
    for name, flags in kinds.items():
        parser = choices.add_parser(name, help=f"a {name} job from flags, as `bulklabel {name}` takes them")
        kind_arguments(parser, flags)
        _submit_options(parser)
        parser.set_defaults(handler=_cmd_submit, build=spec_of, spec_flags=flags)
    from_file = choices.add_parser("file", help="a job spec file (YAML or JSON); `bulklabel submit job.yaml` works too")
    from_file.add_argument("spec", type=Path)
    _submit_options(from_file)
    from_file.set_defaults(handler=_cmd_submit, build=_spec_from_file)

    listing = sub.add_parser("list", help="the service's jobs: id, kind, state, priority, progress, images/s, age")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_cmd_list)
    for name, handler, text in (
        ("status", _cmd_status, "a job's state, progress, errors, ETA, and why it waits"),
        ("wait", _cmd_wait, "follow a job until it ends; exit 0 only if it succeeded"),
        ("cancel", _cmd_cancel, "stop a job: nothing new starts, running shards finish, committed ones stay"),
        ("resume", _cmd_resume, "queue a cancelled, failed or interrupted job again: only what is missing"),
        ("logs", _cmd_logs, "a job's log (kept after it ended)"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("job", help="the job id (`bulklabel list`)")
        parser.set_defaults(handler=handler)
        if name == "status":
            parser.add_argument("--json", action="store_true")
        if name == "logs":
            parser.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        if name == "wait":
            parser.add_argument("--quiet", action="store_true", help="no progress line")
    svc = sub.add_parser("service", help="the job service itself: start, status (address, pools, queue), stop")
    svc.add_argument("action", choices=["start", "status", "stop"])
    svc.set_defaults(handler=_cmd_service)


def _submit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--priority", type=int, default=0, help="higher runs first; FIFO within a priority")
    parser.add_argument("--max-workers", type=int, help="at most this many workers for this job")
    parser.add_argument("--wait", action="store_true", help="then follow it until it ends, as `bulklabel wait`")


def _spec_from_file(args: argparse.Namespace):
    from jobs.kinds import load_job_spec

    return load_job_spec(args.spec)


def _cmd_submit(args: argparse.Namespace) -> int:
    from jobs.service import client

    job_id = client.submit(args.build(args), priority=args.priority, max_workers=args.max_workers)
    print(job_id)
    return _follow(job_id, quiet=False) if args.wait else 0


def _cmd_list(args: argparse.Namespace) -> int:
    from jobs.service import client

    records = client.list_jobs()
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=1))
    else:
        print(format_jobs(records))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from jobs.service import client

    record = client.job_status(args.job)
    print(json.dumps(status_json(record), indent=1) if args.json else format_status(record))
    return 0


def _cmd_wait(args: argparse.Namespace) -> int:
    return _follow(args.job, quiet=args.quiet)


def _follow(job_id: str, quiet: bool) -> int:
    from jobs.service import client

    def show(record: JobRecord) -> None:
        if not quiet:
            sys.stderr.write("\r" + progress_line(record) + " " * 8)
            sys.stderr.flush()

    record = client.wait(job_id, on_update=show)
    if not quiet:
        sys.stderr.write("\n")
    print(format_status(record))
    return 0 if record.state is JobState.SUCCEEDED else EXIT_FAILED


def _cmd_cancel(args: argparse.Namespace) -> int:
    from jobs.service import client

    print(format_status(client.cancel(args.job)))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from jobs.service import client

    print(format_status(client.resume(args.job)))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from jobs.service import client

    offset = 0
    while True:
        text, offset = client.logs(args.job, offset)
        sys.stdout.write(text)
        sys.stdout.flush()
        if not args.follow:
            return 0
        if not text:
            state = client.job_status(args.job).state
            if state.is_terminal() or state is JobState.INTERRUPTED:
                text, offset = client.logs(args.job, offset)
                sys.stdout.write(text)
                return 0
            time.sleep(1.0)


def _cmd_service(args: argparse.Namespace) -> int:
    from jobs.service import client

    if args.action == "start":
        client.service(start=True)
        args.action = "status"
    if args.action == "stop":
        stopped, queued = client.stop_service()
        print(format_stopped(stopped, queued))
        return 0
    print(json.dumps(client.service_status(), indent=1))
    return 0


# ----------------------------------------------------------------------------------------------- formatting


def status_json(record: JobRecord) -> dict:
    return record.model_dump(mode="json", exclude={"spec"}) | {"spec": record.spec}


def progress_line(record: JobRecord) -> str:
    p = record.progress
    total = "?" if p.shards_total is None else str(p.shards_total)
    eta = f", ETA {p.eta_s:.0f}s" if p.eta_s is not None and record.state is JobState.RUNNING else ""
    return (f"{record.job_id} {record.state.value}: shards {p.shards_done}/{total}"
            f"{f' ({p.shards_failed} failed)' if p.shards_failed else ''}, {p.images} images ({p.errors} errors), "
            f"{p.images_per_s:.1f} images/s{eta}")  # fmt: skip


def format_stopped(stopped: list[JobRecord], queued: list[str]) -> str:
    """What `service stop` did, job by job: each running job as its record now says, queued ones left queued."""
    lines = ["job service stopped"]
    for record in stopped:
        p = record.progress
        total = "?" if p.shards_total is None else str(p.shards_total)
        if record.state is JobState.CANCELLED:
            lines.append(f"  {record.job_id}: cancelled at {p.shards_done}/{total} shards; "
                         f"`bulklabel resume {record.job_id}` continues it")  # fmt: skip
        else:
            lines.append(f"  {record.job_id}: {record.state.value} ({p.shards_done}/{total} shards)")
    if queued:
        lines.append(f"  {len(queued)} queued job(s) stay queued and start with the next service: {', '.join(queued)}")
    return "\n".join(lines)


def format_status(record: JobRecord) -> str:
    lines = [progress_line(record), f"  kind: {record.kind}, priority {record.priority}, "
             f"attempts {record.attempts}, output {record.output}"]  # fmt: skip
    if record.waiting_reason and record.state is JobState.QUEUED:
        lines.append(f"  waiting: {record.waiting_reason}")
    if record.cancelled_by and record.state is JobState.CANCELLED:
        lines.append(f"  cancelled: {record.cancelled_by.value}; `bulklabel resume {record.job_id}` continues it")
    if record.last_error:
        lines.append(f"  error: {record.last_error}")
    return "\n".join(lines)


def format_jobs(records: list[JobRecord]) -> str:
    now = datetime.now(UTC)
    rows = [("ID", "KIND", "STATE", "PRI", "PROGRESS", "IMG/S", "AGE", "OUTPUT")]
    for r in records:
        total = "?" if r.progress.shards_total is None else r.progress.shards_total
        age = _age((now - r.submitted_at).total_seconds())
        rows.append((r.job_id, r.kind, r.state.value, str(r.priority), f"{r.progress.shards_done}/{total}",
                     f"{r.progress.images_per_s:.1f}", age, r.output))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
