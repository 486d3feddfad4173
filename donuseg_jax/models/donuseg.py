"""The DoNuSeg network (paper Fig. 3): ResNet encoder, FPN and four heads; its factory and pure forward.

`create_model(config, *, rngs)` builds it from `config.model`; `forward(graphdef, params,
batch_stats, images, *, train, with_cams)` is the pure function training, inference and notebooks
call (merge inside, split out), so BatchNorm statistics come back as a value, never a side effect.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from donuseg_jax.models import cams as cams_lib
from donuseg_jax.models import convert
from donuseg_jax.models import fpn as fpn_lib
from donuseg_jax.models import heads
from donuseg_jax.models import resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, images in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
DETECTION_STRIDES = (4, 8, 16, 32, 64)  # P2..P6
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
PROJECTOR_LEVELS = ('c2', 'c3', 'c4', 'c5', 'p5')
CAM_BLOCKS = ('c2', 'c3', 'c4', 'c5')  # CAM k = 1..4 explains block C_{k+1}
SEG_BASE_LEVEL = {2: 1, 4: 2}  # config.model.seg_stride -> pyramid level the segmentation fuses at


def normalize(images: jax.Array) -> jax.Array:
  """uint8 or float [0, 255] images (B, H, W, 3) -> ImageNet-normalised float32."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
  return (images.astype(jnp.float32) - mean) / std


def _check_size(images: jax.Array) -> tuple[int, int]:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (B, H, W, 3), got {images.shape}')
  height, width = images.shape[1:3]
  if height % 32 or width % 32:
    raise ValueError(f'image sides must be divisible by 32 (encoder stride), got {height}x{width}')
  return height, width


class DoNuSeg(nnx.Module):
  """Encoder + FPN + detection, segmentation, localization heads + projector g."""

  def __init__(self, *, encoder: str, fpn_channels: int, head_channels: int, head_convs: int,
               seg_stride: int, projector_level: str, projection_dim: int, loc_hidden: int,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if seg_stride not in SEG_BASE_LEVEL:
      raise ValueError(f'seg_stride must be one of {tuple(SEG_BASE_LEVEL)}, got {seg_stride}')
    if projector_level not in PROJECTOR_LEVELS:
      raise ValueError(f'projector_level must be one of {PROJECTOR_LEVELS}, got {projector_level!r}')
    base_level = SEG_BASE_LEVEL[seg_stride]
    self.projector_level = projector_level
    self.encoder = resnet.ResNet(encoder, dtype=dtype, rngs=rngs)
    channels = self.encoder.channels
    self.fpn = fpn_lib.FPN(channels, fpn_channels, min_level=base_level, dtype=dtype, rngs=rngs)
    self.detection = heads.DetectionHead(fpn_channels, head_channels, head_convs,
                                         num_levels=len(DETECTION_STRIDES), dtype=dtype, rngs=rngs)
    self.segmentation = heads.SegmentationHead(fpn_channels, head_channels, head_convs,
                                               base_level=base_level, dtype=dtype, rngs=rngs)
    self.localization = heads.LocalizationHead(channels['c5'], loc_hidden, dtype=dtype, rngs=rngs)
    projector_in = fpn_channels if projector_level == 'p5' else channels[projector_level]
    self.projector = heads.Projector(projector_in, head_channels, projection_dim, dtype=dtype, rngs=rngs)

  def decode(self, features: dict, localization: jax.Array, *, size: tuple[int, int]) -> dict:
    """Encoder features (and the localization map) -> the output dict of `forward`, float32."""
    pyramid = self.fpn(features)
    detection = self.detection([pyramid[f'p{l}'] for l in range(2, 7)])
    segmentation = self.segmentation(pyramid, size=size)
    source = pyramid if self.projector_level == 'p5' else features
    projection = self.projector(source[self.projector_level], size=size)
    return {
        'features': {k: v.astype(jnp.float32) for k, v in features.items()},
        'segmentation': segmentation,  # (B, H, W)
        'localization': localization,  # (B, H/32, W/32)
        'detection': detection,  # per level of DETECTION_STRIDES
        'projection': projection,  # (B, H, W, D)
    }

  def __call__(self, images: jax.Array, *, train: bool = False) -> dict:
    """Stateful convenience call (no CAMs); training and inference use the pure `forward`."""
    size = _check_size(images)
    features = self.encoder(normalize(images), train=train)
    return self.decode(features, self.localization(features['c5']), size=size)


def create_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> DoNuSeg:
  """The one factory: DoNuSeg from `config.model`, with ImageNet weights if `pretrained` is set."""
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}')
  build = functools.partial(
      DoNuSeg, encoder=m.encoder, fpn_channels=m.fpn_channels, head_channels=m.head_channels,
      head_convs=m.head_convs, seg_stride=m.seg_stride, projector_level=m.projector_level,
      projection_dim=m.projection_dim, loc_hidden=m.loc_hidden, dtype=DTYPES[m.dtype])
  model = _initialize(build, rngs)
  if m.pretrained:
    convert.load_pretrained(model, m.pretrained)
  return model


