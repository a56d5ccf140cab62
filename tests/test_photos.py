"""Tests of the scikit-image photographs and crops (muse_jax.data.photos)."""

import numpy as np
import pytest

from muse_jax.data import photos


def test_splits_are_disjoint_and_cover_every_photo():
  train, heldout = photos.list_photos("train"), photos.list_photos("heldout")
  assert not set(train) & set(heldout)
  assert sorted(train + heldout) == sorted(photos.PHOTOS)
  kinds = [photos.PHOTOS[n][1] for n in heldout]
  assert kinds.count("colour") == 3 and kinds.count("gray") == 1
  # The stereo pair shows one scene: both views stay on one side.
  assert {"motorcycle_left", "motorcycle_right"} <= set(train)
  with pytest.raises(ValueError, match="'validation'"):
    photos.list_photos("validation")


def test_photos_load_as_read_only_uint8_rgb():
  for name in photos.PHOTOS:
    image = photos.load_photo(name)
    assert image.dtype == np.uint8 and image.ndim == 3
    assert image.shape[-1] == 3 and min(image.shape[:2]) >= 256, name
    assert not image.flags.writeable
  gray = photos.load_photo("camera")
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  left = photos.load_photo("motorcycle_left")
  assert not np.array_equal(left, photos.load_photo("motorcycle_right"))


def test_unknown_photo_is_named():
  with pytest.raises(ValueError, match="'lena'"):
    photos.load_photo("lena")


def test_random_crops_are_windows_of_the_images():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in ((40, 50), (33, 90))]
  table = photos.sample_crop_table([im.shape for im in images], 200, 32,
                                   np.random.default_rng(1), flip=True)
  crops = table.crops(images)
  assert crops.shape == (200, 32, 32, 3) and crops.dtype == np.uint8
  assert 0 < table.flip.mean() < 1 and set(table.image) == {0, 1}
  for i in range(200):
    y, x = table.top[i], table.left[i]
    window = images[table.image[i]][y:y + 32, x:x + 32]
    np.testing.assert_array_equal(
        crops[i], window[:, ::-1] if table.flip[i] else window)
  # Every corner position that fits is reachable, and none beyond.
  assert table.top.max() <= 8 and table.left.max() <= 58
  again = photos.random_crops(images, 200, 32, np.random.default_rng(1),
                              flip=True)
  np.testing.assert_array_equal(again, crops)
  with pytest.raises(ValueError, match=r"\[1\].*\(33, 90, 3\)"):
    photos.random_crops(images, 1, 34, np.random.default_rng(0))


def test_heldout_crops_are_deterministic_balanced_and_prefix_stable():
  a = photos.heldout_crops(8)
  assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, photos.heldout_crops(8))
  np.testing.assert_array_equal(a, photos.heldout_crops(12)[:8])
  assert not np.array_equal(a, photos.heldout_crops(8, seed=1))
  table = photos.crop_table("heldout", 8)
  np.testing.assert_array_equal(table.image, np.arange(8) % 4)
  assert not table.flip.any()
  assert photos.heldout_crops(2, size=32).shape == (2, 32, 32, 3)


def test_training_source_serves_the_training_crops():
  crops = photos.training_crops(24, size=32, seed=3)
  source = photos.PhotoCropSource(24, 32, 3, key="image_32")
  assert len(source) == 24
  records = np.stack([source[i]["image_32"] for i in range(24)])
  np.testing.assert_array_equal(records, crops)
  np.testing.assert_array_equal(source.crops(), crops)
  assert 0 < source.table.flip.mean() < 1
  # Training crops come from training photos only.
  assert source.table.image.max() < len(photos.list_photos("train"))
  with pytest.raises(IndexError, match="PhotoCropSource"):
    source[24]


def test_iterator_batches_and_resumes_exactly():
  kwargs = dict(batch_size=4, size=16, seed=0, process_index=0,
                process_count=1, num_threads=1)
  it = photos.make_iterator(10, **kwargs)
  first = [next(it) for _ in range(2)]
  assert first[0]["image"].shape == (4, 16, 16, 3)
  assert first[0]["image"].dtype == np.uint8
  state = it.get_state()
  expected = [next(it)["image"] for _ in range(3)]  # Crosses an epoch.
  resumed = photos.make_iterator(10, **kwargs)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["image"], want)
