"""Parquet tables of captioned images: img2dataset's parquet layout (the
encoded image in a binary column, `jpg` by default) or a table of image
paths (relative to the table's folder, or absolute / `gs://`).

Rows are read a record batch at a time (`pyarrow.parquet.ParquetFile`
over an `etils.epath` file, so remote paths read like local ones). A null
image cell is "null_row", a path to no file "missing_image", a null
caption "missing_caption"; all counted, none raised.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from typing import Any

from etils import epath
import pyarrow as pa
import pyarrow.parquet as pq

from muse_jax.data.captioned import decode
from muse_jax.data.captioned import tally as tally_lib


@dataclasses.dataclass(frozen=True)
class Columns:
  """Which columns hold what. Exactly one of `image` (encoded bytes) and
  `path` (image file paths) is set; `key` may be absent from the table
  (then `<file stem>/<row>`)."""

  image: str | None = "jpg"
  path: str | None = None
  caption: str = "caption"
  key: str = "key"

  def __post_init__(self):
    if (self.image is None) == (self.path is None):
      raise ValueError("parquet columns: set exactly one of image (bytes) "
                       f"and path (file paths), got image={self.image!r} "
                       f"path={self.path!r}")


def _image_bytes(value: Any, folder: epath.Path, columns: Columns
                 ) -> bytes:
  if value is None:
    raise decode.Skip("null_row", f"null {columns.image or columns.path}")
  if columns.image is not None:
    return bytes(value)
  path = epath.Path(value)
  if not path.is_absolute() and "://" not in str(value):
    path = folder / value
  try:
    return path.read_bytes()
  except OSError as e:
    raise decode.Skip("missing_image", f"{path}: {e!r}") from e


def _example(key: str, caption: Any, image: Any, folder: epath.Path,
             columns: Columns, min_size: int) -> dict[str, Any]:
  caption = decode.clean_caption(caption)
  raw = _image_bytes(image, folder, columns)
  return {"key": key, "image": decode.decode_image(raw, min_size=min_size),
          "caption": caption, "captions": (caption,)}


def read_file(path: epath.PathLike, tally: tally_lib.Tally, *,
              columns: Columns = Columns(), min_size: int = 0,
              batch_rows: int = 256) -> Iterator[dict[str, Any]]:
  """The usable examples of one parquet file, in row order."""
  path = epath.Path(path)
  f = tally.open_shard(path)
  if f is None:
    return
  with f:
    try:
      table = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
      tally.skip(decode.Skip("unreadable_shard", repr(e)), where=str(path))
      return
    names = set(table.schema_arrow.names)
    wanted = [c for c in (columns.image, columns.path, columns.caption)
              if c is not None]
    missing = [c for c in wanted if c not in names]
    if missing:
      raise ValueError(f"{path}: no column {missing} (columns: "
                       f"{sorted(names)}); set the reader's Columns")
    read = wanted + ([columns.key] if columns.key in names else [])
    row = 0
    batches = table.iter_batches(batch_size=batch_rows, columns=read)
    while True:
      try:
        data = next(batches).to_pydict()
      except StopIteration:
        return
      except (pa.ArrowException, OSError) as e:  # A damaged row group.
        tally.skip(decode.Skip("unreadable_shard", f"after row {row}: "
                               f"{e!r}"), where=str(path))
        return
      num_rows = len(data[columns.caption])
      for i in range(num_rows):
        key = (str(data[columns.key][i]) if columns.key in data
               else f"{path.stem}/{row}")
        row += 1
        example = tally.attempt(
            lambda: _example(key, data[columns.caption][i],  # pylint: disable=cell-var-from-loop
                             data[columns.image or columns.path][i],
                             path.parent, columns, min_size),
            where=f"{path}:{key}")
        if example is not None:
          yield example
