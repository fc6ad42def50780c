"""workers.label.pipeline: records are decoded on a pool into ordered batches (error rows kept in the metadata), and
`prefetch` runs a producer ahead on a thread that never outlives its consumer."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.specs import PreprocessSpec
from workers.io.readers import Record
from workers.label.decoders import NvjpegDecoder, PillowDecoder, PillowDraftDecoder, TorchcodecDecoder
from workers.label.pipeline import STAGES, Batch, StageClock, decoded_batches, prefetch

SPEC = PreprocessSpec(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# The batched (GPU) decoder runs its whole path on the CPU too: decode_jpeg takes a list on any device.
DECODERS = {
    "pillow": lambda: PillowDecoder(SPEC),
    "pillow-draft": lambda: PillowDraftDecoder(SPEC),
    "torchcodec": lambda: TorchcodecDecoder(SPEC),
    "batched-on-cpu": lambda: NvjpegDecoder(SPEC, torch.device("cpu")),
}
PREFETCH_THREAD = "bulklabel-prefetch"
RED = (255, 0, 0)


def png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def colour_of(i: int) -> tuple[int, int, int]:
    return (i * 20 % 256, 255 - i * 9 % 256, i * 37 % 256)


# --------------------------------------------------------------------------------------------- decoded_batches


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_decoded_batches_groups_in_order_and_keeps_error_rows(decoder):
    # Rows 2 (read error) and 4 (not an image) fail; sizes differ so decodes finish out of order on the pool.
    records, expected = [], []
    for i in range(8):
        source = f"s3://bucket/shard-{i // 4}.tar"
        if i == 2:
            records.append(Record(f"k{i}", source, None, "cannot read: NoSuchKey"))
            expected.append((f"k{i}", source, None, None, "cannot read: NoSuchKey"))
        elif i == 4:
            records.append(Record(f"k{i}", source, b"<html>nope</html>"))
            expected.append((f"k{i}", source, None, None, "HTML"))
        else:
            size = (40 + 300 * (i % 3), 30 + 10 * i)
            records.append(Record(f"k{i}", source, png(colour_of(i), size)))
            expected.append((f"k{i}", source, *size, None))

    with ThreadPoolExecutor(4) as pool:
        batches = list(decoded_batches(iter(records), DECODERS[decoder](), pool, batch_size=3))

    assert [len(b.meta) for b in batches] == [3, 3, 2]  # the last batch is partial
    meta = [row for b in batches for row in b.meta]
    assert [row[:4] for row in meta] == [row[:4] for row in expected]
    for row, (*_, error) in zip(meta, expected, strict=True):
        assert row[4] is None if error is None else error in row[4]

    good = [[0, 1], [3, 5], [6, 7]]  # the rows of each batch that have pixels, in row order
    for batch, rows in zip(batches, good, strict=True):
        batch_pixels = np.asarray(batch.pixels)  # a tensor from the batched decoder
        assert batch_pixels.shape == (len(rows), 224, 224, 3) and batch_pixels.dtype == np.uint8
        for pixels, i in zip(batch_pixels, rows, strict=True):
            assert (pixels == colour_of(i)).all()
    assert [b.bytes_read for b in batches] == [
        sum(len(r.data or b"") for r in records[start : start + 3]) for start in (0, 3, 6)
    ]


def test_decoded_batches_all_error_batch_has_no_pixels():
    records = [
        Record("a", "src", None, "gone"),
        Record("b", "src", b"garbage bytes"),
        Record("c", "src", png(RED, (9, 9))),
    ]

    with ThreadPoolExecutor(2) as pool:
        first, second = decoded_batches(iter(records), PillowDecoder(SPEC), pool, batch_size=2)

    assert isinstance(first, Batch) and first.pixels is None
    assert [row[0] for row in first.meta] == ["a", "b"]
    assert first.meta[0][4] == "gone" and first.meta[1][4]
    assert first.bytes_read == len(b"garbage bytes")
    assert [row[:5] for row in second.meta] == [("c", "src", 9, 9, None)]
    assert second.pixels.shape == (1, 224, 224, 3) and (second.pixels == RED).all()


def test_decoded_batches_exact_multiple_and_empty_input():
    records = [Record(f"k{i}", "src", png(colour_of(i), (20, 20))) for i in range(4)]
    with ThreadPoolExecutor(2) as pool:
        assert [len(b.meta) for b in decoded_batches(iter(records), PillowDecoder(SPEC), pool, batch_size=2)] == [2, 2]
        assert list(decoded_batches(iter([]), PillowDecoder(SPEC), pool, batch_size=2)) == []


def jpeg(colour: tuple[int, int, int], size: tuple[int, int], **params) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=95, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_a_corrupt_jpeg_among_good_ones_is_one_error_row_and_fallbacks_keep_their_place(decoder):
    """Truncated JPEGs fail libjpeg (and a batched GPU call with them); progressive and CMYK ones go to Pillow:
    every other row of the batch keeps its pixels, in row order."""
    good = jpeg(RED, (300, 200))
    cut = jpeg((0, 0, 255), (300, 200))[:400]
    progressive = jpeg((0, 200, 0), (200, 300), progressive=True)
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(cmyk, "JPEG", quality=95)  # red in CMYK
    records = [Record(f"k{i}", "src", data) for i, data in enumerate([good, cut, progressive, cmyk.getvalue(), good])]

    with ThreadPoolExecutor(2) as pool:
        (batch,) = decoded_batches(iter(records), DECODERS[decoder](), pool, batch_size=8)

    errors = [row[4] for row in batch.meta]
    assert errors[0] is None and errors[2] is None and errors[3] is None and errors[4] is None
    assert errors[1] and "truncated" in errors[1].lower()
    assert [row[2:4] for row in batch.meta] == [(300, 200), (None, None), (200, 300), (64, 64), (300, 200)]
    pixels = np.asarray(batch.pixels)
    assert pixels.shape == (4, 224, 224, 3)
    for got, colour in zip(pixels, [RED, (0, 200, 0), RED, RED], strict=True):
        assert np.abs(got.astype(int) - colour).max() <= 12


def test_stage_clock_counts_reads_decodes_and_named_stages():
    clock = StageClock()

    def slow_records() -> Iterator[Record]:
        for i in range(3):
            time.sleep(0.02)
            yield Record(f"k{i}", "src", png(RED, (20, 20)))

    with ThreadPoolExecutor(2) as pool:
        batches = list(decoded_batches(slow_records(), PillowDecoder(SPEC), pool, batch_size=2, clock=clock))
    with clock.stage("write"):
        time.sleep(0.01)

    seconds = clock.seconds()
    assert set(seconds) == set(STAGES) and len(batches) == 2
    assert seconds["read"] >= 0.06 and seconds["decode"] > 0 and seconds["write"] >= 0.01
    assert seconds["infer"] == seconds["wait"] == 0


# ---------------------------------------------------------------------------------------------------- prefetch


def _new_prefetch_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD and t not in before]


def _assert_ends(threads: list[threading.Thread]) -> None:
    assert threads, "no prefetch thread was started"
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive(), "the prefetch producer thread outlived its consumer"


def _assert_none_left(before: set[threading.Thread]) -> None:
    """Every prefetch thread started since `before` has ended (or ends within 5 s)."""
    for thread in _new_prefetch_threads(before):
        thread.join(timeout=5)
        assert not thread.is_alive(), "the prefetch producer thread outlived its consumer"


@pytest.mark.timeout(30)
def test_prefetch_yields_everything_in_order_from_another_thread():
    producer_threads = set()

    def items() -> Iterator[int]:
        for i in range(200):
            producer_threads.add(threading.current_thread().name)
            yield i

    before = set(threading.enumerate())
    assert list(prefetch(items(), depth=3)) == list(range(200))
    assert producer_threads == {PREFETCH_THREAD}
    _assert_none_left(before)


@pytest.mark.timeout(30)
def test_prefetch_runs_at_most_depth_ahead():
    produced = []

    def items() -> Iterator[int]:
        for i in range(100):
            produced.append(i)
            yield i

    iterator = prefetch(items(), depth=2)
    assert next(iterator) == 0
    time.sleep(0.3)  # the producer fills the queue, then waits
    # 1 consumed + 2 queued + 1 produced and waiting for room.
    assert 3 <= len(produced) <= 4
    iterator.close()


@pytest.mark.timeout(30)
def test_prefetch_reraises_the_producers_exception():
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("shard read failed")

    before = set(threading.enumerate())
    received = []
    with pytest.raises(ValueError, match="shard read failed"):
        for item in prefetch(items(), depth=4):
            received.append(item)

    assert received == [1, 2]
    _assert_none_left(before)


@pytest.mark.timeout(30)
def test_prefetch_producer_stops_when_the_consumer_breaks():
    produced = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = set(threading.enumerate())
    for item in prefetch(endless(), depth=2):  # not kept in a variable: the break closes the generator
        if item == 5:
            threads = _new_prefetch_threads(before)
            break

    _assert_ends(threads)
    assert len(produced) <= 6 + 2 + 1


@pytest.mark.timeout(30)
def test_prefetch_producer_ends_when_the_consumer_leaves_after_the_last_item():
    """The producer has put every item and waits for room for its end marker when the consumer leaves."""
    finished = threading.Event()

    def items() -> Iterator[int]:
        yield from range(2)
        finished.set()

    before = set(threading.enumerate())
    iterator = prefetch(items(), depth=1)
    assert next(iterator) == 0
    assert finished.wait(5)  # item 1 fills the queue; the end marker has no room until the consumer takes it
    threads = _new_prefetch_threads(before)
    iterator.close()

    _assert_ends(threads)


@pytest.mark.timeout(30)
def test_prefetch_producer_ends_when_it_fails_after_the_consumer_left():
    failed = threading.Event()

    def items() -> Iterator[int]:
        try:
            yield from range(2)
            raise RuntimeError("late failure")
        finally:
            failed.set()

    before = set(threading.enumerate())
    iterator = prefetch(items(), depth=1)
    assert next(iterator) == 0
    assert failed.wait(5)  # item 1 fills the queue; the exception has no room until the consumer takes item 1
    threads = _new_prefetch_threads(before)
    iterator.close()

    _assert_ends(threads)


# ------------------------------------------------------------------------------------------ Prefetched and Turns

from workers.label.pipeline import Prefetched, Turn, Turns  # noqa: E402 - kept with the tests that use them


@pytest.mark.timeout(30)
def test_prefetched_starts_producing_before_the_first_next():
    started = threading.Event()

    def items() -> Iterator[int]:
        started.set()
        yield from range(3)

    with Prefetched(items(), depth=4) as ahead:
        assert started.wait(5), "the producer did not start until the consumer asked"
        assert list(ahead) == [0, 1, 2]


@pytest.mark.timeout(30)
def test_prefetched_closed_unconsumed_lets_its_thread_end():
    before = set(threading.enumerate())

    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    with Prefetched(endless(), depth=2):
        time.sleep(0.2)  # the queue fills; the producer waits for room
    _assert_none_left(before)


@pytest.mark.timeout(30)
def test_prefetched_reraises_and_then_stays_exhausted():
    def items() -> Iterator[int]:
        yield 1
        raise OSError("stream reset")

    ahead = Prefetched(items(), depth=2)
    assert next(ahead) == 1
    with pytest.raises(OSError, match="stream reset"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)


@pytest.mark.timeout(30)
def test_turns_are_served_in_ticket_order_whatever_order_threads_ask():
    turns = Turns()
    tickets = [turns.take() for _ in range(4)]
    served: list[int] = []

    def take_turn(turn: Turn) -> None:
        with turn:
            turn.wait()
            served.append(turn.ticket)

    threads = [threading.Thread(target=take_turn, args=(t,)) for t in reversed(tickets)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)  # later tickets ask first
    for thread in threads:
        thread.join(5)
    assert served == [0, 1, 2, 3]


@pytest.mark.timeout(30)
def test_a_turn_ended_without_waiting_does_not_block_the_next():
    """A shard that fails before its turn (its input cannot be opened) must not hold up the shards behind it."""
    turns = Turns()
    first, failed, third = turns.take(), turns.take(), turns.take()
    failed.end()  # out of order: recorded, passed over once `first` ends
    released = threading.Event()

    def wait_third() -> None:
        third.wait()
        released.set()

    thread = threading.Thread(target=wait_third)
    thread.start()
    assert not released.wait(0.2)  # `first` still holds its turn
    first.end()
    first.end()  # idempotent
    assert released.wait(5)
    thread.join(5)


def test_stage_seconds_in_markers_old_markers_parse_and_totals_skip_them():
    from schemas.shards import ShardResult, StageSeconds

    base = {"shard_id": "s", "job_id": "j", "fingerprint": "f", "data_uri": "d", "rows": 1, "errors": 0,
            "bytes_read": 1, "seconds": 1.0, "attempt": 1}  # fmt: skip
    old = ShardResult.model_validate(base)  # a marker written before per-stage timings
    new = ShardResult.model_validate({**base, "stages": {"read": 1, "decode": 2.5, "infer": 4, "write": 0.5}})

    assert old.stages is None and new.stages.wait == 0
    assert StageSeconds.total([old]) is None
    assert StageSeconds.total([old, new, new]).model_dump() == {"read": 2, "decode": 5, "infer": 8, "write": 1,
                                                                "wait": 0}  # fmt: skip
    assert new.stages.plus("write", 0.25).write == 0.75
    assert ShardResult.model_validate_json(new.model_dump_json()) == new
