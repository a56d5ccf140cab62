"""Captioned-image readers: conversions, skips by reason, nothing lost.

The fuzz-style test writes tar shards (img2dataset's webdataset layout,
with `webdataset.TarWriter` when installed) and parquet files mixing valid
records with every kind of broken one, and checks every valid record comes
out exactly once and every broken one is counted under its reason.
"""

from __future__ import annotations

import collections
import json

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import captioned_files as files
from muse_jax.data.captioned import decode
from muse_jax.data.captioned import parquet_files
from muse_jax.data.captioned import tally as tally_lib
from muse_jax.data.captioned import tar_shards


# --- Conversions. ---


@pytest.mark.parametrize("make", [
    lambda: files.encode(files.rgb(0).convert("L"), "PNG"),
    lambda: files.encode(files.rgb(0).convert("CMYK"), "JPEG"),
    lambda: files.encode(files.rgb(0).convert("P"), "PNG"),
    lambda: files.encode(files.rgb(0).convert("RGBA"), "PNG"),
    lambda: files.encode(files.rgb(0).convert("LA"), "PNG"),
    lambda: files.encode(Image.fromarray(
        (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30)),
                    "PNG"),
    lambda: files.encode(files.rgb(0), "WEBP"),
    lambda: files.encode(files.rgb(0), "GIF"),
], ids=["gray", "cmyk", "palette", "rgba", "gray_alpha", "16bit", "webp",
        "gif"])
def test_every_mode_becomes_uint8_rgb(make):
  image = decode.decode_image(make())
  assert image.dtype == np.uint8 and image.shape == (40, 48, 3)


def test_alpha_is_composited_on_white_and_16bit_scaled():
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[:4, :, 3] = 255  # Top half opaque red, bottom half transparent.
  image = decode.decode_image(files.encode(Image.fromarray(rgba), "PNG"))
  np.testing.assert_array_equal(image[0, 0], [255, 0, 0])
  np.testing.assert_array_equal(image[7, 0], [255, 255, 255])
  deep = np.full((8, 8), 65535, np.uint16)
  deep[0, 0] = 0
  image = decode.decode_image(files.encode(Image.fromarray(deep), "PNG"))
  assert image[1, 1].tolist() == [255] * 3 and image[0, 0].tolist() == [0] * 3


def test_exif_orientation_is_applied():
  image = decode.decode_image(files.exif_rotated_jpeg())
  assert image.shape == (48, 24, 3)


@pytest.mark.parametrize("data,reason", [
    (None, "missing_image"),
    (b"", "corrupt_image"),
    (b"\xff\xd8 not really a jpeg", "corrupt_image"),
    (files.bomb_png(), "too_large"),
])
def test_undecodable_images_are_skipped_by_reason(data, reason):
  with pytest.raises(decode.Skip) as e:
    decode.decode_image(data)
  assert e.value.reason == reason


