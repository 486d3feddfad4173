"""Instance assembly (`boxes` and `watershed`) on hand-made masks."""

import numpy as np
import pytest

from donuseg_jax.inference import instances as instances_lib


def disk(shape, centre, radius):
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2


SHAPE = (48, 64)
LEFT, RIGHT = disk(SHAPE, (20, 20), 8), disk(SHAPE, (34, 20), 8)  # touching, one component
STRAY = disk(SHAPE, (55, 40), 3)  # foreground that no box covers
BOX_LEFT = np.array([12, 12, 28, 28], np.float32)  # x0, y0, x1, y1 (pixel centres inclusive)
BOX_RIGHT = np.array([26, 12, 42, 28], np.float32)


def test_boxes_split_touching_disks_in_score_order_and_drop_unclaimed():
  mask = LEFT | RIGHT | STRAY
  assert instances_lib.ndimage.label(LEFT | RIGHT)[1] == 1  # really touching
  cols = np.arange(SHAPE[1])[None, :]
  for scores, first in (([0.9, 0.6], 'left'), ([0.6, 0.9], 'right')):
    labels, kept = instances_lib.instances_from_boxes(mask, np.stack([BOX_LEFT, BOX_RIGHT]),
                                                      np.array(scores), closing=False)
    assert labels.dtype == np.int32 and labels.shape == SHAPE
    np.testing.assert_allclose(kept, sorted(scores, reverse=True))
    union = LEFT | RIGHT
    if first == 'left':  # the best box takes everything inside it, columns 12..28
      want_first, want_second = union & (cols <= 28), union & (cols > 28)
    else:  # columns 26..42
      want_first, want_second = union & (cols >= 26), union & (cols < 26)
    np.testing.assert_array_equal(labels == 1, want_first)
    np.testing.assert_array_equal(labels == 2, want_second)
    assert (labels[STRAY] == 0).all()  # claimed by no box: dropped
    assert set(np.unique(labels)) == {0, 1, 2}


def test_boxes_take_the_largest_component_and_skip_empty_boxes():
  mask = np.zeros((30, 30), bool)
  mask[2:4, 2:5] = True  # 6 pixels
  mask[6:10, 6:10] = True  # 16 pixels
  mask[20:25, 20:25] = True
  mask[21:24, 21:24] = False  # a hole: filled before assembly
  boxes = np.array([[0, 0, 12, 12],  # both small blobs inside: takes the 16-pixel one
                    [25.5, 0, 29, 5],  # no foreground: no id
                    [1.5, 1.5, 4.2, 3.0],  # the 6-pixel blob's pixels with centres inside
                    [19, 19, 26, 26]], np.float32)
  labels, kept = instances_lib.instances_from_boxes(mask, boxes, np.array([0.9, 0.8, 0.7, 0.6]),
                                                    closing=False)
  np.testing.assert_allclose(kept, [0.9, 0.7, 0.6])
  assert (labels[6:10, 6:10] == 1).all() and (labels == 1).sum() == 16
  assert (labels[2:4, 2:5] == 2).all() and (labels == 2).sum() == 6  # rows 2..3, cols 2..4
  assert (labels[20:25, 20:25] == 3).all() and (labels == 3).sum() == 25  # hole filled


def test_boxes_accept_probabilities():
  prob = np.where(LEFT, 0.8, 0.2).astype(np.float32)
  prob[20, 20] = 0.5  # not above the threshold, but a hole inside the disk: filled
  labels, _ = instances_lib.instances_from_boxes(prob, BOX_LEFT[None], np.array([1.0]))
  np.testing.assert_array_equal(labels == 1, LEFT)


def test_closing_fills_gaps_but_never_overwrites_or_merges():
  labels = np.zeros((12, 12), np.int32)
  labels[2:7, 2:7] = 1
  labels[4, 4:7] = 0  # a notch into instance 1 from its right side (closed by 3x3)
  labels[2:7, 8:10] = 2
  labels[4, 7] = 0  # the one-pixel gap between the two: background
  before = labels.copy()
  instances_lib.close_instances(labels)
  assert (labels[4, 4:7] == 1).all()  # the notch is filled
  assert labels[4, 7] == 0  # the gap between two instances is not bridged
  assert ((before > 0) <= (labels == before)).all()  # no pixel changed owner
  assert set(np.unique(labels)) == {0, 1, 2}


