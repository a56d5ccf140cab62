"""PyTorch checkpoint files read into numpy, without PyTorch.

Peers publish weights as `torch.save` files: the zip format (PyTorch >= 1.6,
e.g. torchvision's VGG16 state dict) and the older "legacy" stream (the
LPIPS linear heads shipped inside the `lpips` package). Both are a pickle of
the object in which every tensor is a call to
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and
every storage a persistent id; only the raw storage bytes live elsewhere.
`load` unpickles with a restricted unpickler that knows exactly those
globals (nothing else in the file is executed) and returns the state dict
with numpy arrays in place of tensors (for a TorchScript archive: every tensor
attribute of the module tree under its dotted name, as `state_dict()` names
parameters and buffers). `save` writes a numpy state dict in
the zip format that `torch.load` reads (weights_only included): tests make
random weights in a peer's file layout without PyTorch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
  """A file that is not a readable `torch.save` state dict."""


class _Storage:
  """A storage named in the pickle; its bytes are attached afterwards."""

  def __init__(self, dtype, key: str, numel: int):
    self.dtype, self.key, self.numel = np.dtype(dtype), key, numel
    self.data: np.ndarray | None = None


class _Tensor:
  """A tensor to rebuild once its storage's bytes are known."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(size), tuple(stride)

  def to_numpy(self) -> np.ndarray:
    flat = self.storage.data
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * item for s in self.stride))
    return np.array(view)  # A compact copy, owning its memory.


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata.
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(tensor, *unused):
  del unused
  return tensor


class _ScriptModule:
  """A TorchScript module object (`__torch__.*` class): its attributes."""

  def __init__(self, qualified_name: str):
    self.qualified_name = qualified_name
    self.attributes: dict[str, Any] = {}

  def __setstate__(self, state: Any) -> None:
    if isinstance(state, dict):
      self.attributes.update(state)


def _script_class(qualified_name: str) -> type:
  """A class whose instances (made by NEWOBJ) are `_ScriptModule`s."""

  class _Instance(_ScriptModule):

    def __new__(cls, *unused):
      obj = object.__new__(cls)
      _ScriptModule.__init__(obj, qualified_name)
      return obj

    def __init__(self, *unused):  # pylint: disable=super-init-not-called
      pass

  return _Instance


class _Unpickler(pickle.Unpickler):
  """Knows the globals a state dict needs, and refuses every other one.

  With `script=True` (a TorchScript archive) the module classes
  (`__torch__.*`) are accepted too, as inert attribute holders: no code of
  the archive is run.
  """

  def __init__(self, file: BinaryIO, source: str, script: bool = False):
    super().__init__(file)
    self.source = source
    self.script = script
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if self.script and (module == "__torch__"
                        or module.startswith("__torch__.")):
      return _script_class(f"{module}.{name}")
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    raise TorchFileError(f"{self.source}: unsupported object {module}.{name} "
                         "(only state dicts of tensors can be read)")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise TorchFileError(f"{self.source}: unexpected persistent id {pid!r}")
    _, dtype, key, _location, numel = pid[:5]
    if key not in self.storages:
      self.storages[key] = _Storage(dtype, str(key), int(numel))
    return self.storages[key]


def _flatten_script(obj: _ScriptModule, prefix: str = "",
                    out: dict[str, Any] | None = None) -> dict[str, Any]:
  """The tensors of a TorchScript module tree, by dotted attribute name."""
  out = collections.OrderedDict() if out is None else out
  for name, value in obj.attributes.items():
    if isinstance(value, _ScriptModule):
      _flatten_script(value, f"{prefix}{name}.", out)
    elif isinstance(value, _Tensor):
      out[f"{prefix}{name}"] = value
  return out


def _materialise(obj: Any) -> Any:
  if isinstance(obj, _Tensor):
    return obj.to_numpy()
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as z:
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
    if len(pkl) != 1:
      raise TorchFileError(f"{path}: zip without one data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    # TorchScript archives carry the module's code beside the pickle.
    script = f"{prefix}constants.pkl" in z.namelist()
    unpickler = _Unpickler(io.BytesIO(z.read(pkl[0])), path, script=script)
    obj = unpickler.load()
    if isinstance(obj, _ScriptModule):
      obj = _flatten_script(obj)
    for key, storage in unpickler.storages.items():
      raw = z.read(f"{prefix}data/{key}")
      storage.data = np.frombuffer(raw, storage.dtype, storage.numel)
  return obj


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    try:
      magic = pickle.load(f)
    except Exception as e:  # pylint: disable=broad-except
      raise TorchFileError(f"{path}: not a torch.save file ({e!r})") from e
    if magic != _LEGACY_MAGIC:
      raise TorchFileError(f"{path}: not a torch.save file (bad magic)")
    pickle.load(f)  # Protocol version.
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
      raise TorchFileError(f"{path}: big-endian files are not supported")
    unpickler = _Unpickler(f, path)
    obj = unpickler.load()
    keys = pickle.load(f)
    for key in keys:
      storage = unpickler.storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      raw = f.read(numel * storage.dtype.itemsize)
      if len(raw) != numel * storage.dtype.itemsize:
        raise TorchFileError(f"{path}: truncated storage {key}")
      storage.data = np.frombuffer(raw, storage.dtype, numel)
  return obj


def load(path: str | os.PathLike) -> collections.OrderedDict:
  """A `torch.save`d state dict (or a TorchScript archive's tensors) as
  {name: numpy array}.

  Raises:
    FileNotFoundError: `path` does not exist.
    TorchFileError: the file is not a torch state dict of tensors.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  if not isinstance(obj, dict):
    raise TorchFileError(f"{path}: holds a {type(obj).__name__}, not a "
                         "state dict")
  return _materialise(obj)


# --- Writing. ---

_DTYPE_STORAGES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()}


class _Global:
  """A module-level name written into the pickle as is (torch's names,
  without importing torch)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle wants a callable; never called.
    raise TypeError(f"{self.module}.{self.name} is only a name here")


class _TensorOut:
  def __init__(self, array: np.ndarray, key: str):
    self.array, self.key = np.array(array, order="C"), key

  def __reduce__(self):
    a = self.array
    stride = tuple(s // a.itemsize for s in a.strides) if a.ndim else ()
    storage = _StorageOut(a, self.key)
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (storage, 0, tuple(a.shape), stride, False,
             collections.OrderedDict()))


class _StorageOut:
  def __init__(self, array: np.ndarray, key: str):
    self.array, self.key = array, key


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler, writing `_Global`s as GLOBAL opcodes and
  storages as torch's persistent ids."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_marker(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = _save_marker

  def persistent_id(self, obj: Any):
    if isinstance(obj, _StorageOut):
      kind = _DTYPE_STORAGES.get(obj.array.dtype)
      if kind is None:
        raise TorchFileError(f"tensor {obj.key}: dtype {obj.array.dtype} "
                             "has no torch storage")
      return ("storage", _Global("torch", kind), obj.key, "cpu",
              obj.array.size)
    return None


def save(state_dict: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes {name: numpy array} as a `torch.save` zip file."""
  path = os.fspath(path)
  name = os.path.splitext(os.path.basename(path))[0] or "archive"
  tensors = collections.OrderedDict(
      (k, _TensorOut(np.asarray(v), str(i)))
      for i, (k, v) in enumerate(state_dict.items()))
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(tensors)
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{name}/data.pkl", buf.getvalue())
    z.writestr(f"{name}/byteorder", "little")
    for t in tensors.values():
      z.writestr(f"{name}/data/{t.key}", t.array.tobytes())
    z.writestr(f"{name}/version", "3\n")
  os.replace(tmp, path)
