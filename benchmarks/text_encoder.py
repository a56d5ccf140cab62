r"""Embedding-cache throughput: our T5 encoder vs transformers' in one run.

  python -m benchmarks.text_encoder --out=benchmarks/results/text_encoder_cpu.jsonl

(`make bench-text-encoder` runs this.) The t5_v1_1_base shape (12 layers,
d_model 768, gated-GELU, vocab 32128) with seeded random weights written
once in Hugging Face's format (config.json + model.safetensors) and a
sentencepiece model trained on the benchmark's captions (spiece.model),
so both sides read the same files:

- ours: `text_encoders.cache.build` (the `embed_captions` CLI's path):
  tokenise, encode in fixed-size batches, write bfloat16 ArrayRecord
  shards + manifest, into a fresh directory each timed pass;
- transformers: `T5EncoderModel` (float32, `torch.inference_mode()`,
  torch using every core as XLA does) + its T5Tokenizer, padding to the
  same --max_len, hidden states at real tokens to bfloat16 on the host
  (benchmarks/peers/t5_encoder.py, run in the peers' venv). No writes.

Both embed the same --num_captions captions (distinct, 4-30 words) in
batches of --batch, float32. Prints JSON lines: `what: meta`, each side's
`embed_captions` record with `captions_per_s` (captions / median pass;
the first pass, with compilation, is a warm-up), a `kind: ratio` line
(ours / transformers) and `what: done`.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import timing

_OUT = flags.DEFINE_string("out", "", "also write the JSON lines here")
_NUM = flags.DEFINE_integer("num_captions", 256, "distinct captions")
_BATCH = flags.DEFINE_integer("batch", 64, "captions per call")
_MAX_LEN = flags.DEFINE_integer("max_len", 64, "tokens per caption")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed passes (median)")
_SEED = flags.DEFINE_integer("seed", 0, "weights and captions seed")
_OURS = flags.DEFINE_bool("ours", True, "run ours")
_PEERS = flags.DEFINE_bool("peers", True, "run transformers (peers' venv)")
_PEERS_PYTHON = flags.DEFINE_string(
    "peers_python", ".venv-peers/bin/python", "the peers' interpreter")
_THREADS = flags.DEFINE_integer(
    "threads", os.cpu_count() or 1, "torch intra-op threads")
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "where the weights and captions go (default: a "
    "temporary directory, removed afterwards)")

PRESET = "t5_v1_1_base"
IMPL = "ours-t5-cache"

_WORDS = ("a red square above a blue circle small large green triangle "
          "left of right below next to three two four yellow purple big "
          "tiny photo painting of the on in with dog cat tree house sky "
          "mountain river under bright dark old new wooden glass city "
          "street at night morning sunset beach field flowers standing "
          "sitting running near behind").split()


def captions(n: int, seed: int) -> list[str]:
  """`n` distinct pseudo-English captions of 4-30 words."""
  rng = np.random.default_rng(seed)
  out: list[str] = []
  seen: set[str] = set()
  while len(out) < n:
    text = " ".join(rng.choice(_WORDS, rng.integers(4, 31)))
    if text not in seen:
      seen.add(text)
      out.append(text)
  return out


def write_model(directory: pathlib.Path, texts: list[str], seed: int
                ) -> None:
  """config.json, model.safetensors (random, T5's init scales) and a
  sentencepiece spiece.model trained on `texts`."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from muse_jax.text_encoders import t5  # pylint: disable=g-import-not-at-top

  cfg = t5.PRESETS[PRESET]
  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
  hf = dict(architectures=["T5EncoderModel"], model_type="t5",
            vocab_size=cfg.vocab_size, d_model=d, d_kv=k, num_heads=h,
            d_ff=f, num_layers=cfg.num_layers, num_decoder_layers=0,
            relative_attention_num_buckets=cfg.relative_attention_num_buckets,
            relative_attention_max_distance=(
                cfg.relative_attention_max_distance),
            layer_norm_epsilon=cfg.layer_norm_eps,
            feed_forward_proj=cfg.feed_forward_proj, dropout_rate=0.0,
            is_encoder_decoder=False, use_cache=False,
            tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)
  (directory / "config.json").write_text(json.dumps(hf, indent=1))
  rng = np.random.default_rng(seed)

  def normal(shape, std):
    return (rng.standard_normal(shape, np.float32) * std).astype(np.float32)

  tensors = {"shared.weight": normal((cfg.vocab_size, d), 1.0),
             "encoder.final_layer_norm.weight": np.ones(d, np.float32),
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
             ".weight": normal((cfg.relative_attention_num_buckets, h), 1.0)}
  for i in range(cfg.num_layers):
    p = f"encoder.block.{i}.layer."
    tensors.update({
        f"{p}0.SelfAttention.q.weight": normal((h * k, d), (d * k) ** -0.5),
        f"{p}0.SelfAttention.k.weight": normal((h * k, d), d ** -0.5),
        f"{p}0.SelfAttention.v.weight": normal((h * k, d), d ** -0.5),
        f"{p}0.SelfAttention.o.weight": normal((d, h * k), (h * k) ** -0.5),
        f"{p}0.layer_norm.weight": np.ones(d, np.float32),
        f"{p}1.DenseReluDense.wi_0.weight": normal((f, d), d ** -0.5),
        f"{p}1.DenseReluDense.wi_1.weight": normal((f, d), d ** -0.5),
        f"{p}1.DenseReluDense.wo.weight": normal((d, f), f ** -0.5),
        f"{p}1.layer_norm.weight": np.ones(d, np.float32),
    })
  st_numpy.save_file(tensors, str(directory / "model.safetensors"))
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=str(directory / "spiece"),
      vocab_size=256, hard_vocab_limit=False, model_type="unigram",
      character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=1, minloglevel=2)


