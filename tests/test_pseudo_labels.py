"""Initial label M and LUDA pseudo boxes on hand-made cases (DESIGN.md section 2)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scipy import ndimage

from donuseg_jax.data import pseudo_labels


def test_initial_label_known_distances():
  label = pseudo_labels.initial_label(np.array([[10., 20.]]), (40, 60), r=4., d=20.)
  assert label.dtype == np.int8 and label.shape == (40, 60)
  assert label[20, 10] == 1
  assert label[20, 14] == 1  # distance 4 = r: foreground
  assert label[20, 15] == -1  # 5: ignored
  assert label[23, 13] == -1  # sqrt(18) = 4.24 > r
  assert label[20, 30] == -1  # 20 = d: still ignored
  assert label[20, 31] == 0  # 21 > d: background
  assert label[36, 22] == -1  # (16, 12) away: exactly d, ignored
  assert label[37, 22] == 0


def test_initial_label_exact_band_sizes():
  # Foreground = the 49 pixel centres within distance 4 of the point (Gauss circle, r = 4).
  label = pseudo_labels.initial_label(np.array([[50., 50.]]), (101, 101), r=4., d=20.)
  assert (label == 1).sum() == 49
  ys, xs = np.mgrid[:101, :101]
  dist = np.hypot(ys - 50, xs - 50)
  np.testing.assert_array_equal(label == 0, dist > 20)
  np.testing.assert_array_equal(label == -1, (dist > 4) & (dist <= 20))


def test_initial_label_nearest_point_decides():
  points = np.array([[5., 5.], [40., 5.]])
  label = pseudo_labels.initial_label(points, (10, 50), r=2., d=10.)
  assert label[5, 5] == 1 and label[5, 40] == 1
  assert label[5, 22] == 0  # 17 and 18 from the two points
  assert label[5, 15] == -1  # exactly 10 from the first


def test_initial_label_no_points_is_background():
  label = pseudo_labels.initial_label(np.zeros((0, 2), np.float32), (7, 9))
  assert label.dtype == np.int8 and label.shape == (7, 9) and (label == 0).all()


def test_rounding_half_up_and_outside_points():
  pixels = pseudo_labels.point_pixels(np.array([[2.5, 3.49], [-0.5, 0.]]))
  np.testing.assert_array_equal(pixels, [[3, 3], [0, 0]])
  with pytest.raises(ValueError, match=r'point 1 \(x=10, y=2\) lies outside'):
    pseudo_labels.initial_label(np.array([[1., 1.], [10., 2.]]), (5, 10))
  with pytest.raises(ValueError, match=r'point 0 \(x=-0.6, y=1\)'):
    pseudo_labels.initial_label(np.array([[-0.6, 1.]]), (5, 5))
  assert pseudo_labels.initial_label(np.array([[-0.5, 4.49]]), (5, 5))[4, 0] == 1


def test_boxes_few_points_rule():
  one = pseudo_labels.pseudo_boxes(np.array([[100., 100.]]), (400, 500), s_max=1000.)
  np.testing.assert_allclose(one, [[60., 60., 140., 140.]])  # side 400 / 5 = 80
  two = pseudo_labels.box_sides(np.array([[10., 10.], [30., 10.]]), (48, 48), s_max=1000.)
  np.testing.assert_allclose(two, [12., 12.])  # max(48 / 6 = 8, 12)
  # The default s_max then caps the rule for nuclei.
  np.testing.assert_allclose(pseudo_labels.box_sides(np.array([[1., 1.]]), (400, 500)), [40.])
  assert pseudo_labels.pseudo_boxes(np.zeros((0, 2)), (10, 10)).shape == (0, 4)


def test_boxes_regular_grid_side_is_spacing():
  # Every point of a grid with spacing 14 has its 2 nearest neighbours at 14: d_i = 14 everywhere,
  # so every local mean is 14 too, whatever R gathers.
  ys, xs = np.mgrid[30:200:14, 40:220:14]
  points = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
  for range_split in (1, 10, 1000):
    sides = pseudo_labels.box_sides(points, (256, 256), range_split=range_split)
    np.testing.assert_allclose(sides, 14.)
  boxes = pseudo_labels.pseudo_boxes(points, (256, 256), ratio=0.5)
  np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 7.)
  np.testing.assert_allclose(boxes[:, :2], points - 3.5)


def test_boxes_local_distance_and_local_mean():
  # A horizontal line: R = 0 (max_y - min_y = 0), so each side is its own d_i.
  points = np.array([[0., 5.], [10., 5.], [30., 5.], [60., 5.]])
  sides = pseudo_labels.box_sides(points, (100, 100), s_min=0., s_max=100.)
  np.testing.assert_allclose(sides, [(10 + 30) / 2, (10 + 20) / 2, (20 + 30) / 2, (30 + 50) / 2])
  # Vertical line y = 0, 10, 30, 60, 100, 150: d = 20, 15, 25, 35, 45, 70; R = 150 / 10 = 15;
  # neighbourhoods of 6 // 2 = 3 nearest: only the ones within 15 count.
  points = np.array([[5., y] for y in (0, 10, 30, 60, 100, 150)])
  sides = pseudo_labels.box_sides(points, (200, 20), s_min=0., s_max=100.)
  np.testing.assert_allclose(sides, [(20 + 15) / 2, (15 + 20) / 2, 25, 35, 45, 70])
  sides = pseudo_labels.box_sides(points, (200, 20), range_split=5, s_min=0., s_max=100.)
  # R = 30: point 10's 3 nearest are itself, 0 (10) and 30 (20), all within 30.
  np.testing.assert_allclose(sides[1], (15 + 20 + 25) / 3)
  np.testing.assert_allclose(sides[3], (35 + 25) / 2)  # 60: itself and 30 (30); 100 is 40 away


def test_boxes_side_clipping_and_image_clipping():
  points = np.array([[0., 0.], [2., 0.], [0., 2.], [300., 300.]])  # three crowded, one far
  sides = pseudo_labels.box_sides(points, (400, 400), range_split=1e9)
  assert sides[:3].min() == 6. and sides[3] == 40.
  boxes = pseudo_labels.pseudo_boxes(points, (310, 305))
  assert boxes.dtype == np.float32
  np.testing.assert_allclose(boxes[0], [-0.5, -0.5, 3., 3.])
  np.testing.assert_allclose(boxes[3], [280., 280., 304.5, 309.5])


def _reference_sides(points, height, ratio, range_split):
  """Loop version of LUDA, written from the description, for comparison."""
  count = len(points)
  dist = np.hypot(*(points[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
  order = np.argsort(dist, axis=1, kind='stable')
  local = np.array([ratio * np.sort(dist[i])[1:3].mean() for i in range(count)])
  radius = (points[:, 1].max() - points[:, 1].min()) / range_split
  sides = []
  for i in range(count):
    near = order[i, :max(count // 2, 1)]
    chosen = [j for j in near if dist[i, j] <= radius]
    sides.append(local[chosen].mean())
  return np.array(sides)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 127), st.integers(0, 127)), min_size=3, max_size=30,
                unique=True),
       st.sampled_from([0.5, 1.]), st.sampled_from([1, 4, 10]))
def test_boxes_match_loop_reference(coords, ratio, range_split):
  points = np.array(coords, np.float64)
  expected = np.clip(_reference_sides(points, 128, ratio, range_split), 6., 40.)
  # Ties among equidistant neighbours may be ordered differently: compare where there are none.
  dist = np.sort(np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1)), axis=1)
  n = max(len(points) // 2, 1)
  untied = np.ones(len(points), bool) if n == len(points) else dist[:, n - 1] < dist[:, n]
  sides = pseudo_labels.box_sides(points, (128, 128), ratio=ratio, range_split=range_split)
  np.testing.assert_allclose(sides[untied], expected[untied], rtol=1e-9)
  boxes = pseudo_labels.pseudo_boxes(points, (128, 128), ratio=ratio, range_split=range_split)
  inside = ((boxes[:, 0] <= points[:, 0]) & (points[:, 0] <= boxes[:, 2]) &
            (boxes[:, 1] <= points[:, 1]) & (points[:, 1] <= boxes[:, 3]))
  assert inside.all() and boxes.min() >= -0.5 and boxes.max() <= 127.5


def _stained_scene():
  """Pink tissue with hematoxylin-dark round nuclei of radius 8 and one 'nucleus' of radius 40
  (a dark smear); clicks at their centres."""
  rows, cols = np.mgrid[:160, :160]
  image = np.empty((160, 160, 3), np.uint8)
  image[:] = (235, 190, 215)
  centres = [(30., 30.), (100., 40.), (40., 110.)]
  nuclei = np.zeros((160, 160), bool)
  for x, y in centres:
    nuclei |= (rows - y) ** 2 + (cols - x) ** 2 <= 64
  smear = (rows - 115) ** 2 + (cols - 115) ** 2 <= 1600
  image[nuclei | smear] = (70, 40, 130)
  return image, np.array(centres + [(115., 115.)], np.float32), nuclei, smear


def test_watershed_label_grows_over_the_stained_nucleus():
  image, points, nuclei, smear = _stained_scene()
  label = pseudo_labels.watershed_label(image, points, cap=20., sigma=1., band=3)
  assert label.dtype == np.int8 and set(np.unique(label)) <= {-1, 0, 1}
  fg = label == 1
  # The whole nucleus, not a disk of r = 4 (50 px of its 200): recall and precision both high.
  assert np.sum(fg & nuclei) / nuclei.sum() > 0.9
  assert np.sum(fg & nuclei) / np.sum(fg & ~smear) > 0.9
  # The smear is cut at the cap: nothing beyond 20 px (plus rounding) of its click.
  rows, cols = np.nonzero(fg & smear)
  assert np.hypot(rows - 115, cols - 115).max() <= 20.5
  # A 3-px ignored ring, then background.
  ring = ndimage.binary_dilation(fg, iterations=3) & ~fg
  np.testing.assert_array_equal(label[ring], -1)
  far = ~ndimage.binary_dilation(fg, structure=np.ones((3, 3), bool), iterations=3)
  np.testing.assert_array_equal(label[far], 0)
  # No points: all background, as for the paper's M.
  np.testing.assert_array_equal(pseudo_labels.watershed_label(image, np.zeros((0, 2))), 0)


def test_watershed_regions_split_touching_nuclei_between_clicks():
  rows, cols = np.mgrid[:64, :96]
  image = np.full((64, 96, 3), (235, 190, 215), np.uint8)
  pair = ((rows - 32) ** 2 + (cols - 38) ** 2 <= 100) | ((rows - 32) ** 2 + (cols - 56) ** 2 <= 100)
  image[pair] = (70, 40, 130)
  regions = pseudo_labels.hematoxylin_regions(image, np.array([[38., 32.], [56., 32.]], np.float32))
  assert set(np.unique(regions)) == {0, 1, 2}
  assert regions[32, 30] == 1 and regions[32, 64] == 2
  assert np.sum(regions > 0) >= 0.9 * pair.sum()


def test_make_initial_label_dispatches_on_config():
  from configs import default  # noqa: PLC0415
  image, points, _, _ = _stained_scene()
  config = default.get_config(None)
  np.testing.assert_array_equal(
      pseudo_labels.make_initial_label(image, points, labels=config.labels),
      pseudo_labels.initial_label(points, image.shape[:2], r=config.labels.r, d=config.labels.d))
  plus = default.get_config('plus')
  assert plus.labels.initial == 'watershed'
  np.testing.assert_array_equal(pseudo_labels.make_initial_label(image, points, labels=plus.labels),
                                pseudo_labels.watershed_label(image, points))


def test_watershed_label_fills_the_pale_centre_of_a_vesicular_nucleus():
  rows, cols = np.mgrid[:64, :64]
  image = np.full((64, 64, 3), (235, 190, 215), np.uint8)
  radius2 = (rows - 32) ** 2 + (cols - 32) ** 2
  image[(radius2 <= 144) & (radius2 > 25)] = (70, 40, 130)  # dark rim, pale chromatin inside
  label = pseudo_labels.watershed_label(image, np.array([[25., 32.]], np.float32))  # click on the rim
  np.testing.assert_array_equal(label[radius2 <= 144], 1)
