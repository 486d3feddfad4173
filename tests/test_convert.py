"""ImageNet weight conversion: a plain torch.nn ResNet with torchvision's names -> our encoder.

The reference network is written here in torch.nn, independent of our code, with torchvision's
parameter names and layout; random weights and random BatchNorm statistics make every conversion
mistake (transposes, BN fields, strides, padding) visible in the features.
"""

import functools
import importlib.util

from configs import default
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from donuseg_jax import models
from donuseg_jax.models import convert

FAST_COMPILE = {'xla_backend_optimization_level': 0}  # tiny inputs; compile time dominates


class TorchBlock(nn.Module):
  """torchvision's BasicBlock / Bottleneck (stride on the 3x3 conv), same attribute names."""

  def __init__(self, in_ch, width, stride, bottleneck):
    super().__init__()
    self.bottleneck = bottleneck
    out_ch = width * 4 if bottleneck else width
    if bottleneck:
      self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(out_ch)
    else:
      self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.bn2 = nn.BatchNorm2d(width)
    self.downsample = None
    if stride != 1 or in_ch != out_ch:
      self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                      nn.BatchNorm2d(out_ch))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    if self.bottleneck:
      y = torch.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
    else:
      y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """torchvision's ResNet layout; forward returns [C2, C3, C4, C5] (NCHW)."""

  def __init__(self, blocks, bottleneck):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    in_ch = 64
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
      layer = []
      for b in range(count):
        layer.append(TorchBlock(in_ch, width, 2 if stage > 0 and b == 0 else 1, bottleneck))
        in_ch = width * 4 if bottleneck else width
      setattr(self, f'layer{stage + 1}', nn.Sequential(*layer))
    self.fc = nn.Linear(in_ch, 1000)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    features = []
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
      features.append(x)
    return features


ARCHITECTURES = {'resnet50': ((3, 4, 6, 3), True), 'resnet18': ((2, 2, 2, 2), False)}


def _torch_resnet(name):
  torch.manual_seed(0)
  net = TorchResNet(*ARCHITECTURES[name])
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):  # random affine and running statistics
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return net.eval()


@pytest.fixture(scope='module')
def resnet50_files(tmp_path_factory):
  """(torch net, .pth path, converted .npz path) for a random ResNet-50."""
  directory = tmp_path_factory.mktemp('weights')
  net = _torch_resnet('resnet50')
  pth, npz = directory / 'resnet50.pth', directory / 'resnet50.npz'
  torch.save(net.state_dict(), pth)
  convert.main([str(pth), str(npz)])
  return net, pth, npz


def _config(encoder, pretrained):
  config = default.get_config('smoke')  # tiny heads: only the encoder matters here
  config.model.encoder = encoder
  config.model.pretrained = str(pretrained)
  return config


def _compare_features(net, config, seed):
  images = np.random.default_rng(seed).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    expected = [f.permute(0, 2, 3, 1).numpy() for f in net(torch.from_numpy(images.transpose(0, 3, 1, 2)))]
  model = models.create_model(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model.encoder)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def encode(state, x):
    return nnx.merge(graphdef, state)(x, train=False)

  features = encode(state, jnp.asarray(images))
  for k, want in zip(('c2', 'c3', 'c4', 'c5'), expected):
    got = np.asarray(features[k])
    assert got.shape == want.shape, k
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert error < 1e-4, (k, error)
  return model


def test_resnet50_features_match_torch(resnet50_files):
  net, _, npz = resnet50_files
  with np.load(npz) as data:
    assert str(data[convert.ENCODER_KEY]) == 'resnet50'
    assert data['encoder/conv1/kernel'].shape == (7, 7, 3, 64)  # HWIO
    assert not any(k.startswith('encoder/fc') for k in data.files)
    # 53 convs + 53 BNs x (scale, bias, mean, var): every torchvision tensor but fc and counters.
    assert len(data.files) - 1 == 53 + 53 * 4
  model = _compare_features(net, _config('resnet50', npz), seed=0)
  # The heads keep their own initialisation (the FCOS class prior bias, for one).
  np.testing.assert_allclose(model.detection.cls_logits.bias[...], -np.log(99.0), rtol=1e-6)


def test_resnet18_is_detected_and_matches_torch(tmp_path):
  net = _torch_resnet('resnet18')
  arrays = convert.convert_state_dict({k: v.numpy() for k, v in net.state_dict().items()})
  assert str(arrays[convert.ENCODER_KEY]) == 'resnet18'
  np.savez(tmp_path / 'r18.npz', **arrays)
  _compare_features(net, _config('resnet18', tmp_path / 'r18.npz'), seed=1)