def bench_ours(directory: pathlib.Path, texts: list[str], device: str
               ) -> dict[str, Any]:
  from muse_jax import sharding  # pylint: disable=g-import-not-at-top
  from muse_jax import text_encoders  # pylint: disable=g-import-not-at-top
  from muse_jax.text_encoders import cache  # pylint: disable=g-import-not-at-top

  cfg = text_encoders.TextEncoderConfig(
      name="t5", path=str(directory), max_len=_MAX_LEN.value,
      batch_size=_BATCH.value, dtype="float32")
  mesh = cache.local_mesh()
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  t0 = time.perf_counter()
  encoder = text_encoders.make(cfg, mesh, rules)
  load_s = time.perf_counter() - t0
  ident = cache.identity(cfg)
  passes = iter(range(10**6))

  def one_pass():
    out = directory / f"cache-{next(passes)}"
    cache.build(out, texts, lambda: encoder, ident)
    shutil.rmtree(out)

  t = timing.measure(one_pass, repeats=_REPEATS.value)
  return dict(impl=IMPL, what="embed_captions", config=PRESET,
              captions=len(texts), batch=encoder.batch_size,
              max_len=_MAX_LEN.value, dtype="float32", **t.fields(),
              captions_per_s=len(texts) / t.median_s, load_s=load_s,
              device=device, jax_device=str(jax.devices()[0]),
              loadavg_1m=os.getloadavg()[0])


def run_peers(directory: pathlib.Path, captions_file: pathlib.Path, emit
              ) -> None:
  if not os.path.exists(_PEERS_PYTHON.value):
    raise FileNotFoundError(
        f"{_PEERS_PYTHON.value} not found: create the peers' venv "
        "(`make bench-text-encoder` does) or pass --peers_python")
  cmd = [_PEERS_PYTHON.value, "-m", "benchmarks.peers.t5_encoder",
         f"--model_dir={directory}", f"--captions={captions_file}",
         f"--name={PRESET}", f"--batch={_BATCH.value}",
         f"--max_len={_MAX_LEN.value}", f"--repeats={_REPEATS.value}",
         f"--threads={_THREADS.value}"]
  timing.run_peer(cmd, emit, "transformers")


def main(argv) -> None:
  del argv
  t_start = time.perf_counter()
  emit = timing.Recorder(_OUT.value)
  records = emit.records

  device = f"cpu: {timing.cpu_name()}"
  load = os.getloadavg()[0]
  if load > 0.5:
    timing.log(f"warning: 1-minute load average is {load:.2f}; other work "
               "on this machine skews the timings")
  emit(dict(what="meta", impl="bench-text-encoder", loadavg_1m=load,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            device=device, python=sys.version.split()[0],
            command=" ".join(sys.argv), config=PRESET,
            num_captions=_NUM.value, batch=_BATCH.value,
            max_len=_MAX_LEN.value, torch_threads=_THREADS.value,
            jax_version=jax.__version__))
  tmp = None
  if _WORKDIR.value:
    directory = pathlib.Path(_WORKDIR.value)
    directory.mkdir(parents=True, exist_ok=True)
  else:
    tmp = tempfile.mkdtemp(prefix="bench_text_encoder_")
    directory = pathlib.Path(tmp)
  try:
    texts = captions(_NUM.value, _SEED.value)
    captions_file = directory / "captions.txt"
    captions_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    if not (directory / "model.safetensors").exists():
      t0 = time.perf_counter()
      write_model(directory, texts, _SEED.value)
      timing.log(f"wrote random {PRESET} weights in "
                 f"{time.perf_counter() - t0:.1f}s")
    if _OURS.value:
      emit(bench_ours(directory, texts, device))
    if _PEERS.value:
      run_peers(directory, captions_file, emit)
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  by_impl = {r["impl"]: r for r in records
             if r.get("what") == "embed_captions" and "captions_per_s" in r}
  peer = next((r for i, r in by_impl.items() if i != IMPL), None)
  if IMPL in by_impl and peer is not None:
    emit(dict(kind="ratio", what="embed_captions", config=PRESET,
              ours=IMPL, peer=peer["impl"],
              ratio=by_impl[IMPL]["captions_per_s"] / peer["captions_per_s"]))
  emit(dict(what="done", impl="bench-text-encoder",
            wall_s=time.perf_counter() - t_start,
            loadavg_1m=os.getloadavg()[0]))
  emit.close()


if __name__ == "__main__":
  app.run(main)
