"""DoNuSeg losses (paper Eq. 1-7) as pure, keyword-only, jit-able functions with explicit ignore masks.

Label maps are int8 (1 nucleus, 0 background, -1 ignored); every loss is a per-image mean over that
image's valid pixels, then a batch mean, and is finite (value and gradient) for empty sets.
"""

from donuseg_jax.losses.contrastive import contrastive_loss
from donuseg_jax.losses.dcs import binarize_cam
from donuseg_jax.losses.dcs import dcs_loss
from donuseg_jax.losses.dcs import dynamic_cam_selection
from donuseg_jax.losses.dcs import similarity_rate
from donuseg_jax.losses.detection import detection_loss
from donuseg_jax.losses.detection import detection_targets
from donuseg_jax.losses.localization import localization_loss
from donuseg_jax.losses.localization import localization_target
from donuseg_jax.losses.segmentation import segmentation_loss
from donuseg_jax.losses.total import pseudo_label_diagnostics
from donuseg_jax.losses.total import total_loss

__all__ = [
    'binarize_cam', 'contrastive_loss', 'dcs_loss', 'detection_loss', 'detection_targets',
    'dynamic_cam_selection', 'localization_loss', 'localization_target', 'pseudo_label_diagnostics',
    'segmentation_loss', 'similarity_rate', 'total_loss',
]