def test_converter_lists_unknown_missing_and_misshaped_keys(resnet50_files):
  net, _, _ = resnet50_files
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  state['layer1.0.conv4.weight'] = np.zeros((1, 1, 1, 1), np.float32)  # unknown module
  state['layer1.0.conv1.bias'] = np.zeros((64,), np.float32)  # torchvision's convs have no bias
  del state['layer2.1.bn2.running_var']
  state['layer3.0.conv2.weight'] = np.zeros((256, 256, 1, 1), np.float32)
  with pytest.raises(ValueError) as error:
    convert.convert_state_dict(state)
  message = str(error.value)
  for name in ('layer1.0.conv4.weight', 'layer1.0.conv1.bias', 'layer2.1.bn2.running_var',
               'layer3.0.conv2.weight: (256, 256, 1, 1), expected (256, 256, 3, 3)'):
    assert name in message
  with pytest.raises(ValueError, match='matches no encoder preset'):
    convert.convert_state_dict({k: v for k, v in state.items() if not k.startswith('layer4.2.')})


def test_loader_lists_bad_keys_and_checks_the_encoder(resnet50_files, tmp_path):
  _, _, npz = resnet50_files
  with np.load(npz) as data:
    arrays = {k: data[k] for k in data.files}
  arrays['encoder/layer9/0/conv1/kernel'] = np.zeros((1,), np.float32)
  del arrays['encoder/bn1/mean']
  arrays['encoder/layer1/0/bn1/scale'] = np.zeros((3,), np.float32)
  np.savez(tmp_path / 'bad.npz', **arrays)
  # An abstract model suffices: the checks come before any value is set.
  model = nnx.eval_shape(lambda: models.create_model(_config('resnet50', ''), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError) as error:
    models.load_pretrained(model, tmp_path / 'bad.npz')
  for name in ('layer9.0.conv1.weight', 'bn1.running_mean', 'layer1.0.bn1.weight: (3,), expected (64,)'):
    assert name in str(error.value)
  small = nnx.eval_shape(lambda: models.create_model(_config('resnet18', ''), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="resnet50 weights but config.model.encoder is 'resnet18'"):
    models.load_pretrained(small, npz)


def test_reads_pth_and_safetensors(resnet50_files, tmp_path):
  net, pth, _ = resnet50_files
  state = convert.read_state_dict(pth)
  np.testing.assert_array_equal(state['layer1.0.bn1.running_var'], net.layer1[0].bn1.running_var.numpy())
  if importlib.util.find_spec('safetensors') is None:  # optional dependency: a clear error instead
    (tmp_path / 'weights.safetensors').write_bytes(b'\0' * 16)  # exists: the package is missing
    with pytest.raises(ImportError, match='safetensors'):
      convert.read_state_dict(tmp_path / 'weights.safetensors')
  else:
    from safetensors import numpy as safetensors_numpy
    safetensors_numpy.save_file(state, str(tmp_path / 'weights.safetensors'))
    again = convert.read_state_dict(tmp_path / 'weights.safetensors')
    assert set(again) == set(state)


class _NotATensor:
  """A pickled Python object: torch's weights_only loader refuses it."""


def _convert_cli(capsys, *argv):
  from donuseg_jax import cli  # noqa: PLC0415
  status = cli.run(convert.main, list(map(str, argv)))
  out, err = capsys.readouterr()
  return status, out, err


def test_converter_errors_are_one_message_and_status_2(tmp_path, capsys):
  missing = tmp_path / 'missing.pth'
  status, _, err = _convert_cli(capsys, missing, tmp_path / 'out.npz')
  assert status == 2 and err.strip() == f'error: {missing}: no such file'
  holding_list = tmp_path / 'list.pth'
  torch.save([torch.zeros(2)], holding_list)
  status, _, err = _convert_cli(capsys, holding_list, tmp_path / 'out.npz')
  assert status == 2 and 'holds a list, not a state dict' in err and 'Traceback' not in err
  unsafe = tmp_path / 'unsafe.pth'
  torch.save({'conv1.weight': torch.zeros(1), 'extra': _NotATensor()}, unsafe)
  status, _, err = _convert_cli(capsys, unsafe, tmp_path / 'out.npz')
  assert status == 2 and 'unsafe to unpickle' in err and 'weights_only=False' not in err, err
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'\x80\x02not a torch file')
  status, _, err = _convert_cli(capsys, garbage, tmp_path / 'out.npz')
  assert status == 2 and str(garbage) in err and len(err.strip().splitlines()) <= 3, err
  assert not (tmp_path / 'out.npz').exists()


def test_data_parallel_prefix_is_removed(tmp_path, capsys):
  net = _torch_resnet('resnet18')
  wrapped = tmp_path / 'data_parallel.pth'
  torch.save({f'module.{k}': v for k, v in net.state_dict().items()}, wrapped)
  status, out, err = _convert_cli(capsys, wrapped, tmp_path / 'r18.npz')
  assert status == 0, err
  assert "prefix 'module.'" in out and 'resnet18' in out
  with np.load(tmp_path / 'r18.npz') as data:
    expected = convert.convert_state_dict({k: v.numpy() for k, v in net.state_dict().items()})
    assert sorted(data.files) == sorted(expected)
    np.testing.assert_array_equal(data['encoder/conv1/kernel'], expected['encoder/conv1/kernel'])
