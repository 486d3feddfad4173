"""Region reads of large and pyramidal TIFFs against tifffile's whole-level decoding."""

import numpy as np
import pytest
import skimage.io
import tifffile

from donuseg_jax.data import images
from donuseg_jax.data import slides

TNBC_IMAGE = 'tnbc/TNBC_NucleiSegmentation/Slide_01/01_1.png'


@pytest.fixture(scope='module')
def mosaic(data_root):
  """A 700 x 900 RGB image of real H&E (a TNBC tile, mirrored to fill)."""
  tile = skimage.io.imread(data_root / TNBC_IMAGE)[..., :3]
  return np.pad(tile, ((0, 188), (0, 388), (0, 0)), mode='reflect')


def write_pyramid(path, image, *, ome=False, **options):
  """Levels 0, 1, 2 (SubIFDs) by 2x decimation, as tifffile (and QuPath) write pyramids."""
  planar = options.get('planarconfig') == 'separate'
  with tifffile.TiffWriter(path, ome=ome) as tiff:
    for step in (1, 2, 4):
      level = image[::step, ::step]
      tiff.write(np.moveaxis(level, -1, 0) if planar else level, photometric='rgb', **options,
                 **(dict(subifds=2) if step == 1 else dict(subfiletype=1)))


def whole_level(path, level):
  with tifffile.TiffFile(path) as tiff:
    return tiff.series[0].levels[level].asarray()


REGIONS = [(0, 0, 5, 7), (250, 300, 200, 333), (1, 255, 1, 2), (600, 800, 100, 100)]


@pytest.mark.parametrize('options', [
    dict(tile=(256, 256), compression='zlib'),
    dict(tile=(128, 256), compression='jpeg'),
    dict(tile=(64, 64), planarconfig='separate'),
    dict(rowsperstrip=37, compression='lzw')])
def test_regions_equal_the_whole_level(mosaic, tmp_path, options):
  path = tmp_path / 'pyramid.tif'
  write_pyramid(path, mosaic, **options)
  for level in (0, 1, 2):
    want = whole_level(path, level)
    if want.shape[0] == 3:
      want = np.moveaxis(want, 0, -1)  # planar
    with slides.open_slide(path, level=level) as slide:
      assert slide.shape == want.shape[:2] and slide.level == level
      assert slide.downsample == pytest.approx((700 / want.shape[0], 900 / want.shape[1]))
      for row, col, rows, cols in REGIONS:
        row, col = row // 2 ** level, col // 2 ** level
        rows, cols = min(rows, want.shape[0] - row), min(cols, want.shape[1] - col)
        got = slide.read(row, col, rows, cols)
        assert got.dtype == np.uint8 and got.shape == (rows, cols, 3)
        np.testing.assert_array_equal(got, want[row:row + rows, col:col + cols])
  if options.get('compression') != 'jpeg':
    with slides.open_slide(path) as slide:
      np.testing.assert_array_equal(slide.read(0, 0, 700, 900), mosaic)


def test_ome_pixel_size_picks_the_level(mosaic, tmp_path):
  path = tmp_path / 'slide.ome.tif'
  with tifffile.TiffWriter(path, ome=True) as tiff:
    tiff.write(mosaic, subifds=2, photometric='rgb', tile=(128, 128),
               metadata={'PhysicalSizeX': 0.25, 'PhysicalSizeXUnit': 'µm'})
    for step in (2, 4):
      tiff.write(mosaic[::step, ::step], subfiletype=1, photometric='rgb', tile=(128, 128))
  assert slides.is_slide(path, max_pixels=1 << 30)
  with slides.open_slide(path) as slide:
    assert slide.mpp == pytest.approx(0.25) and len(slide.level_shapes) == 3
  with slides.open_slide(path, mpp=0.5) as slide:  # 20x-equivalent: level 1
    assert slide.level == 1 and slide.mpp == pytest.approx(0.5)
  with slides.open_slide(path, mpp=0.3) as slide:  # no level that fine but coarser: level 0
    assert slide.level == 0
  with slides.open_slide(path, mpp=10) as slide:
    assert slide.level == 2
  with pytest.raises(images.DataError, match='no pyramid level 3'):
    slides.open_slide(path, level=3)


