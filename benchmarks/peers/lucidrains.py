"""lucidrains' muse-maskgit-pytorch (MaskGitTransformer) at a matched config.

Sampling runs the library's own `MaskGit.generate` (its `timesteps` loop:
`forward_with_cond_scale` = a conditional and an unconditional forward per
step, top-k filtering, Gumbel sampling, re-masking by confidence) with
`cond_scale` guidance. It normally encodes texts with T5 and decodes with
its VQGAN; here `transformer.encode_text` returns precomputed random text
embeddings and the VQGAN's `decode_from_ids` returns the ids (no decode;
we skip it too). The VQGAN is a tiny placeholder that only has to exist.
Training is `MaskGit.forward` on token ids (its cosine masking, caption
dropout, cross-entropy), backward, global-norm clipping, AdamW.

Matched configuration (randomly initialised): dim = width, depth, heads,
dim_head = width / heads, ff_mult = mlp_dim / width (its GEGLU feed-forward
uses 2/3 of dim * ff_mult, matching our MLP's FLOPs), num_tokens =
codebook_size, seq_len = grid_size^2, text embeddings of width text_dim
(its `t5_name` is registered with that width, so no T5 is loaded).
`flash` is the library's default (True), which on the CPU runs its
chunked pure-PyTorch attention; `--lucid_flash=0` uses plain attention.
`generate` draws a tqdm progress bar; run_peers.py sets TQDM_DISABLE.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

from benchmarks import configs
from benchmarks import timing
from benchmarks.peers import measure
from benchmarks.peers import torchvision_stub

IMPL = "lucidrains-muse-maskgit"


def _imports():
  mm = torchvision_stub.import_muse_maskgit()
  return mm, sys.modules["muse_maskgit_pytorch.t5"]


def make_transformer(cfg: configs.BenchConfig, flash: bool = True):
  """(the package, a random MaskGitTransformer of `cfg`'s size; its text
  width registered as a T5 config name, so no T5 is loaded)."""
  mm, t5 = _imports()
  name = f"random-text-{cfg.text_dim}"
  t5.T5_CONFIGS[name] = dict(
      config=types.SimpleNamespace(d_model=cfg.text_dim))
  return mm, mm.MaskGitTransformer(
      num_tokens=cfg.codebook_size, seq_len=cfg.seq_len, dim=cfg.width,
      depth=cfg.depth, heads=cfg.num_heads, dim_head=cfg.head_dim,
      ff_mult=cfg.mlp_dim / cfg.width, t5_name=name, flash=flash)


def make_maskgit(cfg: configs.BenchConfig, flash: bool = True):
  """(MaskGit, its MaskGitTransformer), randomly initialised."""
  mm, transformer = make_transformer(cfg, flash)
  # MaskGit requires a VQGAN with the codebook size; only its existence
  # matters here (ids in, ids out).
  vae = mm.VQGanVAE(dim=16, layers=1, codebook_size=cfg.codebook_size,
                    use_vgg_and_gan=False)
  maskgit = mm.MaskGit(image_size=cfg.grid_size * 2, transformer=transformer,
                       vae=vae)
  maskgit.vae.decode_from_ids = lambda ids: ids
  return maskgit, transformer


def _text(cfg: configs.BenchConfig, batch: int) -> torch.Tensor:
  g = torch.Generator().manual_seed(0)
  return torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)


def _count_params(module) -> int:
  return sum(p.numel() for p in module.parameters())


def bench_sample(cfg: configs.BenchConfig, *, peak: float, repeats: int = 3,
                 forward_repeats: int = 3, flash: bool = True
                 ) -> dict[str, Any]:
  maskgit, transformer = make_maskgit(cfg, flash)
  maskgit.eval()
  text = _text(cfg, cfg.batch)
  transformer.encode_text = lambda texts: text
  prompts = ["a prompt"] * cfg.batch

  def run():
    return maskgit.generate(texts=prompts, fmap_size=cfg.grid_size,
                            timesteps=cfg.sample_steps,
                            cond_scale=cfg.guidance_scale)

  timing.log(f"[{IMPL}] sample {cfg.name}: counted warm-up + {repeats}")
  flops, t = measure.counted_then_timed(run, repeats)

  # The bare forwards: forward_with_cond_scale makes two per step (text and
  # dropped text), each over the batch.
  ids = torch.full((cfg.batch, cfg.seq_len), transformer.mask_id,
                   dtype=torch.long)

  @torch.no_grad()
  def forwards():
    transformer(ids, text_embeds=text, cond_drop_prob=0.0)
    transformer(ids, text_embeds=text, cond_drop_prob=1.0)

  ft = timing.measure(forwards, repeats=forward_repeats)
  return measure.sample_record(
      IMPL, cfg, flops, t, peak=peak, forward_batch=cfg.batch,
      forward_s=ft.median_s, flash=flash, params=_count_params(transformer),
      note="MaskGit.generate with random text embeddings (no T5) and no VQ "
           "decode; forward_median_s is the two forwards of one step; "
           "eager torch; flops counted by FlopCounterMode")


def bench_train(cfg: configs.BenchConfig, *, peak: float, repeats: int = 5,
                flash: bool = True) -> dict[str, Any]:
  maskgit, transformer = make_maskgit(cfg, flash)
  maskgit.train()
  opt = measure.adamw(transformer.parameters())
  text = _text(cfg, cfg.batch)
  g = torch.Generator().manual_seed(0)
  tokens = torch.randint(0, cfg.codebook_size, (cfg.batch, cfg.seq_len),
                         generator=g)
  losses = []

  def step():
    loss = maskgit(tokens, text_embeds=text)
    losses.append(measure.optimizer_step(loss, transformer.parameters(), opt))

  timing.log(f"[{IMPL}] train {cfg.name}: counted warm-up + {repeats}")
  flops, t = measure.counted_then_timed(step, repeats)
  return measure.train_record(
      IMPL, cfg, flops, t, peak=peak, final_loss=losses[-1], flash=flash,
      params=_count_params(transformer),
      note="MaskGit.forward on ids (masking, CE), backward, "
           "clip_grad_norm_(1.0), torch.optim.AdamW; eager torch")
