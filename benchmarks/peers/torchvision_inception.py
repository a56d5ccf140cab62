"""torchvision's Inception blocks for pytorch-fid, without importing torchvision.

pytorch-fid builds its FID network from `torchvision.models.inception`
(BasicConv2d, InceptionA-E, `inception_v3`). PyPI's torchvision does not
import beside torch 2.13.0's CPU build ("operator torchvision::nms does not
exist"). `install()` puts a `torchvision` package in `sys.modules` whose
`models.inception` is the installed torchvision's real `inception.py`,
executed alone: the modules it imports for the weight registry, transforms
and logging are inert stand-ins (nothing pytorch-fid calls uses them).
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import os
import sys
import types


class _Weights:
  def __init__(self, **kwargs):
    self.__dict__.update(kwargs)


class _WeightsEnum(enum.Enum):
  """torchvision's WeightsEnum as far as `inception_v3(weights=None)` uses
  it."""

  @classmethod
  def verify(cls, obj):
    if obj is not None:
      raise ValueError("no pretrained torchvision weights here")
    return obj


def _module(name: str, **attrs) -> types.ModuleType:
  m = types.ModuleType(name)
  m.__dict__.update(attrs)
  m.__path__ = []  # A package, so relative imports resolve.
  sys.modules[name] = m
  return m


def install() -> str:
  """Installs the stand-in; returns the path of the inception.py used."""
  for name in [m for m in sys.modules if m.startswith("torchvision")]:
    del sys.modules[name]  # A failed import's leftovers.
  spec = importlib.util.find_spec("torchvision")
  if spec is None:
    raise SystemExit("pip install --no-deps torchvision==0.28.0 (its files "
                     "are read, the package is not imported)")
  root = list(spec.submodule_search_locations)[0]
  tv = _module("torchvision",
               __version__=importlib.metadata.version("torchvision"))
  tv.models = _module("torchvision.models")
  _module("torchvision.transforms")
  _module("torchvision.transforms._presets", ImageClassification=object)
  _module("torchvision.utils", _log_api_usage_once=lambda *a: None)
  _module("torchvision.models._api",
          register_model=lambda *a, **k: (lambda f: f), Weights=_Weights,
          WeightsEnum=_WeightsEnum)
  _module("torchvision.models._meta", _IMAGENET_CATEGORIES=[])
  _module("torchvision.models._utils",
          _ovewrite_named_param=lambda kw, k, v: kw.setdefault(k, v),
          handle_legacy_interface=lambda **k: (lambda f: f))
  path = os.path.join(root, "models", "inception.py")
  spec = importlib.util.spec_from_file_location(
      "torchvision.models.inception", path)
  inception = importlib.util.module_from_spec(spec)
  sys.modules["torchvision.models.inception"] = inception
  spec.loader.exec_module(inception)
  tv.models.inception = inception
  tv.models.inception_v3 = inception.inception_v3
  return path


def import_pytorch_fid():
  """pytorch_fid.inception, with the real torchvision if it imports."""
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as e:  # pylint: disable=broad-except
    path = install()
    print(f"import torchvision failed ({type(e).__name__}); its "
          f"{path} runs alone", file=sys.stderr)
  from pytorch_fid import inception  # pylint: disable=g-import-not-at-top
  return inception
