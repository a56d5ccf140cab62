"""A folder of the user's own images with their captions.

Captions come from a captions file in the folder or, without one, from a
sidecar `<image stem>.txt` beside each image (the layout of most
fine-tuning kits):

* `captions.jsonl`: one JSON object per line, `{"file": "a.jpg",
  "caption": "..."}` or `"captions": [...]` for several;
* `captions.tsv`: `file<TAB>caption` per line (a file may repeat, one
  caption per line).

Files are listed once, sorted (so every process sees the same order);
`example(i)` reads image i. An image without a caption is
"missing_caption", a listed file that is not there "missing_image".
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
import json
from typing import Any

from etils import epath

from muse_jax.data.captioned import decode
from muse_jax.data.captioned import tally as tally_lib

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif",
                  ".tiff")


def _captions_file(folder: epath.Path) -> dict[str, list[Any]] | None:
  out: dict[str, list[Any]] = collections.defaultdict(list)
  jsonl, tsv = folder / "captions.jsonl", folder / "captions.tsv"
  if jsonl.exists():
    for n, line in enumerate(jsonl.read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        name = str(row["file"])
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{jsonl}:{n}: expected {{\"file\": ..., "
                         f"\"caption\": ...}}, got {line[:80]!r}") from e
      out[name] += (row["captions"] if "captions" in row
                    else [row.get("caption")])
    return out
  if tsv.exists():
    for n, line in enumerate(tsv.read_text().splitlines(), 1):
      if not line.strip():
        continue
      name, tab, caption = line.partition("\t")
      if not tab:
        raise ValueError(f"{tsv}:{n}: expected file<TAB>caption, got "
                         f"{line[:80]!r}")
      out[name].append(caption)
    return out
  return None


def _images_under(folder: epath.Path, prefix: str) -> Iterator[str]:
  """Image paths under `folder`, relative, one directory listing at a time
  (epath has no recursive glob on remote file systems)."""
  for p in folder.iterdir():
    if p.is_dir():
      yield from _images_under(p, f"{prefix}{p.name}/")
    elif p.suffix.lower() in IMAGE_SUFFIXES:
      yield prefix + p.name


class ImageFolder:
  """Random access over a folder of captioned images."""

  def __init__(self, folder: epath.PathLike, *, min_size: int = 0):
    self.folder = epath.Path(folder)
    if not self.folder.is_dir():
      raise ValueError(f"image folder {self.folder} does not exist")
    self.min_size = min_size
    self._listed = _captions_file(self.folder)
    if self._listed is not None:
      self._files = sorted(self._listed)
    else:
      self._files = sorted(_images_under(self.folder, ""))

  def __len__(self) -> int:
    return len(self._files)

  def _raw_captions(self, name: str) -> list[Any]:
    if self._listed is not None:
      return self._listed[name]
    sidecar = (self.folder / name).with_suffix(".txt")
    return [sidecar.read_bytes()] if sidecar.exists() else []

  def example(self, index: int) -> dict[str, Any]:
    """Image `index` (sorted by path) with its captions, or `decode.Skip`."""
    name = self._files[index]
    captions = decode.clean_captions(self._raw_captions(name), name)
    try:
      data = (self.folder / name).read_bytes()
    except OSError as e:
      raise decode.Skip("missing_image", str(self.folder / name)) from e
    return {"key": name,
            "image": decode.decode_image(data, min_size=self.min_size),
            "caption": captions[0], "captions": captions}

  def where(self, index: int) -> str:
    return f"{self.folder}:{self._files[index]}"

  def read(self, tally: tally_lib.Tally,
           indices: Iterable[int] | None = None
           ) -> Iterator[dict[str, Any]]:
    """The usable examples among `indices` (default all), in order."""
    return tally_lib.read_indexed(self, tally, indices)
