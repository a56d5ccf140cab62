"""Regenerates the CLIP-score goldens with open_clip (torch).

Pins `muse_jax.evaluation.clip_score` (both CLIP towers, the weight
loaders, open_clip's preprocessing and tokenising) to the reference
`open_clip` package. No package ships CLIP weights, so every model has
seeded random weights in OpenAI's / open_clip's layout
(`clip_layout.random_state_dict(arch, seed)`; the JAX tests rebuild the
same weights from the seed), loaded strictly into open_clip's `CLIP`.

Writes tests/golden/clip_score_golden.npz:

  images_<HxW>   uint8 [n, H, W, 3]   smooth random images: 64x64 (the
                 demo's, upsampled), 256x256 (downsampled), 200x300
                 (non-square: resize of the short side, centre crop);
                 n = 3, 3, 2
  pixels_32_<HxW>  f32 [n, 32, 32, 3]  open_clip.image_transform(32) of
                 them (PIL bicubic, centre crop, CLIP mean/std), channels
                 last (224 px in the --full file only: 7 MB)
  captions       str [8]; ids_full int32 [8, 77]  open_clip.tokenize
  for each model M of MODELS (arch name, layers, seed):
    M/image_features f32 [8, E]   encode_image of all 8 images' pixels
    M/text_features  f32 [8, E]   encode_text of M/ids: ids_full, or for
                                  the tiny model open_clip's tokenizer
                                  over tests/golden/clip_tiny's merges
  versions

and, for the loaders, tests/golden/clip_score_tiny/:

  openai_jit.pt          the tiny model as OpenAI ships CLIP: OpenAI's own
                         `clip/model.py` (from clip-anytorch) built from
                         the state dict (matmul and conv weights in
                         float16, the rest float32) and saved by
                         torch.jit.trace; tiny/fp16_image_features and
                         tiny/fp16_text_features in the npz are open_clip's
                         outputs with those weights
  hf/config.json, hf/model.safetensors   the same weights as transformers'
                         CLIPModel (`save_pretrained`); hf_image_features /
                         hf_text_features in the npz are its outputs

With --full, also writes --full_out (not committed; 2 GB of weights are
rebuilt from seeds): full-depth ViT-B-32-quickgelu and ViT-L-14-quickgelu
features, for `MUSE_JAX_CLIP_FULL_GOLDEN=<file> pytest
tests/test_clip_score.py`.

Run in the peers venv (torch CPU build) with open_clip and clip-anytorch:

  .venv-peers/bin/pip install --no-deps open_clip_torch==3.3.0 ftfy \\
      wcwidth timm clip-anytorch
  .venv-peers/bin/python scripts/make_clip_score_golden.py [--full]

open_clip imports torchvision's transforms; torchvision's compiled
operators do not load beside torch's CPU build, so its fake-op
registrations are skipped (benchmarks/peers/open_clip_models.py): nothing
here uses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.peers import open_clip_models  # pylint: disable=g-import-not-at-top,wrong-import-position
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_inception_golden import make_images  # pylint: disable=g-import-not-at-top,wrong-import-position
from muse_jax.evaluation import clip_layout  # pylint: disable=g-import-not-at-top,wrong-import-position

GOLDEN = os.path.join(ROOT, "tests", "golden", "clip_score_golden.npz")
TINY_DIR = os.path.join(ROOT, "tests", "golden", "clip_score_tiny")
SEED = 0
IMAGE_SIZES = ((64, 64), (256, 256), (200, 300))
IMAGE_COUNTS = (3, 3, 2)
CAPTIONS = (
    "a red circle above a blue square",
    "A photo of a cat sitting on a mat.",
    "two green triangles, left of one yellow star",
    "",
    "Don't panic: 42 crêpes & naïve café!",
    "a " + "very " * 90 + "long caption that must be truncated",
    "purple hexagon",
    "a small orange circle in the top left corner of a white image",
)
# The tiny model: OpenAI's build rule (heads = width / 64 in both towers).
TINY = clip_layout.CLIPArch(
    embed_dim=16, image_size=32, patch_size=8, vision_width=64,
    vision_layers=2, text_width=64, text_layers=2, text_heads=1,
    vocab_size=1014, quick_gelu=True)
# The tiny model's vocabulary: tests/golden/clip_tiny's (OpenAI's recipe on
# the first 500 merges of its file; 512 + 500 + 2 tokens).
TINY_MERGES = os.path.join(ROOT, "tests", "golden", "clip_tiny", "merges.txt")
# name -> (arch, seed). Real widths, patch sizes and heads; two layers per
# tower keeps CI's model small (--full checks the full depth).
MODELS = {
    "tiny": (TINY, 1),
    "b32_2l": (dataclasses.replace(clip_layout.ARCHS["ViT-B-32-quickgelu"],
                                   vision_layers=2, text_layers=2), 2),
    "l14_2l_gelu": (dataclasses.replace(clip_layout.ARCHS["ViT-L-14"],
                                        vision_layers=2, text_layers=2), 3),
}
FULL = {"b32_full": ("ViT-B-32-quickgelu", 4),
        "l14_full": ("ViT-L-14-quickgelu", 5)}


def image_batch(pixels: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
  """The 8 images the models embed: the three sets, in order."""
  return np.concatenate([pixels[s] for s in IMAGE_SIZES])


def tiny_ids(open_clip) -> np.ndarray:
  """The captions through open_clip's own tokenizer (`SimpleTokenizer`)
  over the tiny merges (gzipped as OpenAI's file is)."""
  import gzip  # pylint: disable=g-import-not-at-top
  with open(TINY_MERGES, encoding="utf-8") as f:
    merges = f.read().rstrip("\n")
  path = os.path.join(tempfile.mkdtemp(), "tiny_bpe.txt.gz")
  with gzip.open(path, "wb") as f:
    f.write(merges.encode("utf-8"))
  tokenizer = open_clip.tokenizer.SimpleTokenizer(path)
  if tokenizer.vocab_size != TINY.vocab_size:
    raise SystemExit(f"tiny vocabulary has {tokenizer.vocab_size} tokens")
  return tokenizer(list(CAPTIONS)).numpy()


def features(model, pixels: np.ndarray, ids: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
  image = model.encode_image(x).numpy()
  text = model.encode_text(torch.from_numpy(ids.astype(np.int64))).numpy()
  return image.astype(np.float32), text.astype(np.float32)


def write_openai_jit(sd, arch: clip_layout.CLIPArch, path: str) -> None:
  """OpenAI's model class (clip-anytorch's clip/model.py, run alone) from
  the state dict, traced and saved as OpenAI's files are: `build_model`
  stores the matmul and conv weights in float16 (its `convert_weights`).
  Returns the state dict as stored."""
  import torch  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("clip")
  if spec is None:
    raise SystemExit("pip install --no-deps clip-anytorch")
  file = os.path.join(list(spec.submodule_search_locations)[0], "model.py")
  mspec = importlib.util.spec_from_file_location("openai_clip_model", file)
  module = importlib.util.module_from_spec(mspec)
  mspec.loader.exec_module(module)
  model = module.build_model({k: v.clone() for k, v in sd.items()}).eval()
  image = torch.zeros(1, 3, arch.image_size, arch.image_size,
                      dtype=torch.float16)
  text = torch.zeros(1, arch.context_length, dtype=torch.long)
  traced = torch.jit.trace(model, (image, text), check_trace=False)
  traced.save(path)
  return {k: v.float() for k, v in model.state_dict().items()}


def write_hf(sd, arch: clip_layout.CLIPArch, directory: str):
  """transformers' CLIPModel holding `sd`, saved; returns the model."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  act = "quick_gelu" if arch.quick_gelu else "gelu"
  config = transformers.CLIPConfig(
      text_config=dict(
          vocab_size=arch.vocab_size, hidden_size=arch.text_width,
          intermediate_size=4 * arch.text_width,
          num_hidden_layers=arch.text_layers,
          num_attention_heads=arch.text_heads,
          max_position_embeddings=arch.context_length, hidden_act=act,
          eos_token_id=arch.eos_token_id, bos_token_id=arch.vocab_size - 2,
          pad_token_id=0),
      vision_config=dict(
          hidden_size=arch.vision_width,
          intermediate_size=4 * arch.vision_width,
          num_hidden_layers=arch.vision_layers,
          num_attention_heads=arch.vision_heads, image_size=arch.image_size,
          patch_size=arch.patch_size, hidden_act=act),
      projection_dim=arch.embed_dim)
  model = transformers.CLIPModel(config).eval()
  hf = {}

  def block(ours: str, theirs: str, d: int):
    w, b = sd[f"{ours}attn.in_proj_weight"], sd[f"{ours}attn.in_proj_bias"]
    for j, n in enumerate("qkv"):
      hf[f"{theirs}self_attn.{n}_proj.weight"] = w[j * d:(j + 1) * d]
      hf[f"{theirs}self_attn.{n}_proj.bias"] = b[j * d:(j + 1) * d]
    for a, c in (("attn.out_proj", "self_attn.out_proj"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                 ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
      for p in ("weight", "bias"):
        hf[f"{theirs}{c}.{p}"] = sd[f"{ours}{a}.{p}"]

  for i in range(arch.text_layers):
    block(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.",
          arch.text_width)
  for i in range(arch.vision_layers):
    block(f"visual.transformer.resblocks.{i}.",
          f"vision_model.encoder.layers.{i}.", arch.vision_width)
  hf.update({
      "text_model.embeddings.token_embedding.weight":
          sd["token_embedding.weight"],
      "text_model.embeddings.position_embedding.weight":
          sd["positional_embedding"],
      "text_model.final_layer_norm.weight": sd["ln_final.weight"],
      "text_model.final_layer_norm.bias": sd["ln_final.bias"],
      "text_projection.weight": sd["text_projection"].T.contiguous(),
      "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
      "vision_model.embeddings.patch_embedding.weight":
          sd["visual.conv1.weight"],
      "vision_model.embeddings.position_embedding.weight":
          sd["visual.positional_embedding"],
      "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
      "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
      "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
      "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
      "visual_projection.weight": sd["visual.proj"].T.contiguous(),
      "logit_scale": sd["logit_scale"],
  })
  missing, unexpected = model.load_state_dict(
      {k: v.clone() for k, v in hf.items()}, strict=False)
  missing = [m for m in missing if not m.endswith("position_ids")]
  if missing or unexpected:
    raise SystemExit(f"HF mapping: missing {missing}, unexpected "
                     f"{unexpected}")
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory, safe_serialization=True)
  for extra in ("generation_config.json",):
    if os.path.exists(os.path.join(directory, extra)):
      os.remove(os.path.join(directory, extra))
  del torch
  return model


def _tensor(out):
  return out if not hasattr(out, "pooler_output") else out.pooler_output


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=GOLDEN)
  parser.add_argument("--tiny_dir", default=TINY_DIR)
  parser.add_argument("--full", action="store_true")
  parser.add_argument("--full_out", default=os.path.join(
      tempfile.gettempdir(), "clip_score_full_golden.npz"))
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  open_clip = open_clip_models.import_open_clip()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)

  out: dict[str, np.ndarray] = {}
  images = {}
  for k, (h, w) in enumerate(IMAGE_SIZES):
    images[(h, w)] = make_images(SEED + k, IMAGE_COUNTS[k], h, w)
    out[f"images_{h}x{w}"] = images[(h, w)]

  def pixels_for(size: int) -> dict[tuple[int, int], np.ndarray]:
    transform = open_clip.image_transform(size, is_train=False)
    result = {}
    for hw, imgs in images.items():
      result[hw] = np.stack([
          transform(Image.fromarray(img)).numpy().transpose(1, 2, 0)
          for img in imgs]).astype(np.float32)
      if size == 32:
        out[f"pixels_{size}_{hw[0]}x{hw[1]}"] = result[hw]
    return result

  pixels = {size: pixels_for(size) for size in (32, 224)}
  out["captions"] = np.asarray(CAPTIONS)
  ids_full = open_clip.tokenize(list(CAPTIONS)).numpy()
  out["ids_full"] = ids_full.astype(np.int32)

  for name, (arch, seed) in MODELS.items():
    model, sd = open_clip_models.model(open_clip, arch, seed)
    ids = tiny_ids(open_clip) if name == "tiny" else ids_full
    image_f, text_f = features(model, image_batch(pixels[arch.image_size]),
                               ids)
    out[f"{name}/ids"] = ids.astype(np.int32)
    out[f"{name}/image_features"] = image_f
    out[f"{name}/text_features"] = text_f
    out[f"{name}/seed"] = np.asarray(seed)
    print(f"{name}: image {image_f.shape} text {text_f.shape}", flush=True)
    if name == "tiny":
      os.makedirs(args.tiny_dir, exist_ok=True)
      stored = write_openai_jit(sd, arch,
                                os.path.join(args.tiny_dir, "openai_jit.pt"))
      # That file's weights (float16 where OpenAI's are), run in float32
      # by open_clip.
      model16, _ = open_clip_models.model(open_clip, arch, seed)
      model16.load_state_dict(stored)
      image_f, text_f = features(model16, image_batch(pixels[32]), ids)
      out["tiny/fp16_image_features"] = image_f
      out["tiny/fp16_text_features"] = text_f
      hf = write_hf(sd, arch, os.path.join(args.tiny_dir, "hf"))
      x = torch.from_numpy(
          image_batch(pixels[32]).transpose(0, 3, 1, 2).copy())
      out["hf_image_features"] = _tensor(
          hf.get_image_features(pixel_values=x)).numpy()
      out["hf_text_features"] = _tensor(hf.get_text_features(
          input_ids=torch.from_numpy(ids.astype(np.int64)))).numpy()
      for a, b in (("hf_image_features", "tiny/image_features"),
                   ("hf_text_features", "tiny/text_features")):
        print(f"HF vs open_clip {a}: max abs "
              f"{np.abs(out[a] - out[b]).max():.2e}")

  out["versions"] = np.asarray([torch.__version__, open_clip.__version__,
                                transformers.__version__])
  np.savez_compressed(args.out, **out)
  print(f"wrote {args.out} and {args.tiny_dir}")
  with open(os.path.join(args.tiny_dir, "arch.json"), "w") as f:
    json.dump(dataclasses.asdict(TINY), f, indent=1)

  if args.full:
    full = {}
    for name, (arch_name, seed) in FULL.items():
      arch = clip_layout.ARCHS[arch_name]
      model, _ = open_clip_models.model(open_clip, arch, seed)
      image_f, text_f = features(model, image_batch(pixels[224]), ids_full)
      full.update({f"{name}/image_features": image_f,
                   f"{name}/text_features": text_f,
                   f"{name}/seed": np.asarray(seed),
                   f"{name}/arch": np.asarray(arch_name)})
      del model
      print(f"{name} done", flush=True)
    full["ids_full"] = out["ids_full"]
    full.update({f"pixels_224_{h}x{w}": pixels[224][(h, w)]
                 for h, w in IMAGE_SIZES})
    np.savez_compressed(args.full_out, **full)
    print(f"wrote {args.full_out}")


if __name__ == "__main__":
  main()
