"""T5's sentencepiece tokenizer (EOS appended), through seqio if installed.

Split out of `t5` (the config, model and encoder) so each reads in one
sitting; `t5` re-exports the public names here.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import pathlib

PathLike = str | os.PathLike[str]

_TOKENIZER_FILE = "spiece.model"


def resolve_tokenizer_file(path: PathLike) -> pathlib.Path:
  """`spiece.model` (the file, or a directory holding it).

  Raises:
    FileNotFoundError: naming the file looked for.
  """
  path = pathlib.Path(path)
  file = path / _TOKENIZER_FILE if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(
        f"T5 sentencepiece model not found: {file}. Pass tokenizer_path= "
        f"(the {_TOKENIZER_FILE} of the checkpoint's Hugging Face repo, or "
        "the sentencepiece model of its seqio vocabulary)")
  return file


class T5Tokenizer:
  """T5's sentencepiece tokenisation: the pieces' ids, then EOS.

  This is what seqio's `SentencePieceVocabulary` feeds T5 (and what
  transformers' `T5Tokenizer` gives for text without special-token
  strings; sentinels like `<extra_id_0>` are not recognised). seqio's
  vocabulary is used when `use_seqio` is true or None and seqio is
  importable, sentencepiece directly otherwise. No truncation or padding
  (the encoder interface does both).
  """

  def __init__(self, path: PathLike, *, use_seqio: bool | None = None):
    """Loads `spiece.model` (the file or its directory)."""
    self.path = resolve_tokenizer_file(path)
    import sentencepiece  # pylint: disable=g-import-not-at-top
    try:
      self._sp = sentencepiece.SentencePieceProcessor(
          model_file=str(self.path))
    except (OSError, RuntimeError) as e:
      raise ValueError(
          f"{self.path}: not a sentencepiece model: {e}") from e
    self._seqio_vocab = None
    if use_seqio is not False:
      try:
        import seqio  # pylint: disable=g-import-not-at-top
      except ImportError:
        if use_seqio:
          raise
      else:
        self._seqio_vocab = seqio.SentencePieceVocabulary(str(self.path))
    self.eos_id = int(self._sp.eos_id())
    self.pad_id = int(self._sp.pad_id())
    self.unk_id = int(self._sp.unk_id())
    if self.eos_id < 0 or self.pad_id < 0:
      raise ValueError(f"{self.path}: T5 needs pad and EOS ids (pad "
                       f"{self.pad_id}, EOS {self.eos_id})")

  @property
  def backend(self) -> str:
    return "seqio" if self._seqio_vocab is not None else "sentencepiece"

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  def tokens(self, text: str) -> list[str]:
    """The sentencepiece pieces of one text, for inspection."""
    return list(self._sp.encode(text, out_type=str))

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    if self._seqio_vocab is not None:
      pieces = [list(self._seqio_vocab.encode(t)) for t in texts]
    else:
      pieces = self._sp.encode(list(texts))
    return [[int(i) for i in ids] + [self.eos_id] for ids in pieces]
