"""CLIP architectures and their checkpoint layout, shared by model and tests.

CLIP score (the cosine similarity of CLIP's image and text embeddings; Muse
reports 0.32 on COCO-30K) is comparable across papers only with the same
CLIP. This module names the published ViT CLIPs by their open_clip model
names, with their sizes (`CLIPArch`), the standard weight files, and the
tensor names and shapes of their state dicts in OpenAI's layout (which
open_clip keeps: `visual.conv1.weight`, fused `attn.in_proj_weight`,
`text_projection` [D, E], ...). `random_state_dict` makes seeded random
weights in that layout, so the PyTorch reference script and the JAX tests
build the same model without a download.

Pure numpy (no JAX, no torch).
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np

# Image preprocessing of every OpenAI / open_clip ViT model.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/"


@dataclasses.dataclass(frozen=True)
class CLIPArch:
  """Sizes of a ViT CLIP (both towers; open_clip's `vision_cfg`/`text_cfg`).

  Attention heads are width / 64 in the vision tower (OpenAI's rule) and
  given for the text tower. `quick_gelu` is OpenAI's activation
  (x * sigmoid(1.702 x)); open_clip's LAION models use exact GELU.
  """

  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  text_width: int
  text_layers: int
  text_heads: int
  context_length: int = 77
  vocab_size: int = 49408
  quick_gelu: bool = True
  vision_head_width: int = 64

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIP image_size={self.image_size} is not a "
                       f"multiple of patch_size={self.patch_size}")
    if self.vision_width % self.vision_head_width:
      raise ValueError(f"CLIP vision_width={self.vision_width} is not a "
                       f"multiple of {self.vision_head_width}")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def vision_heads(self) -> int:
    return self.vision_width // self.vision_head_width

  @property
  def eos_token_id(self) -> int:
    """`<|endoftext|>`: the highest id (CLIP pools at the ids' argmax)."""
    return self.vocab_size - 1


_B32 = CLIPArch(embed_dim=512, image_size=224, patch_size=32,
                vision_width=768, vision_layers=12, text_width=512,
                text_layers=12, text_heads=8)
_L14 = CLIPArch(embed_dim=768, image_size=224, patch_size=14,
                vision_width=1024, vision_layers=24, text_width=768,
                text_layers=12, text_heads=12)

# open_clip's model names: "-quickgelu" for OpenAI's weights, the plain
# names (exact GELU) for open_clip's LAION-trained ones.
ARCHS: dict[str, CLIPArch] = {
    "ViT-B-32": dataclasses.replace(_B32, quick_gelu=False),
    "ViT-B-32-quickgelu": _B32,
    "ViT-L-14": dataclasses.replace(_L14, quick_gelu=False),
    "ViT-L-14-quickgelu": _L14,
}

# The standard files: OpenAI's TorchScript archives (what `clip.load` and
# open_clip's pretrained="openai" download).
OPENAI_FILES: dict[str, tuple[str, str]] = {
    "ViT-B-32-quickgelu": (
        "ViT-B-32.pt", _OPENAI_URL + "40d365715913c9da98579312b702a82c18be"
        "219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
    "ViT-L-14-quickgelu": (
        "ViT-L-14.pt", _OPENAI_URL + "b8cca3fd41ae0c99ba7e8951adf17d267cdb"
        "84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
}


def arch(name: str) -> CLIPArch:
  """A named architecture, or one read from a JSON file of `CLIPArch`
  fields (a custom CLIP).

  Raises:
    ValueError: an unknown name (listing the known ones), or a JSON file
      with unknown or invalid fields.
  """
  if name in ARCHS:
    return ARCHS[name]
  if name.endswith(".json"):
    try:
      with open(name, encoding="utf-8") as f:
        fields = json.load(f)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"CLIP architecture file not found: {name}"
                              ) from e
    except ValueError as e:
      raise ValueError(f"{name}: not JSON: {e}") from e
    known = {f.name for f in dataclasses.fields(CLIPArch)}
    if not isinstance(fields, dict) or set(fields) - known:
      raise ValueError(f"{name}: expected an object of CLIPArch fields "
                       f"{sorted(known)}")
    try:
      return CLIPArch(**fields)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}: {e}") from e
  raise ValueError(f"unknown CLIP model {name!r}; known: {sorted(ARCHS)}, "
                   "or a JSON file of CLIPArch fields")


def _block_shapes(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
  mlp = 4 * width
  return {
      f"{prefix}ln_1.weight": (width,), f"{prefix}ln_1.bias": (width,),
      f"{prefix}attn.in_proj_weight": (3 * width, width),
      f"{prefix}attn.in_proj_bias": (3 * width,),
      f"{prefix}attn.out_proj.weight": (width, width),
      f"{prefix}attn.out_proj.bias": (width,),
      f"{prefix}ln_2.weight": (width,), f"{prefix}ln_2.bias": (width,),
      f"{prefix}mlp.c_fc.weight": (mlp, width),
      f"{prefix}mlp.c_fc.bias": (mlp,),
      f"{prefix}mlp.c_proj.weight": (width, mlp),
      f"{prefix}mlp.c_proj.bias": (width,),
  }


def state_dict_shapes(a: CLIPArch) -> dict[str, tuple[int, ...]]:
  """Every tensor of the OpenAI / open_clip state dict: name -> shape."""
  vw, tw = a.vision_width, a.text_width
  shapes = {
      "positional_embedding": (a.context_length, tw),
      "text_projection": (tw, a.embed_dim),
      "logit_scale": (),
      "visual.class_embedding": (vw,),
      "visual.positional_embedding": (a.grid * a.grid + 1, vw),
      "visual.proj": (vw, a.embed_dim),
      "visual.conv1.weight": (vw, 3, a.patch_size, a.patch_size),
      "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,),
  }
  for i in range(a.vision_layers):
    shapes.update(_block_shapes(f"visual.transformer.resblocks.{i}.", vw))
  shapes.update({"visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,)})
  for i in range(a.text_layers):
    shapes.update(_block_shapes(f"transformer.resblocks.{i}.", tw))
  shapes.update({"token_embedding.weight": (a.vocab_size, tw),
                 "ln_final.weight": (tw,), "ln_final.bias": (tw,)})
  return shapes


def random_state_dict(a: CLIPArch, seed: int = 0) -> dict[str, np.ndarray]:
  """Seeded float32 random weights in the OpenAI / open_clip layout.

  Each tensor draws from its own generator (seed, CRC of its name), so the
  result does not depend on iteration order. Scales keep activations O(1)
  through the towers: 1/sqrt(fan-in) kernels, 0.02 token and position
  tables, LayerNorm scales near 1, small biases, logit_scale log(1/0.07).
  """
  out = {}
  for name, shape in state_dict_shapes(a).items():
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name == "logit_scale":
      value = np.full(shape, np.log(1 / 0.07))
    elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight",
                        "ln_post.weight", "ln_final.weight")):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith(("bias", "class_embedding")):
      value = 0.02 * rng.standard_normal(shape)
    elif name in ("token_embedding.weight", "positional_embedding",
                  "visual.positional_embedding"):
      value = 0.02 * rng.standard_normal(shape)
    elif name in ("text_projection", "visual.proj"):
      value = rng.standard_normal(shape) / np.sqrt(shape[0])
    else:  # torch [out, in, ...] weights.
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    out[name] = value.astype(np.float32)
  return out
