"""The one definition of a label output's layout: every name bulklabel writes under an output prefix.

Layout version 2 (this bulklabel writes it):
    _owner.json             the claim: which job owns the prefix (and the layout version), created first, atomically
    data/part-<shard>.parquet   one per shard: `data/` holds Parquet files and nothing else, so DuckDB
                            (`read_parquet('OUT/data/**')`), Polars (`pl.read_parquet('OUT/data/')`), pyarrow, pandas,
                            Spark and Athena read that folder as it is
    data/compact-<gen>-<n>.parquet   files of a compaction generation (jobs.output.compact): the manifest says which
                            file holds which shard's rows
    _done/<shard>.json      a shard's done-marker, written after its data file
    _tmp/<shard>.<attempt>.<nonce>.partial   an upload on its way to its final name
    _tmp/compact-<gen>/...  a compaction's new files before they are switched in
    _lease/<n>.json         the writer lease's generations (jobs.output.lease): who writes the output now, until
                            when; the highest is the lease's state
    _job.json               the job manifest, written last, after every shard (rewritten by a compaction: the pointer
                            readers and resume go through)
    _failed.json            the record of a failed run (its reason), removed when a later run completes
    sheet.html              a curation job's HTML sheet (its table is data/part-<table>.parquet, its manifest a
                            schemas.curation.ResultManifest)
    table/                  format delta: a Delta Lake table holding the same rows, each shard committed once;
                            format iceberg with the default catalog: the Iceberg warehouse and its SQLite catalog
                            (catalog.sqlite); format lance: a Lance dataset (jobs.output.tables)
Names recorded inside the output (a done-marker's data file, the manifest's files) are relative to the output since
layout version 3, so an output copied or moved elsewhere (another folder, bucket or prefix) reads whole.
Layout version 2: the same files, but markers and the manifest recorded absolute URIs under the output the job wrote
to; such outputs are read (and extended by a run) through `name_in`, which finds each file under the output where it
is now. Layout version 1 (bulklabel before `data/`): data files `part-<shard>.parquet` at the top of the prefix,
beside the markers. Outputs in it are still read (the reader follows the manifest's or markers' file names); a run is
refused.

Driver (jobs.output) and workers (workers.io.writer) both import this module, which is why it lives in `schemas`:
no torch, no Ray, no storage client; URIs are joined with plain slashes.
"""

from __future__ import annotations

import re

# 1: data files at the top of the prefix; 2: data files under data/; 3: names in markers and manifest relative
LAYOUT_VERSION = 3
RELATIVE_NAMES_SINCE = 3  # the first layout version whose manifest records names relative to the output

OWNER_NAME = "_owner.json"
MANIFEST_NAME = "_job.json"
FAILED_NAME = "_failed.json"
DONE_DIR = "_done"
TMP_DIR = "_tmp"
DATA_DIR = "data"
TABLE_DIR = "table"  # delta: the Delta Lake table (its _delta_log and data files); iceberg: the default warehouse
LEASE_DIR = "_lease"
SHEET_NAME = "sheet.html"  # a curation job's HTML sheet (schemas.curation), beside its table
CORRECTIONS_DIR = "corrections"  # a review queue's decisions (schemas.review), one file each, beside its table

SHARD = r"[A-Za-z0-9._=-]+"
MARKER = re.compile(rf"{DONE_DIR}/({SHARD})\.json")
_DATA_FILE = rf"(?:{DATA_DIR}/)?(?:part-{SHARD}|compact-\d+-\d+)\.parquet"
DATA_FILE = re.compile(_DATA_FILE)
PART_FILE = re.compile(rf"{DATA_DIR}/part-({SHARD})\.parquet")  # a shard's own file; group 1: the shard
V1_DATA_FILE = re.compile(rf"part-{SHARD}\.parquet")  # layout 1's data files, at the top of the prefix
# LocalStorage writes through hidden `.<name>.<nonce>.tmp` files beside the target; a crash can leave one behind.
PARTIAL = re.compile(
    rf"{TMP_DIR}/{SHARD}\.\d+\.[0-9a-f]{{8}}\.partial|{TMP_DIR}/compact-\d+/[^/]+|(?:.*/)?\.[^/]+\.[0-9a-f]{{8}}\.tmp"
)
PROBE = re.compile(r"_probe-[0-9a-f]{8}")
CORRECTION_FILE = re.compile(rf"{CORRECTIONS_DIR}/([A-Za-z0-9_-]{{8,64}})\.parquet")  # group 1: the decision id
LEASE_FILE = re.compile(rf"{LEASE_DIR}/(\d+)\.json")  # group 1: the generation
LEASE_NAMES = re.compile(rf"{LEASE_DIR}/.+")  # its generations and their create-if-absent temporaries
# Every name a label job writes under its output prefix, relative to it.
OWN_NAMES = re.compile(
    rf"(?:{OWNER_NAME}|{MANIFEST_NAME}|{FAILED_NAME}|{_DATA_FILE}|{DONE_DIR}/{SHARD}\.json|{PARTIAL.pattern}"
    rf"|{PROBE.pattern}|{LEASE_NAMES.pattern}|{TABLE_DIR}/.+|{SHEET_NAME}|{CORRECTION_FILE.pattern})"
)
# What file browsers drop into any folder they show (Finder, Explorer): never parsed, never deleted, and no reason
# to refuse an output, since opening the output folder to look at it is enough to create one.
LITTER = re.compile(r"(?:.*/)?(?:\.DS_Store|\._[^/]*|Thumbs\.db|desktop\.ini)")


