"""A small, checked reader of MATLAB v5 / v7 MAT-files (numeric matrices only).

scipy.io.loadmat's compiled reader crashes the whole process (SIGSEGV / SIGBUS) on some corrupted
files, e.g. one flipped byte in a variable's array flags, where a reader must raise; this parser
checks every length and type against the bytes it has and raises ValueError instead. MATLAB v4
and v7.3 (HDF5) files are refused with a message.
"""

import struct
import zlib

import numpy as np

# MAT-file v5 data types -> numpy dtype codes (miINT8 ... miUINT64; 8, 10, 11 are reserved).
_MAT_DTYPES = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 9: 'f8', 12: 'i8',
               13: 'u8'}
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_MX_NUMERIC = range(6, 16)  # mxDOUBLE_CLASS ... mxUINT64_CLASS
_MAX_MAT_BYTES = 1 << 30  # a compressed variable may not expand beyond this


def read_variable(data: bytes, name: str):
  """The numeric matrix called `name` in MAT v5 bytes (numpy, Fortran order as MATLAB stores it),
  or None if there is none; ValueError (or struct.error / zlib.error) if the bytes are broken."""
  if len(data) < 128:
    raise ValueError(f'{len(data)} bytes, too short for a MAT-file header')
  order = {b'IM': '<', b'MI': '>'}.get(data[126:128])
  if order is None:
    raise ValueError('not a MATLAB v5 MAT-file (no IM/MI endian mark at byte 126; MATLAB v4 '
                     'files are not read)')
  version = struct.unpack(order + 'H', data[124:126])[0]
  if version != 0x0100:
    raise ValueError(f'MAT-file version {version:#06x} (v7.3 / HDF5 files are not read; save '
                     'with -v7)')
  position = 128
  while position < len(data):
    kind, body, position = _element(data, position, order, top_level=True)
    if kind == _MI_COMPRESSED:
      inflater = zlib.decompressobj()
      body = inflater.decompress(body, _MAX_MAT_BYTES)
      if inflater.unconsumed_tail:
        raise ValueError(f'a compressed variable expands beyond {_MAX_MAT_BYTES} bytes')
      kind, body, _ = _element(body, 0, order)
    if kind == _MI_MATRIX:
      matrix = _matrix(body, order, name)
      if matrix is not None:
        return matrix
  return None


def _element(data: bytes, position: int, order: str, top_level: bool = False):
  """(data type, body bytes, position of the next element) of the element at `position`."""
  if position + 8 > len(data):
    raise ValueError(f'truncated data element at byte {position}')
  kind, size = struct.unpack(order + 'II', data[position:position + 8])
  if kind >> 16:  # small data element: type and size in the first 4 bytes, data in the next 4
    kind, size = kind & 0xFFFF, kind >> 16
    if size > 4:
      raise ValueError(f'small data element of {size} bytes at byte {position}')
    return kind, data[position + 4:position + 4 + size], position + 8
  end = position + 8 + size
  if end > len(data):
    raise ValueError(f'data element at byte {position} claims {size} bytes; the file ends '
                     f'{end - len(data)} bytes early')
  if not (top_level and kind == _MI_COMPRESSED):  # compressed elements are not padded
    end += -size % 8
  return kind, data[position + 8:position + 8 + size], end


def _matrix(body: bytes, order: str, name: str):
  """The array of a miMATRIX element called `name`, None for another name; ValueError if broken."""
  kind, flags, position = _element(body, 0, order)
  if kind != _MI_UINT32 or len(flags) != 8:
    raise ValueError('matrix without valid array flags')
  flags = struct.unpack(order + 'I', flags[:4])[0]
  mx_class, is_complex = flags & 0xFF, bool(flags & 0x800)
  kind, dims, position = _element(body, position, order)
  if kind != _MI_INT32 or not dims or len(dims) % 4:
    raise ValueError('matrix without valid dimensions')
  shape = struct.unpack(f'{order}{len(dims) // 4}i', dims)
  kind, label, position = _element(body, position, order)
  if kind != _MI_INT8:
    raise ValueError('matrix without a valid name')
  if label.decode('latin-1') != name:
    return None
  if mx_class not in _MX_NUMERIC or is_complex:
    raise ValueError(f'{name} is not a real numeric matrix (MATLAB class {mx_class}'
                     f'{", complex" if is_complex else ""})')
  if min(shape) < 0:
    raise ValueError(f'{name} has negative dimensions {shape}')
  kind, values, _ = _element(body, position, order)
  if kind not in _MAT_DTYPES:
    raise ValueError(f'{name} has values of unknown MAT data type {kind}')
  dtype = np.dtype(order + _MAT_DTYPES[kind])
  count = int(np.prod(shape, dtype=np.int64))
  if len(values) != count * dtype.itemsize:
    raise ValueError(f'{name} of shape {shape} holds {len(values)} bytes of {dtype.name}')
  return np.frombuffer(values, dtype, count).reshape(shape, order='F')
