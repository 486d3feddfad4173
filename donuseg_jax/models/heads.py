"""The four task heads of DoNuSeg (DESIGN.md section 1): FCOS detection, segmentation, localization,
and the projector g of the contrastive module. All return float32 whatever the compute dtype.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp

from donuseg_jax.models import fpn as fpn_lib

_NORMAL_001 = nnx.initializers.normal(0.01)  # FCOS head init [code]
_KAIMING = nnx.initializers.variance_scaling(2.0, 'fan_in', 'normal')  # layers followed by a ReLU
CLS_PRIOR = 0.01  # FCOS: initial foreground probability of every location
# exp() of the box branch is clipped here: e^10 px exceeds any window, and bf16/f32 overflow
# (inf distances -> NaN IoU) in an early unstable step would end the run.
MAX_LOG_DISTANCE = 10.0


def group_norm_groups(channels: int) -> int:
  """GroupNorm(32) as in FCOS; narrower (test) towers use the largest group count dividing them."""
  return math.gcd(32, channels)


def _conv(in_ch: int, out_ch: int, size: int, *, init, dtype, rngs: nnx.Rngs, bias_init=None) -> nnx.Conv:
  pad = size // 2
  return nnx.Conv(in_ch, out_ch, (size, size), padding=((pad, pad), (pad, pad)), dtype=dtype,
                  kernel_init=init, bias_init=bias_init or nnx.initializers.zeros_init(), rngs=rngs)


class ConvGNReLU(nnx.Module):
  """3x3 conv + GroupNorm + ReLU, the unit of the detection and segmentation towers."""

  def __init__(self, in_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(in_ch, out_ch, 3, init=_NORMAL_001, dtype=dtype, rngs=rngs)
    self.norm = nnx.GroupNorm(out_ch, num_groups=group_norm_groups(out_ch), epsilon=1e-5, dtype=dtype,
                              rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.norm(self.conv(x)))


def _tower(in_ch: int, channels: int, num_convs: int, *, dtype, rngs: nnx.Rngs) -> nnx.List:
  return nnx.List([ConvGNReLU(in_ch if i == 0 else channels, channels, dtype=dtype, rngs=rngs)
                   for i in range(num_convs)])


def _run(tower: nnx.List, x: jax.Array) -> jax.Array:
  for layer in tower:
    x = layer(x)
  return x


class DetectionHead(nnx.Module):
  """FCOS head shared over P2..P6: class logit, ltrb distances (input pixels), centerness logit."""

  def __init__(self, in_ch: int, channels: int, num_convs: int, *, num_levels: int = 5, dtype,
               rngs: nnx.Rngs):
    tower_out = channels if num_convs > 0 else in_ch
    self.cls_tower = _tower(in_ch, channels, num_convs, dtype=dtype, rngs=rngs)
    self.box_tower = _tower(in_ch, channels, num_convs, dtype=dtype, rngs=rngs)
    prior_bias = -math.log((1 - CLS_PRIOR) / CLS_PRIOR)
    self.cls_logits = _conv(tower_out, 1, 3, init=_NORMAL_001, dtype=dtype, rngs=rngs,
                            bias_init=nnx.initializers.constant(prior_bias))
    self.bbox_pred = _conv(tower_out, 4, 3, init=_NORMAL_001, dtype=dtype, rngs=rngs)
    self.centerness = _conv(tower_out, 1, 3, init=_NORMAL_001, dtype=dtype, rngs=rngs)
    # One learnable scalar per level multiplies the box regression before exp (FCOS "Scale").
    self.scales = nnx.Param(jnp.ones((num_levels,), jnp.float32))

  def __call__(self, levels: list[jax.Array]) -> tuple[dict[str, jax.Array], ...]:
    """levels: [P2, ..., P6], each (B, h, w, C) -> per level {'logits', 'ltrb', 'centerness'}."""
    outputs = []
    for i, p in enumerate(levels):
      cls_features = _run(self.cls_tower, p)
      box_features = _run(self.box_tower, p)
      log_ltrb = self.scales[i] * self.bbox_pred(box_features).astype(jnp.float32)
      outputs.append({
          'logits': self.cls_logits(cls_features)[..., 0].astype(jnp.float32),  # (B, h, w)
          'ltrb': jnp.exp(jnp.minimum(log_ltrb, MAX_LOG_DISTANCE)),  # (B, h, w, 4)
          'centerness': self.centerness(cls_features)[..., 0].astype(jnp.float32),  # (B, h, w)
      })
    return tuple(outputs)


class SegmentationHead(nnx.Module):
  """One tower shared over the pyramid; all levels upsampled to the finest and fused to one logit.

  [code] fused P1..P5 at stride 2; `base_level` 2 fuses P2..P5 at stride 4 (about four times
  cheaper). Fusion: concat -> 1x1 conv to one channel per level -> 3x3 conv to 1 logit -> bilinear
  upsampling to the input size. [code] had no nonlinearity between the two fusion convs.
  """

  def __init__(self, in_ch: int, channels: int, num_convs: int, *, base_level: int, dtype,
               rngs: nnx.Rngs):
    self.base_level = base_level
    self.levels = tuple(range(base_level, 6))
    tower_out = channels if num_convs > 0 else in_ch
    self.tower = _tower(in_ch, channels, num_convs, dtype=dtype, rngs=rngs)
    n = len(self.levels)
    self.fuse = _conv(n * tower_out, n, 1, init=_KAIMING, dtype=dtype, rngs=rngs)
    self.logit = _conv(n, 1, 3, init=_NORMAL_001, dtype=dtype, rngs=rngs)

  def __call__(self, pyramid: dict[str, jax.Array], *, size: tuple[int, int]) -> jax.Array:
    """pyramid {'p<l>': (B, H/2^l, W/2^l, C)} -> logits (B, H, W) float32."""
    maps = [fpn_lib.upsample_nearest(_run(self.tower, pyramid[f'p{l}']), 2**(l - self.base_level))
            for l in self.levels]
    x = self.logit(self.fuse(jnp.concatenate(maps, axis=-1)))[..., 0].astype(jnp.float32)
    return jax.image.resize(x, (x.shape[0], *size), method='bilinear')  # (B, H, W)


class LocalizationHead(nnx.Module):
  """Three per-location fully connected layers (1x1 convs, ReLU between) on C5 -> a point map."""

  def __init__(self, in_ch: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _conv(in_ch, hidden, 1, init=_KAIMING, dtype=dtype, rngs=rngs)
    self.fc2 = _conv(hidden, hidden, 1, init=_KAIMING, dtype=dtype, rngs=rngs)
    self.fc3 = _conv(hidden, 1, 1, init=nnx.initializers.lecun_normal(), dtype=dtype, rngs=rngs)

  def __call__(self, c5: jax.Array) -> jax.Array:
    """(B, h, w, C5) -> (B, h, w) float32."""
    x = jax.nn.relu(self.fc1(c5))
    x = jax.nn.relu(self.fc2(x))
    return self.fc3(x)[..., 0].astype(jnp.float32)


class Projector(nnx.Module):
  """Projector g of the contrastive module: four 3x3 convs (ReLU) + a three-layer per-pixel MLP."""

  def __init__(self, in_ch: int, channels: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.convs = nnx.List([_conv(in_ch if i == 0 else channels, channels, 3, init=_KAIMING, dtype=dtype,
                                 rngs=rngs) for i in range(4)])
    self.mlp = nnx.List([_conv(channels, channels, 1, init=_KAIMING, dtype=dtype, rngs=rngs),
                         _conv(channels, channels, 1, init=_KAIMING, dtype=dtype, rngs=rngs),
                         _conv(channels, dim, 1, init=nnx.initializers.lecun_normal(), dtype=dtype,
                               rngs=rngs)])

  def __call__(self, x: jax.Array, *, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) -> Z (B, H, W, dim) float32, bilinearly upsampled to `size`."""
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    x = jax.nn.relu(self.mlp[0](x))
    x = jax.nn.relu(self.mlp[1](x))
    x = self.mlp[2](x).astype(jnp.float32)
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method='bilinear')
