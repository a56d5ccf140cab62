"""Captioned-image datasets in the formats real users download.

Each reader yields `{"key", "image", "caption", "captions"}` examples
(`image` uint8 [H, W, 3]; `captions` every caption the record has,
`caption` the first) from one shard or file at a time, and counts every
record it cannot use in a `tally.Tally` under a reason from
`decode.REASONS` instead of raising:

* `tar_shards`: img2dataset's webdataset layout (`00000.tar` holding
  `<key>.jpg|png|webp` with `<key>.txt` and/or `<key>.json`);
* `parquet_files`: img2dataset's parquet layout (image bytes in a column)
  or a table of image paths;
* `coco`: COCO captions (annotations JSON + image folder);
* `folder`: a folder of images with sidecar captions or a captions file;
* `tfds_source`: a TFDS dataset prepared as array_record.

`dataset` lists any of them as shards, `preprocess` squares the images and
picks a caption, and `convert` writes ArrayRecord shards (what
`muse_jax.pretokenize` runs).
"""