def _initialize(build, rngs: nnx.Rngs) -> DoNuSeg:
  """`build(rngs=rngs)` as one jitted program compiled without backend optimisation.

  Eagerly, every initializer is its own XLA compilation, and LLVM's optimisation of the threefry
  random-number code takes seconds per parameter shape on a small CPU (minutes for the model);
  the init runs once, so its code need not be fast, only quick to compile.
  """
  if isinstance(jnp.zeros(()), jax.core.Tracer):
    # Already inside a trace (nnx.eval_shape, jit): compiler options only exist at top level.
    return build(rngs=rngs)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0))))
  rngs_graphdef, rngs_state = nnx.split(rngs)

  def init(rngs_state):
    local_rngs = nnx.merge(rngs_graphdef, rngs_state)
    return nnx.state(build(rngs=local_rngs)), nnx.state(local_rngs)

  state, rngs_state = jax.jit(init, compiler_options={'xla_backend_optimization_level': 0})(rngs_state)
  nnx.update(rngs, rngs_state)  # the caller's streams advance as an eager build would advance them
  return nnx.merge(graphdef, state)


def _merge(graphdef, params, batch_stats) -> DoNuSeg:
  """nnx.merge on fresh Variables (tree_map copies them): NNX lets a Variable be mutated only in
  the trace that created it, and the given states may come from an outer trace or from outside
  jit (closed-over constants); BatchNorm in training mode must update its statistics."""
  return nnx.merge(graphdef, *jax.tree.map(lambda a: a, (params, batch_stats)))


def _encode_with_cams(graphdef, params, batch_stats, x: jax.Array, *, train: bool):
  """Encoder + localization head with the four Grad-CAMs from one extra backward pass.

  Returns (features, localization, new batch stats, cams (B, 4, H, W)).
  """
  encoder_name = _merge(graphdef, params, batch_stats).encoder.name
  shapes = resnet.feature_shapes(encoder_name, *x.shape[:3])
  probes = [jnp.zeros(shapes[k], jnp.float32) for k in CAM_BLOCKS]

  def score_fn(probes):
    # Merged inside jax.vjp's trace so that BatchNorm may update its statistics here; the new
    # statistics leave as auxiliary output.
    model = _merge(graphdef, params, batch_stats)
    features = model.encoder(x, train=train, probes=probes)
    localization = model.localization(features['c5'])  # (B, h, w)
    activations = [features[k] for k in CAM_BLOCKS]
    return jnp.sum(localization), (activations, (features, localization, nnx.state(model, nnx.BatchStat)))

  cams, (features, localization, new_stats) = cams_lib.grad_cams(score_fn, probes, size=x.shape[1:3])
  return features, localization, new_stats, cams


CAM_STATISTICS = ('running', 'batch')


def forward(graphdef, params, batch_stats, images: jax.Array, *, train: bool, with_cams: bool = False,
            cam_statistics: str = 'running'):
  """Pure forward: (graphdef, params, batch_stats) from `nnx.split(model, nnx.Param, nnx.BatchStat)`.

  images (B, H, W, 3) uint8 or float in [0, 255], H and W divisible by 32. `train` selects batch
  statistics (and returns updated running averages); in eval mode the returned statistics are the
  given ones. Returns (outputs, new_batch_stats); outputs as in CONTRACTS / `DoNuSeg.decode`, plus
  'cams' (B, 4, H, W) in [0, 1] under stop_gradient when `with_cams`.

  `cam_statistics` (used when `train` and `with_cams`):
    'running': the CAMs come from their own pass with the running statistics (the network as it
      predicts at inference), one extra encoder forward. Each image's CAM is its own.
    'batch': the CAMs share the training forward, with batch statistics. BatchNorm's backward
      then removes the batch mean of every channel's gradient, so the Grad-CAM weights (spatial
      means of the gradient) of blocks 1-3 cancel over the batch and each CAM shows "this image
      minus the batch" (issue 9, cause 1). Kept only to measure and test that failure.
  """
  if cam_statistics not in CAM_STATISTICS:
    raise ValueError(f'cam_statistics must be one of {CAM_STATISTICS}, got {cam_statistics!r}')
  size = _check_size(images)
  x = normalize(images)
  model = _merge(graphdef, params, batch_stats)
  cams = None
  if with_cams and (cam_statistics == 'batch' or not train):
    features, localization, new_stats, cams = _encode_with_cams(graphdef, params, batch_stats, x,
                                                                train=train)
    nnx.update(model, new_stats)
  else:
    features = model.encoder(x, train=train)
    localization = model.localization(features['c5'])
    if with_cams:
      # Inputs under stop_gradient: the CAMs are labels, and this pass must add no gradient path.
      _, _, _, cams = _encode_with_cams(graphdef, *jax.lax.stop_gradient((params, batch_stats)), x,
                                        train=False)
  outputs = model.decode(features, localization, size=size)
  if cams is not None:
    outputs['cams'] = cams
  return outputs, nnx.state(model, nnx.BatchStat)


def compute_cams(graphdef, params, batch_stats, images: jax.Array, *, train: bool = False) -> jax.Array:
  """The four block Grad-CAMs alone (encoder and localization head only): (B, 4, H, W) in [0, 1]."""
  _check_size(images)
  _, _, _, cams = _encode_with_cams(graphdef, params, batch_stats, normalize(images), train=train)
  return cams
