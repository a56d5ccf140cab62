"""TFDS datasets prepared in the array_record format, read without
TensorFlow (`as_data_source`: random access through numpy).

`TfdsSource(name_or_dir, split)` opens a prepared dataset by name (with
`data_dir`) or from its version directory (`tfds.builder_from_directory`:
no builder code needed), e.g. COCO captions built with
`tfds build coco_captions --file_format=array_record` (building needs
TensorFlow: the `data` extra; reading does not). Which features hold the
image and the captions is configurable, a nested feature by a "/" path
("captions/text" for coco_captions, whose five captions per image all
become the example's `captions`). Images may come decoded (any channel
count, converted to RGB) or as encoded bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from etils import epath
import numpy as np
from PIL import Image

from muse_jax.data.captioned import decode
from muse_jax.data.captioned import tally as tally_lib


def _feature(record: dict[str, Any], path: str) -> Any:
  value: Any = record
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      have = sorted(value) if isinstance(value, dict) else type(value)
      raise KeyError(f"TFDS record has no feature {path!r} (at {part!r}: "
                     f"{have})")
    value = value[part]
  return value


def _image(value: Any, min_size: int) -> np.ndarray:
  if isinstance(value, (bytes, np.bytes_)):
    return decode.decode_image(bytes(value), min_size=min_size)
  a = np.asarray(value)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3) or a.size == 0:
    raise decode.Skip("corrupt_image", f"array of shape {a.shape}")
  if a.dtype != np.uint8:  # Float or 16-bit features: through PNG rules.
    raise decode.Skip("corrupt_image", f"image feature of dtype {a.dtype}")
  img = Image.fromarray(a)
  buf = np.asarray(decode.to_rgb(img))
  if min(buf.shape[:2]) < min_size:
    raise decode.Skip("too_small", f"{buf.shape[1]}x{buf.shape[0]}")
  return buf


class TfdsSource:
  """Random access over one split of a prepared TFDS dataset."""

  def __init__(self, name_or_dir: str, split: str, *, data_dir: str = "",
               image_key: str = "image", caption_key: str = "caption",
               min_size: int = 0):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    path = epath.Path(name_or_dir)
    try:
      if (path / "dataset_info.json").exists():
        builder = tfds.builder_from_directory(str(path))
      else:
        builder = tfds.builder(name_or_dir, data_dir=data_dir or None)
      self._source = builder.as_data_source(split)
    except Exception as e:  # TFDS raises many kinds; name the dataset.
      raise ValueError(f"TFDS dataset {name_or_dir!r} split {split!r} "
                       f"(data_dir {data_dir or 'default'}): cannot open "
                       f"it as an array_record data source: {e}") from e
    self.name, self.split = name_or_dir, split
    self.image_key, self.caption_key = image_key, caption_key
    self.min_size = min_size

  def __len__(self) -> int:
    return len(self._source)

  def example(self, index: int) -> dict[str, Any]:
    """Record `index` as an example, or `decode.Skip`."""
    record = self._source[index]
    raw = _feature(record, self.caption_key)
    raws = (list(raw) if isinstance(raw, (list, tuple, np.ndarray))
            else [raw])
    captions = decode.clean_captions(
        [r.item() if isinstance(r, np.generic) else r for r in raws],
        f"record {index}")
    return {"key": f"{self.split}/{index}",
            "image": _image(_feature(record, self.image_key), self.min_size),
            "caption": captions[0], "captions": captions}

  def where(self, index: int) -> str:
    return f"{self.name}[{self.split}]:{index}"

  def read(self, tally: tally_lib.Tally,
           indices: Iterable[int] | None = None
           ) -> Iterator[dict[str, Any]]:
    """The usable examples among `indices` (default all), in order."""
    return tally_lib.read_indexed(self, tally, indices)
