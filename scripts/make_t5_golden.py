"""Regenerates the T5 encoder goldens with sentencepiece and transformers.

The goldens pin `muse_jax.text_encoders.t5` to transformers'
`T5EncoderModel` (T5 v1.1: RMS layer norms, gated-GELU feed-forward,
relative position buckets, unscaled attention) and T5's sentencepiece
tokenisation. T5-XXL is far too big to commit, so the model is a small
randomly initialised one over a small sentencepiece vocabulary trained here
on a fixed English corpus with T5's conventions (pad 0, EOS 1, unknown 2,
no BOS, NFKC normalisation, no byte fallback).

Written into tests/golden/t5_tiny/ (well under 1 MB in all):

  spiece.model                the sentencepiece unigram model (at most
                              256 pieces; 180 from this corpus)
  config.json, model.safetensors
                              `T5EncoderModel.save_pretrained` (d_model 32,
                              d_kv 8, 4 heads, d_ff 64, 3 layers, gated-gelu,
                              32 buckets, max distance 128, vocab = the
                              sentencepiece size + 8 padding rows, as real
                              T5 pads 32100 to 32128); every weight random
                              (seeded), RMS norm scales near 1

and tests/golden/t5_tiny_golden.npz:

  texts          str [N]          N >= 8 sentences (punctuation, digits,
                                  characters the vocabulary lacks, odd
                                  whitespace, "", one long enough to be
                                  truncated)
  ids, mask      int32/bool [N, MAX_LEN]  transformers' `T5Tokenizer`
                                  (padding="max_length", truncation)
  hf_ids         int32 [N, L]     untruncated `T5Tokenizer` ids (-1 pads)
  sp_ids         int32 [N, L]     sentencepiece's own ids + EOS (-1 pads),
                                  the tokenisation T5/seqio use
  last           f32 [N, MAX_LEN, 32]  last_hidden_state (attention_mask
                                  given), zeroed where mask is False
  buckets        int32 [2R+1]     `T5Attention._relative_position_bucket`
                                  of offsets -R..R (32 buckets, max 128)
  versions       str [3]          torch, transformers, sentencepiece

In transformers 5 `T5Tokenizer` is the *tokenizers*-backed tokenizer
converted from spiece.model (there is no slow one any more); the script
asserts it agrees with sentencepiece itself on every text, so both
references pin ours.

torch and transformers must not enter the project's venv; the peers venv
has them (`make .venv-peers/.installed`). transformers converts
spiece.model with the protobuf package, which that venv lacks, so:

  .venv-peers/bin/pip install protobuf
  .venv-peers/bin/python scripts/make_t5_golden.py
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "tests" / "golden"
SEED = 0
SP_VOCAB = 256
EXTRA_ROWS = 8
MAX_LEN = 40
BUCKET_RANGE = 300
MODEL = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3,
             num_decoder_layers=3, feed_forward_proj="gated-gelu",
             relative_attention_num_buckets=32,
             relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
             dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
             decoder_start_token_id=0)

# The sentencepiece training corpus: captions of simple scenes plus some
# ordinary prose, so the vocabulary has whole words and sub-word pieces.
_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black",
           "white")
_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond",
           "cross", "heart")
_PLACES = ("to the left of", "to the right of", "above", "below", "next to",
           "inside", "behind", "in front of")
_PROSE = (
    "The quick brown fox jumps over the lazy dog.",
    "A photograph of an astronaut riding a horse on the moon.",
    "An oil painting of a lighthouse at sunset, with waves crashing.",
    "Two cats are sleeping on a sofa while it rains outside.",
    "A bowl of fresh fruit: apples, bananas, grapes and oranges.",
    "The city skyline at night, reflected in the calm river.",
    "A small wooden boat drifting on a misty lake in the morning.",
    "Children playing football in a park under a cloudy sky.",
    "A close-up of a bee collecting pollen from a sunflower.",
    "An old library full of books, maps and dusty globes.",
    "Snow-covered mountains behind a quiet village with red roofs.",
    "A cup of coffee and a croissant on a table by the window.",
    "There are 3 dogs, 12 birds and 100 flowers in the garden.",
    "She said: \"it's not what we've expected, isn't it?\"",
    "Watercolor sketch of a street market with many colorful stalls.",
    "A robot reading a newspaper in a crowded train station.",
)

TEXTS = (
    "a photo of an astronaut riding a horse on mars",
    "A RED circle to the LEFT of a blue square.",
    "Don't stop: it's 3:45pm, and we've got 1,024 tokens!!",
    "  multiple   spaces\tand\nnewlines  ",
    "Café crème brûlée for a naïve résumé",
    "東京の夜景 and a 🚀 emoji",
    "",
    "hyphen-ated words, under_scores & ampersands; (parentheses) [brackets]",
    "the quick brown fox jumps over the lazy dog",
    "Ünïcödé ÀÇÇÊÑTS and the ﬁ ligature",
    # Longer than MAX_LEN tokens: truncated.
    "a very long caption that keeps going with many shapes such as circles, "
    "squares, triangles, stars, hexagons, diamonds and crosses in red, "
    "green, blue, yellow, purple and orange, all arranged on a grid of "
    "sixteen by sixteen cells under a cloudy evening sky",
)


def corpus() -> list[str]:
  lines = list(_PROSE)
  for i, color in enumerate(_COLORS):
    for j, shape in enumerate(_SHAPES):
      other = _COLORS[(i + j + 1) % len(_COLORS)]
      other_shape = _SHAPES[(i * 3 + j + 2) % len(_SHAPES)]
      place = _PLACES[(i + 2 * j) % len(_PLACES)]
      lines.append(f"a {color} {shape} {place} a {other} {other_shape}")
  return lines


def train_sentencepiece(out: pathlib.Path) -> None:
  """A unigram model with T5's special ids, deterministic (one thread, no
  sampling or shuffling of the corpus)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()), model_writer=model,
      vocab_size=SP_VOCAB, model_type="unigram", character_coverage=1.0,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=False,
      normalization_rule_name="nmt_nfkc", num_threads=1,
      shuffle_input_sentence=False, input_sentence_size=0,
      hard_vocab_limit=False, minloglevel=2)
  out.write_bytes(model.getvalue())


