"""Decode records into batches on background threads, so decoding overlaps the model."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from schemas.specs import PreprocessSpec
from workers.decode import Decoded, decode
from workers.readers import Record, bounded_map

RowMeta = tuple[str, str, "int | None", "int | None", "str | None"]  # key, source, width, height, error


@dataclass(frozen=True)
class Batch:
    """Up to batch_size rows; `pixels` holds the decodable ones, in row order (None if there are none)."""

    meta: list[RowMeta]
    pixels: np.ndarray | None
    bytes_read: int


def decoded_batches(
    records: Iterator[Record], preprocess: PreprocessSpec, pool: Executor, batch_size: int
) -> Iterator[Batch]:
    """Decode records in `pool` (bounded in flight) and group them into batches."""

    def work(record: Record) -> tuple[Record, Decoded]:
        if record.error is not None:
            return record, Decoded(None, error=record.error)
        return record, decode(record.data, preprocess)

    meta: list[RowMeta] = []
    pixels: list[np.ndarray] = []
    nbytes = 0
    for record, decoded in bounded_map(pool, work, records, window=2 * batch_size):
        meta.append((record.key, record.source, decoded.width, decoded.height, decoded.error))
        nbytes += len(record.data or b"")
        if decoded.pixels is not None:
            pixels.append(decoded.pixels)
        if len(meta) == batch_size:
            yield Batch(meta, np.stack(pixels) if pixels else None, nbytes)
            meta, pixels, nbytes = [], [], 0
    if meta:
        yield Batch(meta, np.stack(pixels) if pixels else None, nbytes)


_DONE = object()


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Run `items` on a background thread, at most `depth` ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Queue `item` unless the consumer has gone; a plain put could wait forever for room once it has."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=produce, name="bulklabel-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
