"""The review app's pictures: a queue item's image read back from where the queue says it is (a file, a tar member,
a Parquet row; local or S3, as the labelling job read it) and resized on the server, so the browser never reaches
the store and gets a JPEG of the size it shows."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from jobs.output.reader import open_output
from jobs.output.report import MAX_THUMB_SOURCE_BYTES, Thumbnail, made_from_sources, thumbnails_of
from jobs.output.results import ResultOutput
from jobs.review.items import ReviewItem
from schemas.curation import QUEUE_TABLE
from schemas.specs import StorageOptions

log = logging.getLogger(__name__)

SIDE = 768  # pixels, the longer side: a large view on a laptop screen
CACHED = 64  # pictures kept in memory: going back a few images, or two reviewers on one image, costs no read


class Pictures:
    """Resized JPEGs of a queue's items, by item; (None, why) for an image that cannot be read any more."""

    def __init__(self, queue: ResultOutput, options: StorageOptions | None):
        self._options = options
        # A review queue's images are rows of the label output it ranked: read back with that job's input layout.
        self._label_output = None
        if queue.manifest.table == QUEUE_TABLE and queue.manifest.sources:
            self._label_output = open_output(queue.manifest.sources[0].uri, options)
        self._cache: OrderedDict[str, tuple[bytes | None, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def jpeg(self, item: ReviewItem) -> tuple[bytes | None, str | None]:
        with self._lock:
            if item.key in self._cache:
                self._cache.move_to_end(item.key)
                return self._cache[item.key]
        wanted = [Thumbnail(key=item.key, source=item.image, label="", score=0.0, runners_up=())]
        if self._label_output is not None:
            made = thumbnails_of(self._label_output, wanted, self._options, side=SIDE)[0]
        else:
            made = made_from_sources(wanted, self._options, MAX_THUMB_SOURCE_BYTES, side=SIDE)[0]
        if made.problem:
            log.warning("image %s cannot be shown: %s", item.key, made.problem)
        with self._lock:
            self._cache[item.key] = (made.jpeg, made.problem)
            while len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        return made.jpeg, made.problem
