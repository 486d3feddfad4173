"""ImageNet weights for the encoder: torchvision state dict -> .npz converter, and its loader.

  python -m donuseg_jax.models.convert resnet50-11ad3fa6.pth resnet50_imagenet.npz
  python -m donuseg_jax.main --config=configs/tnbc.py --config.model.pretrained=resnet50_imagenet.npz

INPUT: a torchvision ResNet-18/34/50 state dict, `.pth` (read with `torch.load(weights_only=True)`;
a checkpoint dict holding 'state_dict' also works) or `.safetensors` (needs the optional
`safetensors` package). The architecture is detected from the keys (`--encoder` overrides).

OUTPUT (.npz, uncompressed): one float32 array per encoder variable, named by its path in the
model: 'encoder/conv1/kernel' (7, 7, 3, 64) HWIO, 'encoder/bn1/scale', 'encoder/bn1/bias',
'encoder/bn1/mean', 'encoder/bn1/var', 'encoder/layer1/0/conv2/kernel', ...,
'encoder/layer2/0/downsample/0/kernel', 'encoder/layer2/0/downsample/1/scale', ...; plus
'__encoder__' = the preset name. `load_pretrained` sets exactly these; the heads keep their init.
`fc.*` and `*.num_batches_tracked` are dropped; the `module.` prefix of a model saved from
`nn.DataParallel` is removed. Unknown, missing or mis-shaped keys are a ConversionError (a
ValueError) that lists all of them (converter and loader alike). At the command line every
expected problem (missing file, not a state dict, an unsafe pickle) is one message, exit status 2.
"""

import argparse
import pathlib
import pickle
import re
import sys

from flax import nnx
import numpy as np

from donuseg_jax import atomic_io
from donuseg_jax import cli
from donuseg_jax.models import resnet

ENCODER_KEY = '__encoder__'
DATA_PARALLEL_PREFIX = 'module.'
PREFIX = 'encoder/'
# torchvision module path (group 1) and parameter (last group) of every encoder tensor.
_TORCH_KEY = re.compile(
    r'^(conv1|bn1|layer[1-4]\.\d+\.(?:conv[1-3]|bn[1-3]|downsample\.[01]))'
    r'\.(weight|bias|running_mean|running_var)$')
_DROPPED = re.compile(r'^fc\.(weight|bias)$|\.num_batches_tracked$')
_BN_NAMES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
_TORCH_BN_NAMES = {v: k for k, v in _BN_NAMES.items()}


class ConversionError(cli.CommandError, ValueError):
  """The input is not a torchvision ResNet state dict this converter can use."""


def _is_conv(module: str) -> bool:
  last = module.split('.')[-1]
  return last.startswith('conv') or module.endswith('downsample.0')


def to_flax_key(torch_key: str) -> str | None:
  """'layer1.0.conv2.weight' -> 'encoder/layer1/0/conv2/kernel'; None for non-encoder names."""
  match = _TORCH_KEY.match(torch_key)
  if match is None:
    return None
  module, param = match.groups()
  if _is_conv(module):
    leaf = {'weight': 'kernel', 'bias': 'bias'}.get(param)
    if leaf is None:  # running stats on a conv: not a torchvision name
      return None
  else:
    leaf = _BN_NAMES[param]
  return PREFIX + module.replace('.', '/') + '/' + leaf


def to_torch_key(flax_key: str) -> str:
  """Inverse of `to_flax_key` (for error messages)."""
  module, leaf = flax_key[len(PREFIX):].rsplit('/', 1)
  module = module.replace('/', '.')
  param = {'kernel': 'weight'}.get(leaf) if _is_conv(module) else _TORCH_BN_NAMES.get(leaf)
  return f'{module}.{param or leaf}'


def _to_flax_array(torch_key: str, value: np.ndarray) -> np.ndarray:
  value = np.asarray(value, np.float32)
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # conv OIHW -> HWIO


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def encoder_shapes(name: str) -> dict[str, tuple[int, ...]]:
  """'encoder/...' -> shape of every encoder variable (params and BatchNorm statistics)."""
  abstract = nnx.eval_shape(lambda: resnet.ResNet(name, rngs=nnx.Rngs(0)))
  return {PREFIX + '/'.join(str(p) for p in path): tuple(var.shape)
          for path, var in nnx.to_flat_state(nnx.state(abstract))}


def detect_encoder(keys) -> str:
  """Encoder preset whose block structure matches torchvision keys `keys`."""
  blocks, bottleneck = [0, 0, 0, 0], False
  for key in keys:
    match = re.match(r'^layer([1-4])\.(\d+)\.(\w+)', key)
    if match:
      stage, index = int(match.group(1)) - 1, int(match.group(2))
      blocks[stage] = max(blocks[stage], index + 1)
      bottleneck |= match.group(3) == 'conv3'
  for name, preset in resnet.PRESETS.items():
    if preset.bottleneck == bottleneck and preset.blocks == tuple(blocks):
      return name
  raise ConversionError(f'state dict matches no encoder preset (blocks per stage {blocks}, '
                   f'bottleneck {bottleneck}); expected one of {sorted(resnet.PRESETS)}')


