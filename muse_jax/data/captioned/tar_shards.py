"""img2dataset's webdataset shards: tar files of `<key>.<ext>` members.

A sample is the run of consecutive members sharing a key (the member path
up to its basename's first dot, webdataset's rule): an image (`jpg`,
`jpeg`, `png` or `webp`) and a caption, from `<key>.txt` or, lacking that,
the `caption` field of `<key>.json` (img2dataset writes both). Shards are
read as streams (`tarfile` "r|*"), so a `gs://` path reads like a local one
(`etils.epath`) and nothing is extracted to disk. A shard cut off mid-file
yields every complete sample before the cut and counts the cut once under
"truncated_shard".
"""

from __future__ import annotations

from collections.abc import Iterator
import json
import posixpath
import tarfile
from typing import Any

from etils import epath

from muse_jax.data.captioned import decode
from muse_jax.data.captioned import tally as tally_lib

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _split(name: str) -> tuple[str, str]:
  """'a/b/000001.jpg' -> ('a/b/000001', 'jpg')."""
  folder, base = posixpath.split(name)
  stem, _, ext = base.partition(".")
  return posixpath.join(folder, stem), ext.lower()


def _caption(files: dict[str, bytes]) -> str:
  if "txt" in files:
    return decode.clean_caption(files["txt"])
  if "json" in files:
    try:
      meta = json.loads(files["json"])
    except ValueError as e:
      raise decode.Skip("bad_metadata", repr(e)) from e
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if caption is None:
      raise decode.Skip("missing_caption", "json without a caption")
    return decode.clean_caption(caption)
  raise decode.Skip("missing_caption")


def example_from_files(key: str, files: dict[str, bytes], *,
                       min_size: int = 0) -> dict[str, Any]:
  """One sample's members (extension -> bytes) -> an example, or `Skip`."""
  caption = _caption(files)
  ext = next((e for e in IMAGE_EXTS if e in files), None)
  if ext is None:
    raise decode.Skip("missing_image", f"members {sorted(files)}")
  return {"key": key, "image": decode.decode_image(files[ext],
                                                  min_size=min_size),
          "caption": caption, "captions": (caption,)}


def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
  key, files = None, {}
  for member in tar:
    if not member.isfile():
      continue
    k, ext = _split(member.name)
    if k != key and key is not None:
      yield key, files
      files = {}
    key = k
    files[ext] = tar.extractfile(member).read()
  if key is not None:
    yield key, files


def read_shard(path: epath.PathLike, tally: tally_lib.Tally, *,
               min_size: int = 0) -> Iterator[dict[str, Any]]:
  """The usable examples of one tar shard, in order; the rest counted."""
  path = epath.Path(path)
  f = tally.open_shard(path)
  if f is None:
    return
  with f:
    try:
      tar = tarfile.open(fileobj=f, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as e:
      tally.skip(decode.Skip("unreadable_shard", repr(e)), where=str(path))
      return
    samples = _samples(tar)
    while True:
      try:
        key, files = next(samples)
      except StopIteration:
        return
      except (tarfile.TarError, OSError, EOFError) as e:
        tally.skip(decode.Skip("truncated_shard", repr(e)), where=str(path))
        return
      example = tally.attempt(
          lambda: example_from_files(key, files, min_size=min_size),  # pylint: disable=cell-var-from-loop
          where=f"{path}:{key}")
      if example is not None:
        yield example
