"""A placeholder `torchvision` for importing muse-maskgit-pytorch.

muse-maskgit-pytorch imports torchvision at module level (image transforms,
datasets, VGG for its VQGAN's perceptual loss) but its Transformer and
MaskGit never use it. PyPI's torchvision does not load beside the CPU build
of torch 2.13.0 this machine installs ('operator torchvision::nms does not
exist'). When `import torchvision` fails, `import_muse_maskgit()` imports the
package with empty stand-in modules (whose attributes raise on use) and then
takes them out of `sys.modules` again, so other libraries (transformers,
diffusers) still see torchvision as absent.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

_SUBMODULES = ("transforms", "datasets", "utils", "models")
# Libraries that probe for torchvision when imported, and fail on a module
# without a spec: imported before the stand-in exists.
_PROBERS = ("transformers", "accelerate")


class _Missing:
  def __init__(self, name: str):
    self._name = name

  def __call__(self, *args, **kwargs):
    raise RuntimeError(f"{self._name} needs torchvision, which is not "
                       "installed (benchmarks/peers/torchvision_stub.py)")

  def __getattr__(self, attr: str):
    return _Missing(f"{self._name}.{attr}")


class _StubModule(types.ModuleType):
  def __getattr__(self, attr: str):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _Missing(f"{self.__name__}.{attr}")


def _torchvision_loads() -> bool:
  try:
    importlib.import_module("torchvision")
    return True
  except Exception:  # pylint: disable=broad-except
    for name in list(sys.modules):
      if name == "torchvision" or name.startswith("torchvision."):
        del sys.modules[name]
    return False


@contextlib.contextmanager
def _stand_in():
  for name in _PROBERS:
    try:
      importlib.import_module(name)
    except ImportError:
      pass
  root = _StubModule("torchvision")
  root.__path__ = []  # A package, so `import torchvision.x` works.
  added = {"torchvision": root}
  for sub in _SUBMODULES:
    mod = _StubModule(f"torchvision.{sub}")
    setattr(root, sub, mod)
    added[f"torchvision.{sub}"] = mod
  sys.modules.update(added)
  try:
    yield
  finally:
    for name in added:
      sys.modules.pop(name, None)


def import_muse_maskgit():
  """Returns the `muse_maskgit_pytorch` module, with or without torchvision."""
  if "muse_maskgit_pytorch" in sys.modules or _torchvision_loads():
    return importlib.import_module("muse_maskgit_pytorch")
  with _stand_in():
    return importlib.import_module("muse_maskgit_pytorch")
