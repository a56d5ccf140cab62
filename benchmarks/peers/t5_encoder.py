"""transformers' `T5EncoderModel` embedding a caption file; one JSON line.

Run in the peers' virtual environment from the repository root
(benchmarks/text_encoder.py does this as a subprocess):

  .venv-peers/bin/python -m benchmarks.peers.t5_encoder --model_dir=DIR \
      --captions=FILE [--batch=64] [--max_len=64] [--repeats=3] [--threads=N]

`DIR` holds config.json, model.safetensors and spiece.model (the same
random weights and sentencepiece model ours reads). One timed pass embeds
every caption of FILE the way an embedding cache needs them: the slow
`T5Tokenizer` (from spiece.model) (padding to --max_len, truncation), the
float32 encoder under `torch.inference_mode()` in batches of --batch, then
the last hidden states at real tokens converted to bfloat16 host arrays.
Throughput is captions / median pass time (the first pass is a warm-up).
"""

from __future__ import annotations

import argparse
import os

from benchmarks import timing

IMPL = "transformers-t5encoder"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model_dir", required=True)
  p.add_argument("--captions", required=True)
  p.add_argument("--name", default="t5_v1_1_base")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--max_len", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from benchmarks.peers import measure  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  transformers.logging.set_verbosity_error()
  tok = transformers.T5Tokenizer.from_pretrained(args.model_dir, extra_ids=0)
  model = transformers.T5EncoderModel.from_pretrained(
      args.model_dir, torch_dtype=torch.float32).eval()
  with open(args.captions, encoding="utf-8") as f:
    captions = [line.rstrip("\n") for line in f]

  def embed_all():
    out = []
    for lo in range(0, len(captions), args.batch):
      batch = tok(captions[lo:lo + args.batch], padding="max_length",
                  truncation=True, max_length=args.max_len,
                  return_tensors="pt")
      hidden = model(input_ids=batch.input_ids,
                     attention_mask=batch.attention_mask).last_hidden_state
      hidden = hidden * batch.attention_mask[..., None]
      # numpy has no bfloat16: keep the bf16 bits as int16.
      out.append(hidden.to(torch.bfloat16).view(torch.int16).numpy())
    return out

  with torch.inference_mode():
    t = timing.measure(embed_all, repeats=args.repeats)
  timing.emit(dict(
      impl=IMPL, what="embed_captions", config=args.name,
      captions=len(captions), batch=args.batch, max_len=args.max_len,
      dtype="float32", **t.fields(),
      captions_per_s=len(captions) / t.median_s, threads=args.threads,
      torch_version=torch.__version__,
      transformers_version=transformers.__version__,
      device=measure.device_name(), loadavg_1m=os.getloadavg()[0]))


def main() -> None:
  run(parse_args())


if __name__ == "__main__":
  main()
