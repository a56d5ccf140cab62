"""Image files, tar shards and parquet tables for the captioned-data tests
(img2dataset's layouts), and a cheap stand-in for the tokenizers."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq

from muse_jax.data.captioned import preprocess


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def rgb(seed: int, size=(48, 40)) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3),
                                      dtype=np.uint8))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
  """A PNG header claiming a huge image (PIL refuses it on open)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
  """A 48x24 (w x h) JPEG whose EXIF orientation (6) says rotate 90 deg."""
  exif = Image.Exif()
  exif[0x0112] = 6
  return encode(rgb(7, (48, 24)), "JPEG", exif=exif.tobytes())


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
  try:
    import webdataset  # pylint: disable=g-import-not-at-top
  except ImportError:
    webdataset = None
  if webdataset is not None:  # img2dataset's own writer.
    with webdataset.TarWriter(str(path)) as sink:
      for key, files in samples:
        sink.write({"__key__": key, **files})
    return
  with tarfile.open(path, "w") as tar:
    for key, files in samples:
      for ext, data in files.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def valid(i: int) -> dict[str, bytes]:
  return {"jpg": encode(rgb(100 + i), "JPEG"),
          "txt": f"photo number {i}".encode(),
          "json": json.dumps({"caption": f"photo number {i}",
                              "key": f"{i:09d}"}).encode()}


def write_parquet(path, rows: list[dict]) -> None:
  table = pa.table({
      "key": [r["key"] for r in rows],
      "jpg": pa.array([r.get("jpg") for r in rows], pa.binary()),
      "caption": pa.array([r.get("caption") for r in rows], pa.string()),
  })
  pq.write_table(table, path, row_group_size=7)


def fake_tokens(batch):
  """Reader examples -> records: a 16 px centre crop's 4x4 block means as
  "tokens" (deterministic, no model)."""
  cfg = preprocess.PreprocessConfig(image_size=16)
  out = []
  for ex in batch:
    p = preprocess.preprocess(ex, cfg)
    blocks = p["image"].reshape(4, 4, 4, 4, 3).mean(axis=(1, 3, 4))
    out.append({"tokens": blocks.astype(np.int32).reshape(-1),
                "caption": p["caption"], "key": p["key"]})
  return out


def shapes_examples(split: str, n: int, size: int = 64
                    ) -> list[tuple[str, Image.Image, list[str]]]:
  """(key, image, captions) of `n` shapes scenes, each image cut to a
  non-square size x (3/4 size) rectangle (real data is not square) and
  given two captions (COCO has five)."""
  from muse_jax.data import shapes  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(n):
    scene = shapes.sample_scene(split, i)
    image = shapes.render(scene, size)[:, size // 8:size - size // 8]
    captions = [shapes.caption(scene, 0), shapes.caption(scene, 1)]
    out.append((f"{split}{i:05d}", Image.fromarray(image), captions))
  return out


def write_format(root, fmt: str, examples, *, per_shard: int = 8) -> dict:
  """Writes `examples` in img2dataset's webdataset or parquet layout or
  COCO's; returns the `data.<split>` overrides that read them."""
  import os  # pylint: disable=g-import-not-at-top
  os.makedirs(root, exist_ok=True)
  chunks = [examples[i:i + per_shard]
            for i in range(0, len(examples), per_shard)]
  if fmt == "webdataset":
    for j, chunk in enumerate(chunks):
      write_tar(os.path.join(root, f"{j:05d}.tar"), [
          (key, {"jpg": encode(img, "JPEG", quality=95),
                 "txt": caps[0].encode(),
                 "json": json.dumps({"caption": caps[0],
                                     "key": key}).encode()})
          for key, img, caps in chunk])
    return {"path": str(root)}
  if fmt == "parquet":
    for j, chunk in enumerate(chunks):
      write_parquet(os.path.join(root, f"{j:05d}.parquet"), [
          {"key": key, "jpg": encode(img, "PNG"), "caption": caps[0]}
          for key, img, caps in chunk])
    return {"path": str(root)}
  if fmt == "coco":
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    meta = {"images": [], "annotations": []}
    for i, (_, img, caps) in enumerate(examples):
      name = f"{i:012d}.jpg"
      img.save(os.path.join(images, name), quality=95)
      meta["images"].append({"id": i, "file_name": name})
      meta["annotations"] += [{"id": 10 * i + k, "image_id": i, "caption": c}
                              for k, c in enumerate(caps)]
    path = os.path.join(root, "captions.json")
    with open(path, "w") as f:
      json.dump(meta, f)
    return {"path": path, "images": images, "records_per_shard": per_shard}
  raise ValueError(fmt)
