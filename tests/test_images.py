"""Image reading: every accepted format ends as (H, W, 3) uint8 RGB; bad files name themselves."""

import numpy as np
import PIL.Image
import pytest
import tifffile

from donuseg_jax.data import images


def _rgb(height=6, width=5):
  return np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)


def test_png_rgb_round_trip(tmp_path):
  path = tmp_path / 'a.png'
  PIL.Image.fromarray(_rgb()).save(path)
  np.testing.assert_array_equal(images.read_image(path), _rgb())


def test_rgba_drops_alpha(tmp_path):
  rgba = np.concatenate([_rgb(), np.full((6, 5, 1), 7, np.uint8)], axis=-1)
  path = tmp_path / 'rgba.png'
  PIL.Image.fromarray(rgba, mode='RGBA').save(path)
  image = images.read_image(path)
  assert image.shape == (6, 5, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image, _rgb())


@pytest.mark.parametrize('mode', ['L', 'LA'])
def test_grayscale_becomes_rgb(tmp_path, mode):
  gray = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
  array = gray if mode == 'L' else np.stack([gray, np.full_like(gray, 255)], axis=-1)
  path = tmp_path / f'{mode}.png'
  PIL.Image.fromarray(array, mode=mode).save(path)
  image = images.read_image(path)
  assert image.shape == (6, 5, 3)
  for channel in range(3):
    np.testing.assert_array_equal(image[..., channel], gray)


def test_16_bit_tiff_scaled_by_dtype_range(tmp_path):
  array = np.array([[[0, 257, 65535]], [[32896, 1000, 128]]], np.uint16)  # (2, 1, 3)
  path = tmp_path / 'deep.tif'
  tifffile.imwrite(path, array, photometric='rgb', compression='lzw')
  image = images.read_image(path)
  expected = np.round(array / 65535 * 255).astype(np.uint8)
  np.testing.assert_array_equal(image, expected)
  assert image[0, 0].tolist() == [0, 1, 255]


def test_16_bit_grayscale_png(tmp_path):
  gray = np.array([[0, 65535], [257, 514]], np.uint16)
  path = tmp_path / 'gray16.png'
  PIL.Image.fromarray(gray).save(path)
  image = images.read_image(path)
  np.testing.assert_array_equal(image[..., 1], [[0, 255], [1, 2]])


def test_planar_tiff_is_transposed(tmp_path):
  path = tmp_path / 'planar.tif'
  tifffile.imwrite(path, np.moveaxis(_rgb(8, 9), -1, 0), photometric='rgb', planarconfig='separate')
  np.testing.assert_array_equal(images.read_image(path), _rgb(8, 9))


def test_float_images_converted_or_rejected(tmp_path):
  unit = np.linspace(0, 1, 30, dtype=np.float32).reshape(6, 5)
  path = tmp_path / 'unit.tif'
  tifffile.imwrite(path, unit)
  np.testing.assert_array_equal(images.read_image(path)[..., 0], np.round(unit * 255).astype(np.uint8))
  tifffile.imwrite(path, unit * 300)
  with pytest.raises(images.DataError, match='unit.tif.*outside'):
    images.read_image(path)


def test_signed_integers_rejected(tmp_path):
  path = tmp_path / 'signed.tif'
  tifffile.imwrite(path, np.zeros((4, 4), np.int16))
  with pytest.raises(images.DataError, match='signed.tif.*int16'):
    images.read_image(path)


def test_corrupt_empty_and_missing_files_are_named(tmp_path):
  corrupt = tmp_path / 'broken.png'
  good = tmp_path / 'good.png'
  PIL.Image.fromarray(_rgb(40, 40)).save(good)
  corrupt.write_bytes(good.read_bytes()[:60])  # truncated
  with pytest.raises(images.DataError, match=r'broken\.png.*cannot decode'):
    images.read_image(corrupt)
  garbage = tmp_path / 'garbage.tif'
  garbage.write_bytes(b'II*\x00not really a tiff')
  with pytest.raises(images.DataError, match=r'garbage\.tif'):
    images.read_image(garbage)
  empty = tmp_path / 'empty.png'
  empty.write_bytes(b'')
  with pytest.raises(images.DataError, match=r'empty\.png.*empty'):
    images.read_image(empty)
  with pytest.raises(images.DataError, match=r'absent\.png.*no such'):
    images.read_image(tmp_path / 'absent.png')


def test_stacks_and_odd_channels_rejected():
  with pytest.raises(images.DataError, match='stack.tif'):
    images.to_rgb_uint8(np.zeros((2, 4, 4, 3), np.uint8), source='stack.tif')
  with pytest.raises(images.DataError, match='5 channels'):
    images.to_rgb_uint8(np.zeros((6, 6, 5), np.uint8), source='x.tif')


def test_pad_to_min_size_pads_bottom_right_only():
  image = _rgb(100, 300)
  padded = images.pad_to_min_size(image, 256, value=255)
  assert padded.shape == (256, 300, 3)
  np.testing.assert_array_equal(padded[:100], image)  # coordinates unchanged
  assert (padded[100:] == 255).all()
  instances = np.ones((10, 20), np.int32)
  assert images.pad_to_min_size(instances, 16).shape == (16, 20)
  assert images.pad_to_min_size(image, 50) is image