def join(prefix: str, *parts: str) -> str:
    """Join URI parts with single slashes (as workers.io.storage.join, which this package may not import)."""
    out = prefix.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_relative(name: str) -> bool:
    """Whether a recorded name is relative to the output (layout 3) rather than a URI or absolute path (before)."""
    return "://" not in name and not name.startswith("/")


def data_name(shard_id: str) -> str:
    """A shard's own data file, relative to the output: what its done-marker records."""
    return f"{DATA_DIR}/part-{shard_id}.parquet"


def name_in(output: str, recorded: str, recorded_output: str | None = None, shard_id: str | None = None) -> str:
    """The name relative to `output` of a data file a marker or manifest recorded as `recorded`.

    Layout 3 records relative names: returned as they are. Before, absolute URIs under the output the job wrote to:
    under `output` itself (not moved), that part; else below `recorded_output` (a manifest names the output it was
    written to); else a marker's own data file, found by the layout's name for `shard_id` at the end of the URI.
    Raises ValueError when none of these places it (a damaged record).
    """
    if is_relative(recorded):
        if recorded.startswith("../") or "/../" in recorded:
            raise ValueError(f"{recorded!r} climbs out of the output")
        return recorded
    for root in (output, recorded_output):
        if root is not None and recorded.startswith(root.rstrip("/") + "/"):
            return recorded[len(root.rstrip("/")) + 1 :]
    if shard_id is not None:
        for name in (data_name(shard_id), f"part-{shard_id}.parquet"):  # layout 2, then layout 1 (at the top)
            if recorded.endswith("/" + name):
                return name
    raise ValueError(f"{recorded!r} is not under the output")


def data_dir(output: str) -> str:
    """The folder of data files: what analytics engines are pointed at."""
    return join(output, DATA_DIR)


def data_uri(output: str, shard_id: str) -> str:
    return join(output, data_name(shard_id))


def compacted_uri(output: str, generation: int, index: int) -> str:
    return join(output, DATA_DIR, f"compact-{generation}-{index:05d}.parquet")


def compaction_temp_uri(output: str, generation: int, index: int) -> str:
    return join(output, TMP_DIR, f"compact-{generation}", f"{index:05d}.parquet")


def table_uri(output: str) -> str:
    return join(output, TABLE_DIR)


def marker_uri(output: str, shard_id: str) -> str:
    return join(output, DONE_DIR, f"{shard_id}.json")


def markers_prefix(output: str) -> str:
    return join(output, DONE_DIR)


def temp_uri(output: str, shard_id: str, attempt: int, nonce: str) -> str:
    return join(output, TMP_DIR, f"{shard_id}.{attempt}.{nonce}.partial")


def owner_uri(output: str) -> str:
    return join(output, OWNER_NAME)


def correction_uri(output: str, decision_id: str) -> str:
    """Where a review decision is stored under its queue's output."""
    return join(output, CORRECTIONS_DIR, f"{decision_id}.parquet")


def manifest_uri(output: str) -> str:
    return join(output, MANIFEST_NAME)


def lease_prefix(output: str) -> str:
    return join(output, LEASE_DIR)


def lease_uri(output: str, generation: int) -> str:
    return join(output, LEASE_DIR, f"{generation:010d}.json")


def failed_uri(output: str) -> str:
    return join(output, FAILED_NAME)
