"""COCO captions: an annotations JSON (`captions_<split>2017.json`) and
its image folder, one example per image with all of its captions.

`Coco(annotations, images)` indexes the JSON once; `example(i)` is image
i (in the JSON's image order) with `captions` every caption of it (five in
COCO, cleaned; the ones that fail cleaning are dropped, an image left with
none is "missing_caption") and `caption` the first. Evaluation scores
against all of them; training draws one per epoch (`preprocess`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
import json
from typing import Any

from etils import epath

from muse_jax.data.captioned import decode
from muse_jax.data.captioned import tally as tally_lib


class Coco:
  """Random access over a COCO captions split."""

  def __init__(self, annotations: epath.PathLike, images: epath.PathLike, *,
               min_size: int = 0):
    self.annotations = epath.Path(annotations)
    self.images = epath.Path(images)
    self.min_size = min_size
    try:
      meta = json.loads(self.annotations.read_text())
      entries = meta["images"]
      notes = meta["annotations"]
      self._files = [(int(e["id"]), str(e["file_name"])) for e in entries]
      captions = collections.defaultdict(list)
      for a in notes:
        captions[int(a["image_id"])].append(a.get("caption"))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{self.annotations}: not a COCO captions file "
                       f"(images with id and file_name, annotations with "
                       f"image_id and caption): {e!r}") from e
    self._captions = dict(captions)

  def __len__(self) -> int:
    return len(self._files)

  def example(self, index: int) -> dict[str, Any]:
    """Image `index` with its captions, or `decode.Skip`."""
    image_id, name = self._files[index]
    captions = decode.clean_captions(self._captions.get(image_id, ()),
                                     f"image id {image_id}")
    try:
      data = (self.images / name).read_bytes()
    except OSError as e:
      raise decode.Skip("missing_image", f"{self.images / name}") from e
    return {"key": str(image_id),
            "image": decode.decode_image(data, min_size=self.min_size),
            "caption": captions[0], "captions": captions}

  def where(self, index: int) -> str:
    return f"{self.annotations}:{self._files[index][0]}"

  def read(self, tally: tally_lib.Tally,
           indices: Iterable[int] | None = None
           ) -> Iterator[dict[str, Any]]:
    """The usable examples among `indices` (default all), in order."""
    return tally_lib.read_indexed(self, tally, indices)