def _check(arrays: dict[str, np.ndarray], expected: dict[str, tuple], *, unknown: list[str],
           source: str) -> None:
  """Raises one ValueError listing unknown, missing and mis-shaped keys (torchvision names)."""
  unknown = sorted(unknown + [to_torch_key(k) for k in arrays if k not in expected])
  missing = sorted(to_torch_key(k) for k in expected if k not in arrays)
  misshaped = sorted(
      f'{to_torch_key(k)}: {_torch_shape(arrays[k].shape)}, expected {_torch_shape(expected[k])}'
      for k in arrays if k in expected and tuple(arrays[k].shape) != expected[k])
  problems = [f'{title} ({len(items)}): ' + ', '.join(items)
              for title, items in (('unknown keys', unknown), ('missing keys', missing),
                                   ('mis-shaped keys (torch layout)', misshaped)) if items]
  if problems:
    raise ConversionError(f'{source} does not fit the encoder:\n  ' + '\n  '.join(problems))


def convert_state_dict(state_dict: dict, *, encoder: str | None = None) -> dict[str, np.ndarray]:
  """torchvision ResNet state dict (name -> array/tensor) -> the .npz contents described above."""
  state_dict = strip_data_parallel_prefix(state_dict)
  keys = [k for k in state_dict if not _DROPPED.search(k)]
  name = encoder or detect_encoder(keys)
  arrays, unknown = {}, []
  for key in keys:
    flax_key = to_flax_key(key)
    if flax_key is None:
      unknown.append(key)
    else:
      arrays[flax_key] = _to_flax_array(key, state_dict[key])
  _check(arrays, encoder_shapes(name), unknown=unknown, source=f'state dict ({name})')
  arrays[ENCODER_KEY] = np.array(name)
  return arrays


def strip_data_parallel_prefix(state_dict: dict) -> dict:
  """Keys of a model wrapped in nn.DataParallel start with 'module.': drop it when all do."""
  if state_dict and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
    return {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}
  return state_dict


def load_pretrained(model: nnx.Module, path: str | pathlib.Path) -> None:
  """Sets `model.encoder`'s weights and BatchNorm statistics from a converted .npz, in place."""
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  name = str(arrays.pop(ENCODER_KEY, model.encoder.name))
  if name != model.encoder.name:
    raise ConversionError(
        f'{path} holds {name} weights but config.model.encoder is {model.encoder.name!r}')
  _check(arrays, encoder_shapes(model.encoder.name), unknown=[], source=str(path))
  state = nnx.state(model.encoder)
  flat = [(path_, var.replace(np.asarray(arrays[PREFIX + '/'.join(str(p) for p in path_)],
                                         var.get_value().dtype)))
          for path_, var in nnx.to_flat_state(state)]
  nnx.update(model.encoder, nnx.from_flat_state(flat))


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A .pth (torch, weights_only) or .safetensors state dict as numpy arrays.

  ConversionError naming the file when it is missing, unreadable, unsafe to unpickle, or holds
  something other than a dict of tensors."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f'{path}: no such file')
  if path.suffix == '.safetensors':
    try:
      from safetensors import numpy as safetensors_numpy  # optional dependency
    except ImportError:
      raise ImportError(f'reading {path} needs the optional `safetensors` package '
                        '(pip install safetensors), or convert the .pth file instead') from None
    return dict(safetensors_numpy.load_file(str(path)))
  try:
    import torch  # only the converter needs it (test extra)
  except ImportError:
    raise ImportError(f'reading {path} needs torch (pip install torch)') from None
  try:
    obj = torch.load(str(path), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as error:
    raise ConversionError(
        f'{path} holds Python objects besides tensors, which are unsafe to unpickle (torch '
        'weights_only=True refused them); where the file was made, save model.state_dict() '
        'with torch.save and convert that') from error
  except Exception as error:  # torch raises RuntimeError, EOFError, ... on damaged files
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise ConversionError(f'{path}: not a readable torch file ({first})') from error
  if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise ConversionError(f'{path} holds a {type(obj).__name__}, not a state dict '
                          '(a dict of parameter name -> tensor)')
  not_tensors = sorted(str(k) for k, v in obj.items()
                       if not isinstance(v, (torch.Tensor, np.ndarray)))
  if not_tensors:
    raise ConversionError(f'{path}: not a state dict of tensors; these entries are not tensors: '
                          + ', '.join(not_tensors[:10]) + (' ...' if len(not_tensors) > 10 else ''))
  return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in obj.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('input', help='torchvision state dict (.pth or .safetensors)')
  parser.add_argument('output', help='converted weights (.npz) for --config.model.pretrained')
  parser.add_argument('--encoder', choices=sorted(resnet.PRESETS), default=None,
                      help='architecture (default: detected from the keys)')
  args = parser.parse_args(argv)
  if not args.output.endswith('.npz'):
    parser.error('OUTPUT must end in .npz')
  state_dict = read_state_dict(args.input)
  if strip_data_parallel_prefix(state_dict) is not state_dict:
    print(f"note: removed the nn.DataParallel prefix '{DATA_PARALLEL_PREFIX}' from every key")
  arrays = convert_state_dict(state_dict, encoder=args.encoder)
  with atomic_io.atomic_open(args.output, 'wb') as stream:
    np.savez(stream, **arrays)
  count = sum(a.size for k, a in arrays.items() if k != ENCODER_KEY)
  print(f'{args.input} -> {args.output}: {arrays[ENCODER_KEY]}, {len(arrays) - 1} arrays, {count:,} values')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main))
