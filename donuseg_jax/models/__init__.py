"""The DoNuSeg network: ResNet encoder, FPN, detection / segmentation / localization heads, projector g.

  model = models.create_model(config, rngs=nnx.Rngs(config.seed))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  outputs, batch_stats = models.forward(graphdef, params, batch_stats, images, train=True,
                                        with_cams=True)

Modules: `resnet` (encoders), `fpn`, `heads`, `cams` (Grad-CAM from one backward pass),
`donuseg` (the network, factory, pure forward), `convert` (torchvision ImageNet weights).
"""

from donuseg_jax.models.convert import load_pretrained
from donuseg_jax.models.donuseg import DETECTION_STRIDES
from donuseg_jax.models.donuseg import DoNuSeg
from donuseg_jax.models.donuseg import compute_cams
from donuseg_jax.models.donuseg import create_model
from donuseg_jax.models.donuseg import forward
from donuseg_jax.models.donuseg import normalize

__all__ = ['DETECTION_STRIDES', 'DoNuSeg', 'compute_cams', 'create_model', 'forward', 'load_pretrained',
           'normalize']
