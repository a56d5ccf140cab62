"""CLIP's byte-level BPE tokenizer, ids as transformers' `CLIPTokenizer`.

Split out of `clip` (the text tower and its encoder) so each reads in one
sitting; `clip` re-exports the public names here.

`CLIPTokenizer`: CLIP's byte-level BPE, lowercased, whitespace runs
collapsed, `<|startoftext|> ... <|endoftext|>`, matching the ids of
transformers' `CLIPTokenizer`. It is read from a HF `tokenizer.json`, or
built from OpenAI's merges file `bpe_simple_vocab_16e6.txt.gz` (shipped in
the PyPI packages `clip-anytorch` and `open_clip_torch`) or a HF
`merges.txt`. Like HF's tokenizer (and unlike OpenAI's reference
`clip.tokenize`), it does not run `ftfy.fix_text` or HTML unescaping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import gzip
import json
import os
import pathlib

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

PathLike = str | os.PathLike[str]

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# CLIP's pre-tokenizer: contractions, letter runs, single digits and runs of
# everything else; whitespace separates pieces and is dropped.
_PIECE_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                  r"""[^\s\p{L}\p{N}]+""")
# OpenAI's vocabulary uses the first 49152 - 256 - 2 merges of its file:
# 256 bytes + 256 word-final bytes + merges + 2 special tokens = 49408.
OPENAI_NUM_MERGES = 49152 - 256 - 2
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

_TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_MERGES_FILE = "merges.txt"
_VOCAB_FILE = "vocab.json"


def bytes_to_unicode() -> dict[int, str]:
  """CLIP's (GPT-2's) reversible map from bytes to printable characters.

  Printable Latin-1 bytes map to themselves; the other 68 bytes, in
  increasing order, to chr(256), chr(257), ... The order of this dict (the
  printable ones first) is the order of the first 256 vocabulary ids.
  """
  printable = (list(range(ord("!"), ord("~") + 1))
               + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  mapping = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in mapping:
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


def read_bpe_merges(path: PathLike, num_merges: int | None = None
                    ) -> list[tuple[str, str]]:
  """The merges of OpenAI's `bpe_simple_vocab_16e6.txt.gz` or a HF
  `merges.txt` (gzipped or not; a `#version` header line is skipped).

  `num_merges` keeps the first merges only; by default at most
  `OPENAI_NUM_MERGES`, as OpenAI's tokenizer uses.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"CLIP BPE merges file not found: {path}")
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  # The header: "#version: 0.2" in HF files; OpenAI's file has stray bytes
  # before it ('"bpe_simple_vocab_16e6.txt#version: 0.2').
  first = 1
  if lines and "#version" in lines[0]:
    lines, first = lines[1:], 2
  limit = OPENAI_NUM_MERGES if num_merges is None else num_merges
  merges = []
  for number, line in enumerate(lines):
    if len(merges) == limit:
      break
    if not line:
      continue
    pair = line.split()
    if len(pair) != 2:
      raise ValueError(f"{path}: line {number + first} is not a merge: "
                       f"{line!r}")
    merges.append((pair[0], pair[1]))
  return merges


def bpe_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """OpenAI's vocabulary for `merges`: the 256 byte characters, the same
  with the word-end marker `</w>`, every merge's result in merge order, then
  `<|startoftext|>` and `<|endoftext|>` (49408 ids for the full file)."""
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + "</w>" for c in chars]
  tokens += [a + b for a, b in merges]
  tokens += [SOT_TOKEN, EOT_TOKEN]
  return {t: i for i, t in enumerate(tokens)}


def build_bpe_tokenizer(merges: Sequence[tuple[str, str]],
                        vocab: Mapping[str, int] | None = None
                        ) -> tokenizers.Tokenizer:
  """A `tokenizers` CLIP tokenizer from the merges (and vocabulary).

  NFC, whitespace runs -> one space, lowercase; split into CLIP's pieces
  (whitespace dropped); bytes -> characters; BPE with the word-end suffix
  `</w>`; then `<|startoftext|> ... <|endoftext|>`. `vocab` defaults to
  OpenAI's derivation from the merges (`bpe_vocab`).
  """
  vocab = bpe_vocab(merges) if vocab is None else dict(vocab)
  missing = [t for t in (SOT_TOKEN, EOT_TOKEN) if t not in vocab]
  if missing:
    raise ValueError(f"the CLIP vocabulary lacks {missing}")
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=list(merges), unk_token=EOT_TOKEN,
      continuing_subword_prefix="", end_of_word_suffix="</w>",
      fuse_unk=False))
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(),
      normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
      normalizers.Lowercase(),
  ])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_PIECE_PATTERN),
                           behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
      special_tokens=[(SOT_TOKEN, vocab[SOT_TOKEN]),
                      (EOT_TOKEN, vocab[EOT_TOKEN])])
  return tok


