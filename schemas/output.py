"""Arrow schemas of what jobs write. Constants, so writers, readers and docs agree on one definition.

Lists use Arrow's variable-size list type, which Parquet stores in the standard 3-level LIST layout
that Spark, Athena, DuckDB and ClickHouse all read. FixedSizeList would be stored as a LIST plus
Arrow-only metadata that several engines mishandle.
"""

import pyarrow as pa

# Bump when a column is added, removed or changes meaning; readers check it in the job manifest.
LABEL_SCHEMA_VERSION = 1

LABEL_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # path relative to the input prefix, or the WebDataset key
        pa.field("source", pa.string(), nullable=False),  # object the image came from (tar shard or image file)
        pa.field("shard", pa.string(), nullable=False),
        pa.field("label", pa.string()),  # top-1 class name; null when error is set
        pa.field("label_index", pa.int32()),
        pa.field("score", pa.float32()),  # top-1 softmax probability
        pa.field("topk_labels", pa.list_(pa.string())),
        pa.field("topk_indices", pa.list_(pa.int32())),
        pa.field("topk_scores", pa.list_(pa.float32())),
        pa.field("embedding", pa.list_(pa.float32())),  # penultimate-layer features
        pa.field("width", pa.int32()),  # of the decoded image, after EXIF rotation
        pa.field("height", pa.int32()),
        pa.field("error", pa.string()),  # null when the image was labelled
        pa.field("model", pa.string(), nullable=False),
        pa.field("job_id", pa.string(), nullable=False),
    ],
    metadata={"bulklabel.schema_version": str(LABEL_SCHEMA_VERSION)},
)
