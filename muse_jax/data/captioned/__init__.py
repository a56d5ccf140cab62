"""Captioned-image datasets in the formats real users download.

Each reader yields `{"key", "image", "caption", "captions"}` examples
(`image` uint8 [H, W, 3]; `captions` every caption the record has,
`caption` the first) from one shard or file at a time, and counts every
record it cannot use in a `tally.Tally` under a reason from
`decode.REASONS` instead of raising:

* `tar_shards`: img2dataset's webdataset layout (`00000.tar` holding
  `<key>.jpg|png|webp` with `<key>.txt` and/or `<key>.json`);
* `parquet_files`: img2dataset's parquet layout (image bytes in a column)
  or a table of image paths.
"""
