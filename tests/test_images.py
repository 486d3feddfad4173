"""Image reading: every accepted format ends as (H, W, 3) uint8 RGB; bad files name themselves."""

import io

import imagecodecs
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


def _colour_patches():
  """(32, 32, 3) uint8 RGB of four flat 16x16 colours (JPEG keeps their centres nearly exact)."""
  image = np.zeros((32, 32, 3), np.uint8)
  image[:16, :16] = (200, 50, 10)
  image[:16, 16:] = (20, 120, 230)
  image[16:, :16] = (250, 250, 250)
  image[16:, 16:] = (90, 60, 160)
  return image


def test_cmyk_jpeg_becomes_rgb(tmp_path):
  # Pillow writes CMYK JPEGs as Photoshop does: Adobe marker, inverted ink values.
  path = tmp_path / 'cmyk.jpg'
  PIL.Image.fromarray(_colour_patches()).convert('CMYK').save(path, quality=100)
  assert PIL.Image.open(path).mode == 'CMYK'
  image = images.read_image(path)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  np.testing.assert_allclose(image[8::16, 8::16].astype(int), _colour_patches()[8::16, 8::16], atol=3)


def test_ycck_jpeg_becomes_rgb(tmp_path):
  # A YCCK JPEG (Adobe transform 2): libjpeg turns it into inverted CMYK, then into RGB.
  cmyk = 255 - np.asarray(PIL.Image.fromarray(_colour_patches()).convert('CMYK'))  # Adobe: inverted
  path = tmp_path / 'ycck.jpg'
  path.write_bytes(imagecodecs.jpeg8_encode(cmyk, level=100, colorspace='CMYK', outcolorspace='YCCK'))
  assert PIL.Image.open(path).info.get('adobe_transform') == 2
  image = images.read_image(path)
  np.testing.assert_allclose(image[8::16, 8::16].astype(int), _colour_patches()[8::16, 8::16], atol=3)


def test_cmyk_tiff_becomes_rgb(tmp_path):
  rgb = _colour_patches()
  cmyk = np.asarray(PIL.Image.fromarray(rgb).convert('CMYK'))  # plain (not inverted) ink values
  path = tmp_path / 'cmyk.tif'
  tifffile.imwrite(path, cmyk, photometric='separated')
  np.testing.assert_array_equal(images.read_image(path), rgb)
  ink = np.array([[[0, 0, 0, 128], [255, 0, 0, 0]]], np.uint16) * 257  # 16-bit: half black, cyan
  tifffile.imwrite(path, ink, photometric='separated')
  np.testing.assert_array_equal(images.read_image(path), [[[127, 127, 127], [0, 255, 255]]])


@pytest.mark.parametrize('pages', [2, 3, 5])
def test_multi_page_tiff_refused_with_what_was_found(tmp_path, pages):
  path = tmp_path / 'stack.tif'
  tifffile.imwrite(path, np.zeros((pages, 512, 600), np.uint8), photometric='minisblack')
  with pytest.raises(images.DataError, match=(
      rf'stack\.tif: TIFF holds {pages} pages.*shape \({pages}, 512, 600\).*MINISBLACK')):
    images.read_image(path)
  with pytest.raises(images.DataError, match=rf'{pages} pages'):  # zip members too
    images.decode_image(path.read_bytes(), source='slides.zip:stack.tif')


def test_pages_written_one_by_one_refused(tmp_path):
  path = tmp_path / 'appended.tif'
  for value in (0, 100, 200):
    tifffile.imwrite(path, np.full((8, 9), value, np.uint8), append=True)
  with pytest.raises(images.DataError, match=r'appended\.tif: TIFF holds 3 pages'):
    images.read_image(path)


def test_reduced_resolution_pages_are_ignored(tmp_path):
  path = tmp_path / 'pyramid.tif'
  with tifffile.TiffWriter(path) as tiff:
    tiff.write(_rgb(8, 10), photometric='rgb')
    tiff.write(_rgb(4, 5), photometric='rgb', subfiletype=1)  # a reduced-resolution level
  np.testing.assert_array_equal(images.read_image(path), _rgb(8, 10))


def test_multi_sample_gray_tiff_refused(tmp_path):
  # One page, 3 samples, photometric MINISBLACK: a channel stack, not RGB.
  path = tmp_path / 'channels.tif'
  tifffile.imwrite(path, np.zeros((3, 8, 9), np.uint8), photometric='minisblack',
                   planarconfig='separate')
  with pytest.raises(images.DataError, match=r'channels\.tif: unsupported TIFF.*MINISBLACK, 3 sample'):
    images.read_image(path)


def test_miniswhite_and_palette_tiffs(tmp_path):
  gray = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
  path = tmp_path / 'white.tif'
  tifffile.imwrite(path, 255 - gray, photometric='miniswhite')
  np.testing.assert_array_equal(images.read_image(path)[..., 2], gray)
  colormap = np.zeros((3, 256), np.uint16)
  colormap[:, 1] = (65535, 0, 0)
  colormap[:, 2] = (0, 0, 65535)
  indices = np.array([[0, 1], [2, 1]], np.uint8)
  tifffile.imwrite(path, indices, photometric='palette', colormap=colormap)
  np.testing.assert_array_equal(images.read_image(path),
                                [[[0, 0, 0], [255, 0, 0]], [[0, 0, 255], [255, 0, 0]]])


def test_unsupported_photometric_named(tmp_path):
  path = tmp_path / 'lab.tif'
  tifffile.imwrite(path, np.zeros((4, 4, 3), np.uint8), photometric='cielab')
  with pytest.raises(images.DataError, match=r'lab\.tif: unsupported TIFF.*CIELAB'):
    images.read_image(path)


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
  with pytest.raises(images.DataError, match='9 channels'):  # (3, H, W) is not guessed to be planar
    images.to_rgb_uint8(np.zeros((3, 8, 9), np.uint8), source='planes.npy')


def test_huge_tiff_header_refused_before_decoding(tmp_path, monkeypatch):
  path = tmp_path / 'big.tif'
  tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric='rgb')
  monkeypatch.setattr(images, 'MAX_PIXELS', 64 * 63)
  with pytest.raises(images.DataError, match=r'big\.tif: TIFF image of 64x64 pixels is larger'):
    images.read_image(path)


def test_pad_to_min_size_pads_bottom_right_only():
  image = _rgb(100, 300)
  padded = images.pad_to_min_size(image, 256, value=255)
  assert padded.shape == (256, 300, 3)
  np.testing.assert_array_equal(padded[:100], image)  # coordinates unchanged
  assert (padded[100:] == 255).all()
  instances = np.ones((10, 20), np.int32)
  assert images.pad_to_min_size(instances, 16).shape == (16, 20)
  assert images.pad_to_min_size(image, 50) is image


def test_tiff_header_with_zero_width_is_a_data_error(tmp_path):
  path = tmp_path / 'flat.tif'
  tifffile.imwrite(path, _rgb(8, 9), photometric='rgb')
  with tifffile.TiffFile(path) as tiff:
    tag = tiff.pages[0].tags['ImageWidth']
    offset, size = tag.valueoffset, {3: 2, 4: 4}[int(tag.dtype)]  # SHORT or LONG
  data = bytearray(path.read_bytes())
  data[offset:offset + size] = bytes(size)  # ImageWidth = 0
  path.write_bytes(bytes(data))
  with pytest.raises(images.DataError, match=r'flat\.tif: (image has no pixels|cannot decode)'):
    images.read_image(path)