def test_svs_description_and_resolution_tags_give_the_pixel_size(mosaic, tmp_path):
  svs = tmp_path / 'scan.tif'
  tifffile.imwrite(svs, mosaic, tile=(256, 256), photometric='rgb',
                   description='Aperio Image Library v12.0.15\r\n900x700 |AppMag = 40|MPP = 0.2520')
  with slides.open_slide(svs) as slide:
    assert slide.mpp == pytest.approx(0.252)
  tagged = tmp_path / 'tagged.tif'
  tifffile.imwrite(tagged, mosaic, tile=(256, 256), photometric='rgb',
                   resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit='CENTIMETER')
  with slides.open_slide(tagged) as slide:
    assert slide.mpp == pytest.approx(0.5)
  plain = tmp_path / 'plain.tif'
  tifffile.imwrite(plain, mosaic, photometric='rgb')
  assert not slides.is_slide(plain, max_pixels=1 << 20)  # 0.63 MP, stripped, one level
  assert slides.is_slide(plain, max_pixels=1 << 18)
  with pytest.raises(images.DataError, match='records no pixel size'):
    slides.open_slide(plain, mpp=0.5)


def test_sixteen_bit_and_gray_are_converted_like_whole_images(mosaic, tmp_path):
  deep = tmp_path / 'deep.tif'
  tifffile.imwrite(deep, mosaic.astype(np.uint16) * 257, tile=(64, 64), photometric='rgb')
  gray = tmp_path / 'gray.tif'
  tifffile.imwrite(gray, mosaic[..., 0], tile=(64, 64), photometric='minisblack')
  with slides.open_slide(deep) as slide:
    np.testing.assert_array_equal(slide.read(10, 20, 100, 120), mosaic[10:110, 20:140])
    np.testing.assert_array_equal(slide.read(0, 0, 700, 900), images.read_image(deep))
  with slides.open_slide(gray) as slide:
    np.testing.assert_array_equal(slide.read(5, 5, 3, 3), np.repeat(mosaic[5:8, 5:8, :1], 3, -1))


def test_bad_files_and_regions_are_named(mosaic, tmp_path):
  stack = tmp_path / 'stack.tif'
  tifffile.imwrite(stack, np.zeros((5, 64, 64), np.uint8), tile=(32, 32))
  with pytest.raises(images.DataError, match=r'stack.tif.*one 2-D image per level'):
    slides.open_slide(stack)
  junk = tmp_path / 'junk.tif'
  junk.write_text('not a tiff')
  with pytest.raises(images.DataError, match='junk.tif: cannot decode'):
    slides.open_slide(junk)
  with pytest.raises(images.DataError, match='no such'):
    slides.open_slide(tmp_path / 'missing.tif')
  path = tmp_path / 'ok.tif'
  tifffile.imwrite(path, mosaic, tile=(64, 64), photometric='rgb')
  with slides.open_slide(path) as slide:
    with pytest.raises(ValueError, match='not inside the 900x700 image'):
      slide.read(650, 0, 100, 10)
  # A damaged tile: the message names the file and the region.
  data = bytearray(path.read_bytes())
  with tifffile.TiffFile(path) as tiff:
    offset = tiff.pages[0].dataoffsets[0]
  data[offset:offset + 64] = b'\xff' * 64
  broken = tmp_path / 'broken.tif'
  tifffile.imwrite(broken, mosaic, tile=(64, 64), photometric='rgb', compression='zlib')
  data = bytearray(broken.read_bytes())
  with tifffile.TiffFile(broken) as tiff:
    offset, count = tiff.pages[0].dataoffsets[0], tiff.pages[0].databytecounts[0]
  data[offset:offset + count] = b'\x00' * count
  broken.write_bytes(bytes(data))
  with slides.open_slide(broken) as slide:
    with pytest.raises(images.DataError, match=r'broken.tif: cannot decode the region 0,0,10,10'):
      slide.read(0, 0, 10, 10)
