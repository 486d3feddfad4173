"""ResNet encoders in torchvision's layout, returning the features C1..C5 that DoNuSeg builds on.

Layout follows torchvision exactly (stride on the 3x3 conv of a bottleneck, explicit symmetric
padding, BatchNorm after every conv, `downsample.0/1` projection) so that converted ImageNet
weights reproduce torchvision's activations; attribute names mirror torchvision's state-dict keys
(`conv1`, `bn1`, `layer1[0].conv2`, `layer2[0].downsample[1]`, ...), which keeps the converter a
simple rename (`convert.py`).

Features (input H, W divisible by 32):
  c1  (B, H/2,  W/2,  stem)   stem output, before the max-pool
  c2  (B, H/4,  W/4,  C2)     layer1
  c3  (B, H/8,  W/8,  C3)     layer2
  c4  (B, H/16, W/16, C4)     layer3
  c5  (B, H/32, W/32, C5)     layer4
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Preset:
  """One ResNet variant."""
  bottleneck: bool  # Bottleneck (1x1-3x3-1x1, expansion 4) or basic (3x3-3x3) blocks
  blocks: tuple[int, int, int, int]  # blocks per stage (layer1..layer4)
  widths: tuple[int, int, int, int]  # inner width per stage
  stem: int  # channels of conv1 / C1


PRESETS = {
    'resnet18': Preset(False, (2, 2, 2, 2), (64, 128, 256, 512), 64),
    'resnet34': Preset(False, (3, 4, 6, 3), (64, 128, 256, 512), 64),
    'resnet50': Preset(True, (3, 4, 6, 3), (64, 128, 256, 512), 64),
    # For tests only: the smallest network with every structural feature (strides, projections).
    'tiny': Preset(False, (1, 1, 1, 1), (8, 16, 32, 64), 8),
}

# torchvision's BatchNorm: momentum 0.1 on the new value is Flax's 0.9 on the old one.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def feature_channels(name: str) -> dict[str, int]:
  """Channels of c1..c5 for encoder `name`."""
  preset = _preset(name)
  expansion = 4 if preset.bottleneck else 1
  channels = {'c1': preset.stem}
  for k, width in enumerate(preset.widths, start=2):
    channels[f'c{k}'] = width * expansion
  return channels


def _preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f'unknown encoder {name!r}; expected one of {sorted(PRESETS)}')
  return PRESETS[name]


def _conv(in_ch: int, out_ch: int, size: int, stride: int = 1, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  # torchvision pads size // 2 on both sides; 'SAME' would pad asymmetrically for stride 2 and shift
  # every feature by half a pixel against converted weights.
  pad = size // 2
  return nnx.Conv(
      in_ch, out_ch, (size, size), strides=stride, padding=((pad, pad), (pad, pad)),
      use_bias=False, dtype=dtype,
      # torchvision's ResNet init: kaiming normal, fan_out, ReLU gain.
      kernel_init=nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal'), rngs=rngs)


def _bn(channels: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)


def _downsample(in_ch: int, out_ch: int, stride: int, *, dtype, rngs: nnx.Rngs):
  if stride == 1 and in_ch == out_ch:
    return None
  return nnx.List([_conv(in_ch, out_ch, 1, stride, dtype=dtype, rngs=rngs),
                   _bn(out_ch, dtype=dtype, rngs=rngs)])


def _shortcut(downsample, x: jax.Array, *, train: bool) -> jax.Array:
  if downsample is None:
    return x
  conv, bn = downsample
  return bn(conv(x), use_running_average=not train)


class BasicBlock(nnx.Module):
  """3x3 -> 3x3 residual block (ResNet-18/34)."""
  expansion = 1

  def __init__(self, in_ch: int, width: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.conv1 = _conv(in_ch, width, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = _bn(width, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(width, width, 3, dtype=dtype, rngs=rngs)
    self.bn2 = _bn(width, dtype=dtype, rngs=rngs)
    self.downsample = _downsample(in_ch, width, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    ura = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    return jax.nn.relu(y + _shortcut(self.downsample, x, train=train))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (strided) -> 1x1 residual block (ResNet-50), torchvision's "v1.5"."""
  expansion = 4

  def __init__(self, in_ch: int, width: int, stride: int, *, dtype, rngs: nnx.Rngs):
    out_ch = width * self.expansion
    self.conv1 = _conv(in_ch, width, 1, dtype=dtype, rngs=rngs)
    self.bn1 = _bn(width, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(width, width, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = _bn(width, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(width, out_ch, 1, dtype=dtype, rngs=rngs)
    self.bn3 = _bn(out_ch, dtype=dtype, rngs=rngs)
    self.downsample = _downsample(in_ch, out_ch, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    ura = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = jax.nn.relu(self.bn2(self.conv2(y), use_running_average=ura))
    y = self.bn3(self.conv3(y), use_running_average=ura)
    return jax.nn.relu(y + _shortcut(self.downsample, x, train=train))


class ResNet(nnx.Module):
  """ResNet encoder without pooling head / fc; `__call__` returns {'c1': ..., 'c5': ...}."""

  def __init__(self, name: str, *, dtype=jnp.float32, rngs: nnx.Rngs):
    preset = _preset(name)
    self.name = name
    self.dtype = dtype
    self.channels = feature_channels(name)
    block_cls = Bottleneck if preset.bottleneck else BasicBlock
    self.conv1 = _conv(3, preset.stem, 7, 2, dtype=dtype, rngs=rngs)
    self.bn1 = _bn(preset.stem, dtype=dtype, rngs=rngs)
    in_ch = preset.stem
    stages = []
    for stage, (num_blocks, width) in enumerate(zip(preset.blocks, preset.widths)):
      blocks = []
      for b in range(num_blocks):
        stride = 2 if (stage > 0 and b == 0) else 1
        blocks.append(block_cls(in_ch, width, stride, dtype=dtype, rngs=rngs))
        in_ch = width * block_cls.expansion
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages

  def stages(self) -> tuple:
    return (self.layer1, self.layer2, self.layer3, self.layer4)

  def stem(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Normalised image (B, H, W, 3) -> C1 (B, H/2, W/2, stem)."""
    x = self.conv1(x.astype(self.dtype))
    return jax.nn.relu(self.bn1(x, use_running_average=not train))

  def __call__(self, x: jax.Array, *, train: bool, probes=None) -> dict[str, jax.Array]:
    """Normalised image (B, H, W, 3) -> features c1..c5 (compute dtype).

    `probes`: optional sequence of four arrays shaped like C2..C5, added to each stage's output
    before the next stage reads it. They are zeros; differentiating w.r.t. them gives the gradient
    w.r.t. all four block activations in one backward pass (Grad-CAM, `cams.py`).
    """
    c1 = self.stem(x, train=train)
    # torchvision's max-pool: 3x3, stride 2, padding 1 (padded with -inf).
    x = nnx.max_pool(c1, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = {'c1': c1}
    for k, stage in enumerate(self.stages()):
      for block in stage:
        x = block(x, train=train)
      if probes is not None:
        x = x + probes[k].astype(x.dtype)
      features[f'c{k + 2}'] = x
    return features


def feature_shapes(name: str, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
  """Static shapes of c1..c5 for an input (batch, height, width, 3), both sides divisible by 32."""
  channels = feature_channels(name)
  return {key: (batch, height // 2**k, width // 2**k, channels[key])
          for k, key in enumerate(('c1', 'c2', 'c3', 'c4', 'c5'), start=1)}