def _pad_token(directory: pathlib.Path) -> str | None:
  """`pad_token` of a HF tokenizer_config.json beside the tokenizer."""
  file = directory / _TOKENIZER_CONFIG_FILE
  if not file.is_file():
    return None
  try:
    pad = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
  except ValueError as e:
    raise ValueError(f"{file}: not JSON: {e}") from e
  if isinstance(pad, dict):
    pad = pad.get("content")
  return pad if isinstance(pad, str) else None


def resolve_tokenizer_file(path: PathLike) -> pathlib.Path:
  """A tokenizer file, or the first of tokenizer.json, merges.txt and
  bpe_simple_vocab_16e6.txt.gz in a directory."""
  path = pathlib.Path(path)
  if path.is_dir():
    for name in (_TOKENIZER_FILE, _MERGES_FILE, OPENAI_BPE_FILE):
      if (path / name).is_file():
        return path / name
    raise FileNotFoundError(
        f"no CLIP tokenizer in {path}: looked for {_TOKENIZER_FILE}, "
        f"{_MERGES_FILE} and {OPENAI_BPE_FILE}")
  if not path.is_file():
    raise FileNotFoundError(f"CLIP tokenizer file not found: {path}")
  return path


class CLIPTokenizer:
  """CLIP's BPE tokenizer, ids as transformers' `CLIPTokenizer` gives.

  No truncation or padding here (the encoder interface does both). The pad
  id is `<|endoftext|>`'s (CLIPTokenizer's default pad token) unless a
  `tokenizer_config.json` beside the tokenizer names another (e.g. "!",
  id 0, in Stable Diffusion 2's).
  """

  def __init__(self, path: PathLike, *, num_merges: int | None = None):
    """Loads a tokenizer.

    Args:
      path: a HF `tokenizer.json`; a HF `merges.txt` (with the vocab.json
        beside it, if any); OpenAI's `bpe_simple_vocab_16e6.txt.gz` (the
        vocabulary is derived from the merges); or a directory holding one
        of them.
      num_merges: for a merges file, how many merges to use (default: at
        most OpenAI's 48894).
    """
    self.path = resolve_tokenizer_file(path)
    if self.path.suffix == ".json":
      try:
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))
      except Exception as e:  # tokenizers raises a bare Exception.
        raise ValueError(f"{self.path}: not a tokenizers JSON file: {e}"
                         ) from e
    else:
      # HF's merges.txt comes with its vocab.json; OpenAI's file alone.
      vocab_file = self.path.parent / _VOCAB_FILE
      vocab = None
      if self.path.name == _MERGES_FILE and vocab_file.is_file():
        try:
          vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except ValueError as e:
          raise ValueError(f"{vocab_file}: not JSON: {e}") from e
      try:
        self._tok = build_bpe_tokenizer(
            read_bpe_merges(self.path, num_merges), vocab)
      except ValueError as e:
        raise ValueError(f"{self.path}: {e}") from e
      except Exception as e:  # tokenizers raises a bare Exception.
        raise ValueError(f"{self.path}: not a CLIP BPE merges file "
                         f"(with {vocab_file.name if vocab else 'the derived'}"
                         f" vocabulary): {e}") from e
    self._tok.no_truncation()
    self._tok.no_padding()
    ids = {t: self._tok.token_to_id(t) for t in (SOT_TOKEN, EOT_TOKEN)}
    absent = [t for t, i in ids.items() if i is None]
    if absent:
      raise ValueError(f"{self.path}: no {absent} token in the vocabulary")
    self.sot_id, self.eot_id = ids[SOT_TOKEN], ids[EOT_TOKEN]
    pad = _pad_token(self.path.parent)
    self.pad_id = self.eot_id if pad is None else self._tok.token_to_id(pad)
    if self.pad_id is None:
      raise ValueError(f"{self.path.parent / _TOKENIZER_CONFIG_FILE}: pad "
                       f"token {pad!r} is not in the vocabulary")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def tokens(self, text: str) -> list[str]:
    """The BPE tokens of one text, for inspection."""
    return self._tok.encode(text).tokens

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts))]
