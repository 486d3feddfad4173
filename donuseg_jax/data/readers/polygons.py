"""Polygon annotations (MoNuSeg XML regions, ImageJ ROIs) -> one instance map, with an account.

Polygons are painted in the order given; where two overlap, the later one wins (it overwrites the
earlier one's pixels). A pixel belongs to a polygon when its centre lies inside
(`skimage.draw.polygon`). Polygons that yield no instance are dropped and counted:

  - degenerate: fewer than 3 vertices, or no pixel centre inside;
  - covered: every pixel of it is painted over by later polygons.

A partly covered polygon keeps its remaining pixels (possibly in several pieces) as one instance.
"""

import dataclasses

import numpy as np
import skimage.draw


@dataclasses.dataclass
class RegionReport:
  """What became of the polygons of one image (indices are 0-based positions in the input order)."""
  regions: int = 0  # polygons given
  degenerate: list = dataclasses.field(default_factory=list)  # < 3 vertices or no pixel
  covered: list = dataclasses.field(default_factory=list)  # wholly painted over by later ones

  @property
  def dropped(self) -> int:
    return len(self.degenerate) + len(self.covered)

  @property
  def instances(self) -> int:
    return self.regions - self.dropped

  def as_dict(self) -> dict:
    return {'regions': self.regions, 'instances': self.instances, 'dropped': self.dropped,
            'degenerate': list(self.degenerate), 'covered': list(self.covered)}


def rasterise(polygons, shape, *, offset: float = 0.0) -> tuple[np.ndarray, RegionReport]:
  """Paints polygons ((n, 2) arrays of x, y) into an (H, W) int32 instance map with ids 1..K.

  `offset` is added to every vertex first: -0.5 turns corner-origin coordinates (ImageJ, where the
  centre of pixel (0, 0) is (0.5, 0.5)) into this project's centre-origin grid.
  Surviving polygons keep their input order in the ids: the first survivor is 1, the next 2, ...
  """
  height, width = shape[:2]
  labels = np.zeros((height, width), np.int32)  # (H, W) 1-based polygon index, 0 = none
  report = RegionReport(regions=len(polygons))
  for index, polygon in enumerate(polygons):
    polygon = np.asarray(polygon, np.float64).reshape(-1, 2)
    if len(polygon) < 3:
      report.degenerate.append(index)
      continue
    rows, cols = skimage.draw.polygon(polygon[:, 1] + offset, polygon[:, 0] + offset, (height, width))
    if rows.size == 0:
      report.degenerate.append(index)
      continue
    labels[rows, cols] = index + 1
  present = np.zeros(len(polygons) + 1, bool)
  present[np.unique(labels)] = True
  degenerate = set(report.degenerate)
  report.covered = [i for i in range(len(polygons)) if i not in degenerate and not present[i + 1]]
  # Renumber surviving polygons 1..K in input order.
  survives = present[1:]
  new_ids = np.zeros(len(polygons) + 1, np.int32)  # 1-based polygon index -> instance id
  new_ids[1:][survives] = np.arange(1, survives.sum() + 1, dtype=np.int32)
  return new_ids[labels], report
