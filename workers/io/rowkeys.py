"""How each input format's rows are keyed, and which files are shards: shared by planning on the driver and the
readers in the workers, so both key a row alike (imports nothing heavier than the standard library)."""

from __future__ import annotations

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)


class ParquetLayoutError(ValueError):
    """A parquet shard without the image column the spec names (or any of the usual ones), or its key column."""


def shard_kind(name: str) -> str | None:
    """'tar' or 'parquet' for a file that is one shard of that format by its name, else None (a loose file)."""
    lowered = name.lower()
    if lowered.endswith(TAR_SUFFIXES):
        return "tar"
    if lowered.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def parquet_row_key(shard_key: str, row: int) -> str:
    """A Parquet row's key without a key column: the file's path relative to the input and the row number
    ('default/train/0000.parquet#0'), unique by construction across files with the same name in other folders
    (Hugging Face's `<config>/<split>/0000.parquet` layout)."""
    return f"{shard_key}#{row}"


def check_key_column(source: str, key_column: str | None, names: list[str]) -> None:
    if key_column is not None and key_column not in names:
        raise ParquetLayoutError(f"{source} has no key column {key_column!r} (columns: {names}); set "
                                 "input.key_column to one of them, or leave it unset")  # fmt: skip


def row_key_of(key: str, row_key: str) -> str:
    """A loose file's (or manifest key's) row key: `path` keeps it, `name` is its file name without extension
    (img2dataset's key for its `files` layout: `00000/000000001.jpg` → '000000001')."""
    if row_key != "name":
        return key
    name = key.rsplit("/", 1)[-1]
    return name.split(".", 1)[0] if not name.startswith(".") else name