def _randomise(model, torch) -> None:
  """Every parameter random, seeded: norm scales near 1, embeddings and the
  relative bias table of unit scale, projections ~ 1/sqrt(fan-in) (and
  queries a further 1/sqrt(d_kv), as T5 initialises them, since attention
  is not scaled)."""
  gen = torch.Generator().manual_seed(SEED)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif "relative_attention_bias" in name or "shared" in name:
        p.copy_(noise)
      else:  # [out, in] linear weights.
        scale = p.shape[1]**-0.5
        if name.endswith(".q.weight"):
          scale *= MODEL["d_kv"]**-0.5
        p.copy_(noise * scale)


def _padded(rows: list[list[int]]) -> np.ndarray:
  out = np.full((len(rows), max(map(len, rows))), -1, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--golden-dir", default=str(GOLDEN_DIR))
  args = parser.parse_args()

  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.t5 import modeling_t5  # pylint: disable=g-import-not-at-top

  torch.manual_seed(SEED)
  golden = pathlib.Path(args.golden_dir)
  model_dir = golden / "t5_tiny"
  model_dir.mkdir(parents=True, exist_ok=True)
  spiece = model_dir / "spiece.model"
  train_sentencepiece(spiece)
  sp = spm.SentencePieceProcessor(model_file=str(spiece))
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)

  tok = transformers.T5Tokenizer.from_pretrained(str(model_dir),
                                                 extra_ids=0)
  texts = list(TEXTS)
  hf_ids = tok(texts)["input_ids"]
  sp_ids = [ids + [sp.eos_id()] for ids in sp.encode(texts)]
  for text, a, b in zip(texts, hf_ids, sp_ids):
    assert a == b, (text, a, b)
  assert max(map(len, hf_ids)) > MAX_LEN  # Truncation is exercised.

  config = transformers.T5Config(vocab_size=sp.get_piece_size() + EXTRA_ROWS,
                                 **MODEL)
  model = transformers.T5EncoderModel(config).eval()
  _randomise(model, torch)
  model.save_pretrained(str(model_dir), safe_serialization=True)

  batch = tok(texts, padding="max_length", max_length=MAX_LEN,
              truncation=True, return_tensors="pt")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  with torch.no_grad():
    last = model(input_ids=ids, attention_mask=mask).last_hidden_state
  m = mask.numpy().astype(bool)
  buckets = modeling_t5.T5Attention._relative_position_bucket(  # pylint: disable=protected-access
      torch.arange(-BUCKET_RANGE, BUCKET_RANGE + 1), bidirectional=True,
      num_buckets=32, max_distance=128)

  np.savez_compressed(
      golden / "t5_tiny_golden.npz",
      texts=np.array(texts),
      ids=ids.numpy().astype(np.int32), mask=m,
      hf_ids=_padded(hf_ids), sp_ids=_padded(sp_ids),
      last=np.where(m[..., None], last.numpy(), 0.0).astype(np.float32),
      buckets=buckets.numpy().astype(np.int32),
      versions=np.array([torch.__version__, transformers.__version__,
                         spm.__version__]))
  total = sum(f.stat().st_size for f in model_dir.iterdir())
  total += (golden / "t5_tiny_golden.npz").stat().st_size
  print(f"wrote {model_dir} and t5_tiny_golden.npz: {total / 1e3:.0f} kB; "
        f"sentencepiece {sp.get_piece_size()} pieces, model vocab "
        f"{config.vocab_size}, longest text {max(map(len, hf_ids))} tokens")


if __name__ == "__main__":
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  main()