def test_truncated_jpeg_and_tiny_image():
  full = files.encode(files.rgb(1), "JPEG")
  with pytest.raises(decode.Skip, match="corrupt_image"):
    decode.decode_image(full[:len(full) // 2])
  with pytest.raises(decode.Skip, match="too_small"):
    decode.decode_image(files.encode(files.rgb(1, (20, 12)), "PNG"), min_size=16)


def test_captions_are_cleaned_or_skipped():
  assert decode.clean_caption(b"\xef\xbb\xbf a  red\n\tcircle ") == (
      "a red circle")
  assert decode.clean_caption("caf\u00e9") == "caf\u00e9"
  for raw, reason in ((None, "missing_caption"), (" \n", "empty_caption"),
                      (b"\xff\xfe caf\xe9", "caption_not_utf8")):
    with pytest.raises(decode.Skip) as e:
      decode.clean_caption(raw)
    assert e.value.reason == reason


def test_unknown_reason_is_refused():
  with pytest.raises(ValueError, match="unknown skip reason"):
    decode.Skip("bad_luck")


# --- The fuzz-style test over shards. ---


# Broken records: (members, reason) or, for convertible ones, (members, None).
def _cases() -> list[tuple[dict[str, bytes], str | None]]:
  good_jpg = files.encode(files.rgb(3), "JPEG")
  return [
      ({"jpg": good_jpg[:len(good_jpg) // 3], "txt": b"cut"},
       "corrupt_image"),
      ({"jpg": b"<html>404 not found</html>", "txt": b"html"},
       "corrupt_image"),
      ({"png": files.bomb_png(), "txt": b"bomb"}, "too_large"),
      ({"png": files.encode(files.rgb(4, (8, 8)), "PNG"), "txt": b"tiny"},
       "too_small"),
      ({"txt": b"caption without an image"}, "missing_image"),
      ({"jpg": good_jpg}, "missing_caption"),
      ({"jpg": good_jpg, "json": b'{"url": "x"}'}, "missing_caption"),
      ({"jpg": good_jpg, "txt": b"   \n "}, "empty_caption"),
      ({"jpg": good_jpg, "txt": b"caf\xe9 latin-1"}, "caption_not_utf8"),
      ({"jpg": good_jpg, "json": b'{"caption": "unterminated'},
       "bad_metadata"),
      # Convertible: come out as RGB.
      ({"png": files.encode(files.rgb(5).convert("L"), "PNG"), "txt": b"gray"}, None),
      ({"jpg": files.encode(files.rgb(5).convert("CMYK"), "JPEG"), "txt": b"cmyk"},
       None),
      ({"png": files.encode(files.rgb(5).convert("P"), "PNG"), "txt": b"palette"},
       None),
      ({"png": files.encode(files.rgb(5).convert("RGBA"), "PNG"), "txt": b"alpha"},
       None),
      ({"png": files.encode(Image.fromarray(np.full((40, 40), 4000, np.uint16)),
                       "PNG"), "txt": b"16-bit"}, None),
      ({"jpg": files.exif_rotated_jpeg(), "txt": b"rotated"}, None),
      ({"webp": files.encode(files.rgb(6), "WEBP"), "json": json.dumps(
          {"caption": "webp with json caption"}).encode()}, None),
  ]


def test_fuzz_every_valid_record_once_every_broken_one_counted(tmp_path):
  rng = np.random.default_rng(0)
  expected_keys, expected = set(), collections.Counter()
  records_written = 0
  shards = []
  for s in range(3):  # Three shards, valid and broken records interleaved.
    samples = []
    for j, (members, reason) in enumerate(_cases()):
      for k in range(2):
        key = f"{s:05d}{j:02d}{k}"
        valid = files.valid(int(key))
        samples.append((key + "v", valid))
        expected_keys.add(key + "v")
        samples.append((key + "b", members))
        if reason is None:
          expected_keys.add(key + "b")
        else:
          expected[reason] += 1
    order = rng.permutation(len(samples))
    samples = [samples[i] for i in order]
    records_written += len(samples)
    path = tmp_path / f"{s:05d}.tar"
    files.write_tar(path, samples)
    shards.append(path)
  # A shard cut off inside sample 3's first member: samples 0-2 come out,
  # the cut is counted once.
  cut_samples = [(f"90000{i:03d}", files.valid(900000 + i)) for i in range(6)]
  files.write_tar(tmp_path / "cut.tar", cut_samples)
  data = (tmp_path / "cut.tar").read_bytes()
  header = data.index(b"90000003.")
  (tmp_path / "cut.tar").write_bytes(data[:header + 512 + 100])
  shards.append(tmp_path / "cut.tar")
  expected["truncated_shard"] = 1
  # Shards that are empty, not a tar, or missing.
  (tmp_path / "empty.tar").write_bytes(b"")
  (tmp_path / "junk.tar").write_bytes(b"PK\x03\x04 a zip, not a tar" * 40)
  shards += [tmp_path / "empty.tar", tmp_path / "junk.tar",
             tmp_path / "missing.tar"]
  expected.update({"empty_shard": 1, "unreadable_shard": 2})

  tally = tally_lib.Tally()
  out = [ex for shard in shards for ex in tar_shards.read_shard(shard, tally,
                                                                 min_size=16)]
  keys = [ex["key"] for ex in out]
  assert len(keys) == len(set(keys))  # Exactly once.
  assert set(keys) == expected_keys | {f"90000{i:03d}" for i in range(3)}
  assert dict(tally.skipped) == dict(expected)
  assert tally.ok == len(out)
  assert len(_cases()) - sum(r is None for _, r in _cases()) >= 10
  for ex in out:
    assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
    assert ex["image"].shape[2] == 3 and ex["caption"]
  summary = tally.summary()
  assert summary["total"] == summary["ok"] + sum(summary["skipped"].values())
  assert summary["examples"]["corrupt_image"][0]["where"].endswith("b")
  tally.write(tmp_path / "skips.json")
  assert json.loads((tmp_path / "skips.json").read_text())["ok"] == len(out)


def test_parquet_bytes_rows_null_and_broken_counted(tmp_path):
  rows, good = [], set()
  for i in range(30):
    rows.append({"key": f"v{i}", "jpg": files.encode(files.rgb(i), "JPEG"),
                 "caption": f"image {i}"})
    good.add(f"v{i}")
  rows += [{"key": "null_image", "caption": "no bytes"},
           {"key": "null_caption", "jpg": files.encode(files.rgb(1), "JPEG")},
           {"key": "garbage", "jpg": b"\x00" * 50, "caption": "garbage"},
           {"key": "gray", "jpg": files.encode(files.rgb(2).convert("L"), "PNG"),
            "caption": "gray"}]
  good.add("gray")
  files.write_parquet(tmp_path / "part-0.parquet", rows)
  tally = tally_lib.Tally()
  out = list(parquet_files.read_file(tmp_path / "part-0.parquet", tally))
  assert sorted(ex["key"] for ex in out) == sorted(good)
  assert dict(tally.skipped) == {"null_row": 1, "missing_caption": 1,
                                 "corrupt_image": 1}
  assert tally.total == len(rows)


def test_parquet_paths_relative_to_the_table(tmp_path):
  (tmp_path / "img").mkdir()
  files.rgb(0).save(tmp_path / "img" / "a.png")
  table = pa.table({"path": ["img/a.png", "img/none.png", None],
                    "caption": ["a", "b", "c"]})
  pq.write_table(table, tmp_path / "paths.parquet")
  tally = tally_lib.Tally()
  out = list(parquet_files.read_file(
      tmp_path / "paths.parquet", tally,
      columns=parquet_files.Columns(image=None, path="path")))
  assert [ex["key"] for ex in out] == ["paths/0"]
  assert dict(tally.skipped) == {"missing_image": 1, "null_row": 1}


def test_parquet_bad_files_and_columns(tmp_path):
  tally = tally_lib.Tally()
  (tmp_path / "junk.parquet").write_bytes(b"not parquet at all" * 10)
  (tmp_path / "empty.parquet").write_bytes(b"")
  for name in ("junk", "empty", "missing"):
    assert not list(parquet_files.read_file(tmp_path / f"{name}.parquet",
                                            tally))
  assert dict(tally.skipped) == {"unreadable_shard": 2, "empty_shard": 1}
  pq.write_table(pa.table({"text": ["a"]}), tmp_path / "cols.parquet")
  with pytest.raises(ValueError, match=r"no column \['jpg', 'caption'\]"):
    list(parquet_files.read_file(tmp_path / "cols.parquet", tally))
  with pytest.raises(ValueError, match="exactly one of image"):
    parquet_files.Columns(image="jpg", path="path")


# --- COCO and image folders. ---


def test_coco_one_example_per_image_with_all_its_captions(tmp_path):
  (tmp_path / "val2017").mkdir()
  images, notes = [], []
  for i in range(4):
    name = f"{i:012d}.jpg"
    images.append({"id": 100 + i, "file_name": name, "width": 48,
                   "height": 40})
    if i != 3:  # Image 3's file is missing.
      files.rgb(i).save(tmp_path / "val2017" / name)
    for j in range(5 if i != 2 else 0):  # Image 2 has no captions.
      notes.append({"id": 10 * i + j, "image_id": 100 + i,
                    "caption": f" caption {j} of\nimage {i} "})
  notes.append({"id": 999, "image_id": 101, "caption": "   "})
  ann = tmp_path / "captions_val2017.json"
  ann.write_text(json.dumps({"images": images, "annotations": notes}))
  from muse_jax.data.captioned import coco  # pylint: disable=g-import-not-at-top
  source = coco.Coco(ann, tmp_path / "val2017")
  tally = tally_lib.Tally()
  out = list(source.read(tally))
  assert [ex["key"] for ex in out] == ["100", "101"]
  assert out[1]["captions"] == tuple(f"caption {j} of image 1"
                                     for j in range(5))
  assert out[0]["caption"] == "caption 0 of image 0"
  assert dict(tally.skipped) == {"missing_caption": 1, "missing_image": 1}
  ann.write_text(json.dumps({"images": [{"id": 1}]}))
  with pytest.raises(ValueError, match="not a COCO captions file"):
    coco.Coco(ann, tmp_path)


def test_image_folder_sidecars_and_captions_files(tmp_path):
  from muse_jax.data.captioned import folder  # pylint: disable=g-import-not-at-top
  side = tmp_path / "side"
  (side / "sub").mkdir(parents=True)
  files.rgb(0).save(side / "b.png")
  (side / "b.txt").write_text("a cat\n")
  files.rgb(1).save(side / "sub" / "a.jpg")
  (side / "sub" / "a.txt").write_bytes(b"caf\xe9")
  files.rgb(2).save(side / "c.webp")  # No sidecar.
  tally = tally_lib.Tally()
  out = list(folder.ImageFolder(side).read(tally))
  assert [(ex["key"], ex["caption"]) for ex in out] == [("b.png", "a cat")]
  assert dict(tally.skipped) == {"caption_not_utf8": 1,
                                 "missing_caption": 1}

  listed = tmp_path / "listed"
  listed.mkdir()
  files.rgb(3).save(listed / "x.png")
  (listed / "captions.jsonl").write_text(
      json.dumps({"file": "x.png", "captions": ["one", "two"]}) + "\n"
      + json.dumps({"file": "gone.png", "caption": "lost"}) + "\n")
  tally = tally_lib.Tally()
  out = list(folder.ImageFolder(listed).read(tally))
  assert out[0]["captions"] == ("one", "two")
  assert dict(tally.skipped) == {"missing_image": 1}
  (listed / "captions.jsonl").unlink()
  (listed / "captions.tsv").write_text("x.png\tfirst\nx.png\tsecond\n")
  assert folder.ImageFolder(listed).example(0)["captions"] == (
      "first", "second")
  (listed / "captions.tsv").write_text("x.png first\n")
  with pytest.raises(ValueError, match=r"captions.tsv:1: expected file<TAB>"):
    folder.ImageFolder(listed)
  with pytest.raises(ValueError, match="does not exist"):
    folder.ImageFolder(tmp_path / "nowhere")


# --- Preprocessing. ---


def test_resize_keeps_the_aspect_and_crops_a_square():
  from muse_jax.data.captioned import preprocess as pp  # pylint: disable=g-import-not-at-top
  # A 100x300 (h x w) image: left third red, middle green, right blue.
  image = np.zeros((100, 300, 3), np.uint8)
  image[:, :100, 0] = image[:, 100:200, 1] = image[:, 200:, 2] = 255
  center = pp.resize_and_crop(image, 50)
  assert center.shape == (50, 50, 3)
  assert (center[:, 5:45, 1] > 250).all()  # The green middle, unstretched.
  rng = np.random.default_rng(0)
  crops = set()
  for _ in range(40):
    out = pp.resize_and_crop(image, 50, crop="random", rng=rng)
    assert out.shape == (50, 50, 3)
    crops.add(out.tobytes())
  assert len(crops) > 5  # The square moves along the long side.
  small = pp.resize_and_crop(np.zeros((20, 30, 3), np.uint8), 64)
  assert small.shape == (64, 64, 3)
  tall = pp.resize_and_crop(np.zeros((301, 99, 3), np.uint8), 33)
  assert tall.shape == (33, 33, 3)


def test_caption_choice_and_config_errors():
  from muse_jax.data.captioned import preprocess as pp  # pylint: disable=g-import-not-at-top
  ex = {"key": "k", "image": np.zeros((8, 8, 3), np.uint8),
        "caption": "a", "captions": ("a", "b", "c")}
  cfg = pp.PreprocessConfig(image_size=4)
  assert pp.preprocess(ex, cfg)["caption"] == "a"
  cfg = pp.PreprocessConfig(image_size=4, caption="random")
  rng = np.random.default_rng(1)
  assert {pp.preprocess(ex, cfg, rng)["caption"] for _ in range(30)} == {
      "a", "b", "c"}
  with pytest.raises(ValueError, match="needs an rng"):
    pp.preprocess(ex, cfg)
  for bad, match in (({"crop": "top"}, "preprocess.crop"),
                     ({"caption": "all"}, "preprocess.caption"),
                     ({"image_size": 0}, "image_size")):
    with pytest.raises(ValueError, match=match):
      pp.PreprocessConfig(**bad)
