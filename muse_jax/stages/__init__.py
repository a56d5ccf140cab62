"""The stages of a Muse experiment and the graph that runs them.

  data -> tokenizer -> tokenize -> transformer -> evaluate

and Muse's cascade (`config.pipeline="cascade"`):

  data -> tokenizer -> tokenize -> transformer  \
       -> sr_tokenizer -> sr_tokenize ---------> superres -> evaluate, edits

`build(config, workdir)` is the graph the main job runs; `graph.py` holds
the machinery (fingerprints, markers, the shared stage store).
"""

from __future__ import annotations

from etils import epath
import ml_collections

from muse_jax.stages import data
from muse_jax.stages import edits
from muse_jax.stages import env as env_lib
from muse_jax.stages import evaluate
from muse_jax.stages import graph
from muse_jax.stages import superres
from muse_jax.stages import tokenize
from muse_jax.stages import tokenizer
from muse_jax.stages import tokenizer_decoder
from muse_jax.stages import tokenizer_eval
from muse_jax.stages import transformer

STAGES: tuple[type[graph.Stage], ...] = (
    data.Data, tokenizer.Tokenizer, tokenize.Tokenize,
    transformer.Transformer, evaluate.Evaluate)
NAMES = tuple(s.name for s in STAGES)
PIPELINES: dict[str, tuple[type[graph.Stage], ...]] = {
    "muse": STAGES,
    "cascade": (data.Data, tokenizer.Tokenizer, tokenizer.SrTokenizer,
                tokenize.Tokenize, tokenize.SrTokenize,
                transformer.Transformer,
                superres.SuperRes, evaluate.CascadeEvaluate, edits.Edits),
    "tokenizer": (data.Data, tokenizer.Tokenizer,
                  tokenizer_decoder.TokenizerDecoder,
                  tokenizer_eval.TokenizerEval),
}


def pipeline(config: ml_collections.ConfigDict
             ) -> tuple[type[graph.Stage], ...]:
  """The stages `config.pipeline` names (default "muse")."""
  name = config.get("pipeline", "muse")
  if name not in PIPELINES:
    raise graph.StageError(f"config.pipeline={name!r} not in "
                           f"{sorted(PIPELINES)}")
  return PIPELINES[name]


def build(config: ml_collections.ConfigDict, workdir: epath.PathLike, *,
          store: epath.PathLike | None = None,
          env: env_lib.Env | None = None) -> graph.Graph:
  """The stage graph of `config` over `workdir` (and a shared `store`).

  Every stage's config is checked first; the env (mesh, text encoder) is
  built after that unless given.
  """
  g = graph.Graph([s() for s in pipeline(config)], config, workdir,
                  store=store)
  g.env = env if env is not None else env_lib.Env(config)
  return g