def test_watershed_splits_touching_disks_and_drops_unmarked_foreground():
  mask = LEFT | RIGHT | STRAY
  boxes = np.stack([BOX_LEFT, BOX_RIGHT, np.array([0, 40, 6, 46], np.float32)])  # last: centre on bg
  labels, kept = instances_lib.instances_from_watershed(mask, boxes, np.array([0.5, 0.9, 0.99]))
  np.testing.assert_allclose(kept, [0.9, 0.5])  # the background-centred box gets no marker
  assert labels[20, 34] == 1 and labels[20, 20] == 2  # ids in score order
  np.testing.assert_array_equal(labels > 0, LEFT | RIGHT)  # STRAY (no marker) dropped
  cols = np.arange(SHAPE[1])[None, :].repeat(SHAPE[0], 0)
  assert (labels[(LEFT | RIGHT) & (cols <= 24)] == 2).all()  # the split lies near the neck (x=27)
  assert (labels[(LEFT | RIGHT) & (cols >= 30)] == 1).all()


def test_watershed_on_probability_and_empty_input():
  prob = np.where(LEFT | RIGHT, 0.9, 0.1).astype(np.float32)
  labels, _ = instances_lib.instances_from_watershed(prob, np.stack([BOX_LEFT, BOX_RIGHT]),
                                                     np.array([0.9, 0.8]), surface='probability')
  assert set(np.unique(labels)) == {0, 1, 2}
  labels, kept = instances_lib.instances_from_watershed(prob, np.zeros((0, 4)), np.zeros(0))
  assert not labels.any() and kept.shape == (0,)
  with pytest.raises(ValueError, match='unknown eval.instance_method'):
    instances_lib.assemble_instances(prob, np.zeros((0, 4)), np.zeros(0), method='voronoi')


def reference_closing(labels):
  """Closing of each instance's own mask in id order, given the still-background pixels."""
  out = labels.copy()
  for label in range(1, labels.max() + 1):
    mask = np.pad(labels == label, 2)
    closed = instances_lib.ndimage.binary_closing(mask, structure=np.ones((3, 3)))[2:-2, 2:-2]
    out[closed & (out == 0)] = label
  return out


def test_vectorised_closing_equals_closing_each_instance_in_turn():
  rng = np.random.default_rng(0)
  for trial in range(20):
    blobs = instances_lib.ndimage.binary_opening(rng.random((40, 50)) < 0.6)
    labels, _ = instances_lib.ndimage.label(blobs)
    labels[rng.random(labels.shape) < 0.15] = 0  # pepper holes and gaps into them
    labels = labels.astype(np.int32)
    want = reference_closing(labels)
    got = labels.copy()
    instances_lib.close_instances(got)
    assert (want != labels).any() or trial  # the closing does something
    np.testing.assert_array_equal(got, want)


def test_fill_holes_equals_scipy():
  rng = np.random.default_rng(1)
  for trial in range(30):
    mask = rng.random((rng.integers(1, 40), rng.integers(1, 40))) < rng.uniform(0.2, 0.8)
    np.testing.assert_array_equal(instances_lib.fill_holes(mask),
                                  instances_lib.ndimage.binary_fill_holes(mask))
  ring = np.ones((5, 5), bool)
  ring[2, 2] = False
  assert instances_lib.fill_holes(ring).all()
  assert not instances_lib.fill_holes(np.zeros((3, 3), bool)).any()
  assert instances_lib.fill_holes(np.ones((3, 3), bool)).all()


def test_square_closing_equals_scipy():
  rng = np.random.default_rng(2)
  for trial in range(30):
    mask = rng.random((rng.integers(1, 30), rng.integers(1, 30))) < rng.uniform(0.2, 0.9)
    square = np.ones((3, 3), bool)
    np.testing.assert_array_equal(instances_lib._square_dilation(mask),
                                  instances_lib.ndimage.binary_dilation(mask, square))
    np.testing.assert_array_equal(instances_lib._square_erosion(mask),
                                  instances_lib.ndimage.binary_erosion(mask, square))


def test_growth_restores_a_nucleus_its_box_clips_and_never_crosses_background():
  nucleus = disk(SHAPE, (20, 20), 8)
  island = disk(SHAPE, (50, 20), 4)  # foreground out of reach of every instance
  mask = nucleus | island
  small_box = np.array([[16, 16, 24, 24]], np.float32)  # covers the centre only
  clipped, _ = instances_lib.instances_from_boxes(mask, small_box, np.array([0.9]), closing=False)
  assert (clipped == 1).sum() == 81  # the 9 x 9 box: the [code] assembly clips the nucleus
  grown, kept = instances_lib.instances_from_boxes(mask, small_box, np.array([0.9]),
                                                   closing=False, grow=20.0)
  np.testing.assert_array_equal(grown == 1, nucleus)  # the whole disk, and only it
  assert (grown[island] == 0).all() and len(kept) == 1
  near, _ = instances_lib.instances_from_boxes(mask, small_box, np.array([0.9]), closing=False,
                                               grow=2.0)
  yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
  box_distance = np.hypot(np.clip(np.abs(xx - 20) - 4, 0, None), np.clip(np.abs(yy - 20) - 4, 0, None))
  np.testing.assert_array_equal(near == 1, nucleus & (box_distance <= 2.0))  # and no farther


