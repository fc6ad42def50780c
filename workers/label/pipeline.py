"""Decode records into batches on background threads, so decoding overlaps the model."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from schemas.shards import StageSeconds
from workers.io.readers import Record, bounded_map
from workers.io.writer import RowMeta
from workers.label.decode import Decoded
from workers.label.decoders import Decoder

STAGES = tuple(StageSeconds.model_fields)  # read, decode, infer, write, wait
R = TypeVar("R")


@dataclass(frozen=True)
class Batch:
    """Up to batch_size rows; `pixels` holds the decodable ones, in row order (None if there are none): a numpy
    array, or a tensor already on the model's device (GPU decoders)."""

    meta: list[RowMeta]
    pixels: object
    bytes_read: int


class StageClock:
    """Seconds per stage of one shard, summed over the threads that run it: read (waiting for the reader), decode
    (summed over decode threads), infer (summed over lanes), write (the commit), wait (the model waiting for a
    batch). Thread-safe; `seconds()` is what the done-marker records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = dict.fromkeys(STAGES, 0.0)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] += seconds

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def timed(self, stage: str, items: Iterator) -> Iterator:
        """`items`, with the time each `next()` takes counted as `stage`."""
        items = iter(items)
        while True:
            started = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                self.add(stage, time.perf_counter() - started)
                return
            self.add(stage, time.perf_counter() - started)
            yield item

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return {stage: round(value, 3) for stage, value in self._seconds.items()}

    def stages(self) -> StageSeconds:
        """The done-marker's record of them."""
        return StageSeconds(**self.seconds())

    def timing(self, stage: str, fn: Callable[..., R]) -> Callable[..., R]:
        """`fn`, with the time of each call counted as `stage`."""

        def timed(*args, **kwargs) -> R:
            with self.stage(stage):
                return fn(*args, **kwargs)

        return timed


def decoded_batches(
    records: Iterator[Record], decoder: Decoder, pool: Executor, batch_size: int, clock: StageClock | None = None
) -> Iterator[Batch]:
    """Decode records in `pool` (bounded in flight) and group them into batches; `clock` gets read and decode."""
    clock = clock or StageClock()

    def work(record: Record) -> tuple[Record, Decoded, str | None]:
        if record.error is not None:
            return record, Decoded(None, error=record.error), None
        with clock.stage("decode"):
            # The content id here, in the decode threads (hashlib releases the GIL), not on the model's thread.
            return record, decoder.decode(record.data), hashlib.sha256(record.data).hexdigest()

    def batch(items: list[tuple[Record, Decoded, str | None]]) -> Batch:
        with clock.stage("decode"):
            rows, pixels = decoder.batch([decoded for _, decoded, _ in items])
        meta = [
            RowMeta(r.key, r.source, d.width, d.height, d.error, image_id, r.given_label, r.sidecar)
            for (r, _, image_id), d in zip(items, rows, strict=True)
        ]
        return Batch(meta, pixels, sum(len(r.data or b"") for r, _, _ in items))

    items: list[tuple[Record, Decoded, str | None]] = []
    for item in bounded_map(pool, work, clock.timed("read", records), window=2 * batch_size):
        items.append(item)
        if len(items) == batch_size:
            yield batch(items)
            items = []
    if items:
        yield batch(items)


_DONE = object()


class Prefetched(Iterator):
    """Runs `items` on a background thread from construction on, at most `depth` ahead; its exceptions re-raise in
    the consumer. `close()` (or leaving a `with` block) lets the producer thread end even if nothing was consumed."""

    def __init__(self, items: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._items = items
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name="bulklabel-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        """Queue `item` unless the consumer has gone; a plain put could wait forever for room once it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(exc)

    def __next__(self):
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE or isinstance(item, BaseException):
            self._finished = True
            self.close()
            if item is _DONE:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> Prefetched:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Run `items` on a background thread, at most `depth` ahead; its exceptions re-raise here. The thread starts
    with the first `next()`; use `Prefetched` to start it at once."""
    with Prefetched(items, depth) as ahead:
        yield from ahead


class Turn:
    """One caller's place in a `Turns` queue: `wait()` until every earlier turn has ended; `end()` (idempotent, also
    on leaving a `with` block) lets the next one go, even if this one never waited (it failed early)."""

    def __init__(self, turns: Turns, ticket: int):
        self._turns = turns
        self.ticket = ticket
        self._ended = False

    def wait(self) -> None:
        self._turns._wait(self.ticket)

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._turns._end(self.ticket)

    def __enter__(self) -> Turn:
        return self

    def __exit__(self, *exc) -> None:
        self.end()


class Turns:
    """First come, first served, across threads: shards that overlap (the next one reads and decodes ahead) still
    hand their batches to the model one shard after another, in the order they arrived."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._issued = 0
        self._serving = 0
        self._ended: set[int] = set()

    def take(self) -> Turn:
        with self._cond:
            self._issued += 1
            return Turn(self, self._issued - 1)

    def _wait(self, ticket: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket)

    def _end(self, ticket: int) -> None:
        with self._cond:
            self._ended.add(ticket)
            while self._serving in self._ended:
                self._ended.remove(self._serving)
                self._serving += 1
            self._cond.notify_all()
