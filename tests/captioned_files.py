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