def test_growth_splits_unclaimed_foreground_between_neighbours_by_distance():
  mask = LEFT | RIGHT
  boxes = np.array([[16, 16, 24, 24], [30, 16, 38, 24]], np.float32)  # centres of each disk
  grown, _ = instances_lib.instances_from_boxes(mask, boxes, np.array([0.9, 0.8]), closing=False,
                                                grow=30.0)
  cols = np.arange(SHAPE[1])[None, :]
  assert (grown[mask] > 0).all()
  # Column 27 is equidistant from both boxes (x1 = 24, x0 = 30); left of it is nearer the left one.
  np.testing.assert_array_equal(grown[mask & (cols < 27)], 1)
  np.testing.assert_array_equal(grown[mask & (cols > 27)], 2)
  plain, _ = instances_lib.instances_from_boxes(mask, boxes, np.array([0.9, 0.8]), closing=False)
  assert ((plain > 0) & (plain != grown)).sum() == 0  # growth only adds pixels


def test_unclaimed_blobs_become_instances_above_the_size_only():
  nucleus = disk(SHAPE, (20, 20), 8)
  missed = disk(SHAPE, (50, 20), 4)  # a nucleus no box covers: 49 pixels
  speck = disk(SHAPE, (58, 42), 1)  # 5 pixels of noise
  mask = nucleus | missed | speck
  box = np.array([[12, 12, 28, 28]], np.float32)
  dropped, kept = instances_lib.instances_from_boxes(mask, box, np.array([0.9]), closing=False)
  assert dropped.max() == 1 and len(kept) == 1  # the [code] assembly drops both blobs
  found, kept = instances_lib.instances_from_boxes(mask, box, np.array([0.9]), closing=False,
                                                   unclaimed=10)
  np.testing.assert_array_equal(found == 1, nucleus)
  np.testing.assert_array_equal(found == 2, missed)  # the next id, after the detected ones
  assert (found[speck] == 0).all()  # below the size: still dropped
  np.testing.assert_array_equal(kept, np.float32([0.9, 0.0]))  # no detection scored it
  every, kept = instances_lib.assemble_instances(mask.astype(np.float32), box, np.array([0.9]),
                                                 method='boxes', unclaimed=5)
  assert every.max() == 3 and len(kept) == 3 and (every[speck] == 3).all()


def test_unclaimed_blobs_are_what_growth_leaves():
  nucleus = disk(SHAPE, (20, 20), 8)
  missed = disk(SHAPE, (50, 20), 4)
  small_box = np.array([[16, 16, 24, 24]], np.float32)
  found, kept = instances_lib.instances_from_boxes(nucleus | missed, small_box, np.array([0.9]),
                                                   closing=False, grow=20.0, unclaimed=10)
  np.testing.assert_array_equal(found == 1, nucleus)  # the clipped rim went to its box's instance
  np.testing.assert_array_equal(found == 2, missed)
  assert len(kept) == 2


def test_cells_keep_a_large_box_out_of_its_touching_neighbour():
  mask = LEFT | RIGHT  # two radius-8 disks at x = 20 and x = 34, one component
  boxes = np.array([[8, 8, 40, 32],  # the better box is too wide: it spans most of RIGHT
                    [26, 12, 42, 28]], np.float32)
  scores = np.array([0.9, 0.8])
  plain, _ = instances_lib.instances_from_boxes(mask, boxes, scores, closing=False)
  assert (plain[RIGHT & ~LEFT] == 1).mean() > 0.5  # [code]: box 1 takes the neighbour
  split, kept = instances_lib.assemble_instances(mask.astype(np.float32), boxes, scores,
                                                 method='cells')
  cols = np.arange(SHAPE[1])[None, :]
  # The distance-transform watershed splits the pair at its neck, x = 27.
  np.testing.assert_array_equal(split[mask & (cols < 27)], 1)
  np.testing.assert_array_equal(split[mask & (cols > 27)], 2)
  assert len(kept) == 2
  # A box whose centre is off the foreground has no cell and claims as in `boxes`.
  off = np.array([[44, 0, 63, 30]], np.float32)  # centre (53, 15): background; box covers x >= 44
  blob = disk(SHAPE, (56, 24), 5)
  alone, _ = instances_lib.instances_from_boxes(blob, off, np.array([0.9]), closing=False,
                                                cells=True)
  np.testing.assert_array_equal(alone == 1, blob & (np.arange(SHAPE[0])[:, None] <= 30))
