"""Arrow schemas of the output tables under `<output>/tables/`.

tables/images/*.parquet  one row per segmented image: its panoptic segments and, when asked
                         for, its semantic map's path and its thing instances
tables/errors/*.parquet  one row per input that failed

Readable by DuckDB, Spark, pandas: e.g.
    SELECT s.category_id, sum(s.area) FROM read_parquet('out/tables/images/*.parquet'),
           unnest(segments) AS t(s) GROUP BY 1
"""

import pyarrow as pa

SEGMENT = pa.struct(
    [
        pa.field("id", pa.int32(), nullable=False),  # pixel value in the panoptic PNG
        pa.field("category_id", pa.int32(), nullable=False),  # COCO category id
        pa.field("label", pa.string(), nullable=False),
        pa.field("isthing", pa.bool_(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("area", pa.int64(), nullable=False),  # pixels
        pa.field("bbox", pa.list_(pa.int32(), 4), nullable=False),  # COCO [x, y, width, height]
    ]
)

INSTANCE = pa.struct(  # --tasks instance: thing instances, may overlap (transformers' instance post-processing)
    [
        pa.field("id", pa.int32(), nullable=False),  # 1.. in the model's order
        pa.field("category_id", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("bbox", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("rle", pa.string(), nullable=False),  # COCO compressed RLE counts; size = [height, width]
    ]
)

IMAGES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # stable id of the input, relative to --input
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),  # after EXIF orientation
        pa.field("height", pa.int32(), nullable=False),
        pa.field("panoptic_png", pa.string(), nullable=False),  # path relative to --output
        pa.field("model", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("segments", pa.list_(SEGMENT), nullable=False),
        pa.field("semantic_png", pa.string()),  # --tasks semantic: path relative to --output, else null
        pa.field("instances", pa.list_(INSTANCE)),  # --tasks instance, else null
    ]
)

ERRORS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # read | decode | preprocess | infer | write
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)
