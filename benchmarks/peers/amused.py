"""diffusers' aMUSEd (UVit2DModel + AmusedScheduler) at a matched config.

Sampling runs diffusers' own `AmusedPipeline.__call__` with precomputed
(random) text embeddings and `output_type="latent"`: the loop as the
pipeline runs it (per step one UVit2DModel forward on the guidance-doubled
batch, guidance, `AmusedScheduler.step`), no text encoder and no VQ decode
(we skip the decode too). Training is the step of diffusers'
examples/amused/train_amused.py: cosine-rate masking, cross-entropy on the
masked tokens, backward, global-norm clipping, AdamW.

Matched configuration (randomly initialised):
- hidden_size = width, num_hidden_layers = depth, num_attention_heads =
  heads; encoder_hidden_size = cond_embed_dim = text_dim (the pooled text
  vector has the text width); vocab_size = codebook_size + 1 (mask id last).
- num_res_blocks = 0 and in/block_out_channels = width: no UViT conv
  down/up blocks, so the network is embedding -> transformer layers -> MLM
  head, like ours.
- intermediate_size = 2/3 * mlp_dim: aMUSEd's feed-forward is GEGLU
  (d -> 2i -> gate -> d, 3 d i weights), which then has the FLOPs and
  parameters of our GELU MLP (2 d m). lucidrains uses the same 2/3 rule.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import configs
from benchmarks import timing
from benchmarks.peers import measure

IMPL = "diffusers-amused"


def _imports():
  import diffusers  # pylint: disable=g-import-not-at-top
  diffusers.utils.logging.set_verbosity_error()
  return diffusers


def make_model(cfg: configs.BenchConfig):
  diffusers = _imports()
  return diffusers.UVit2DModel(
      hidden_size=cfg.width, use_bias=False, hidden_dropout=0.0,
      cond_embed_dim=cfg.text_dim, encoder_hidden_size=cfg.text_dim,
      vocab_size=cfg.codebook_size + 1, codebook_size=cfg.codebook_size,
      in_channels=cfg.width, block_out_channels=cfg.width,
      num_res_blocks=0, num_hidden_layers=cfg.depth,
      num_attention_heads=cfg.num_heads,
      intermediate_size=int(cfg.mlp_dim * 2 / 3),
      sample_size=cfg.grid_size)


def _text(cfg: configs.BenchConfig, batch: int):
  g = torch.Generator().manual_seed(0)
  return (torch.randn(batch, cfg.text_dim, generator=g),
          torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g))


def bench_sample(cfg: configs.BenchConfig, *, peak: float, repeats: int = 3,
                 forward_repeats: int = 3) -> dict[str, Any]:
  diffusers = _imports()
  model = make_model(cfg).eval()
  scheduler = diffusers.AmusedScheduler(mask_token_id=cfg.codebook_size)
  pipe = diffusers.AmusedPipeline(vqvae=None, tokenizer=None,
                                  text_encoder=None, transformer=model,
                                  scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  pooled, hidden = _text(cfg, cfg.batch)
  neg_pooled, neg_hidden = _text(cfg, cfg.batch)
  size = cfg.grid_size * pipe.vae_scale_factor
  generator = torch.Generator().manual_seed(0)

  def run():
    return pipe(prompt_embeds=pooled, encoder_hidden_states=hidden,
                negative_prompt_embeds=neg_pooled,
                negative_encoder_hidden_states=neg_hidden,
                height=size, width=size,
                num_inference_steps=cfg.sample_steps,
                guidance_scale=cfg.guidance_scale, generator=generator,
                output_type="latent").images

  timing.log(f"[{IMPL}] sample {cfg.name}: counted warm-up + {repeats}")
  flops, t = measure.counted_then_timed(run, repeats)

  # The bare forwards: one UVit2DModel call on the doubled batch per step.
  ids = torch.full((2 * cfg.batch, cfg.grid_size, cfg.grid_size),
                   cfg.codebook_size, dtype=torch.long)
  micro = torch.tensor([size, size, 0, 0, 6.0]).expand(2 * cfg.batch, -1)
  both_pooled = torch.cat([neg_pooled, pooled])
  both_hidden = torch.cat([neg_hidden, hidden])

  @torch.no_grad()
  def forward():
    return model(ids, micro_conds=micro, pooled_text_emb=both_pooled,
                 encoder_hidden_states=both_hidden)

  ft = timing.measure(forward, repeats=forward_repeats)
  return measure.sample_record(
      IMPL, cfg, flops, t, peak=peak, forward_batch=2 * cfg.batch,
      forward_s=ft.median_s, diffusers_version=diffusers.__version__,
      params=sum(p.numel() for p in model.parameters()),
      note="AmusedPipeline.__call__(output_type='latent') with random "
           "text embeddings: no text encoder, no VQ decode; eager torch; "
           "flops counted by FlopCounterMode (matmul-class ops)")


def bench_train(cfg: configs.BenchConfig, *, peak: float,
                repeats: int = 5) -> dict[str, Any]:
  diffusers = _imports()
  model = make_model(cfg).train()
  opt = measure.adamw(model.parameters())
  pooled, hidden = _text(cfg, cfg.batch)
  size = cfg.grid_size * 8
  micro = torch.tensor([size, size, 0, 0, 6.0]).expand(cfg.batch, -1)
  g = torch.Generator().manual_seed(0)
  tokens = torch.randint(0, cfg.codebook_size,
                         (cfg.batch, cfg.grid_size, cfg.grid_size),
                         generator=g)
  seq, mask_id = cfg.seq_len, cfg.codebook_size
  losses = []

  def step():
    # As examples/amused/train_amused.py: cosine masking rate per example.
    t = torch.rand(cfg.batch)
    mask_prob = torch.cos(t * torch.pi / 2).clip(1e-6)
    num_masked = (seq * mask_prob).round().clamp(min=1)
    masked = (torch.rand(cfg.batch, seq).argsort(-1)
              < num_masked[:, None]).reshape(tokens.shape)
    inputs = torch.where(masked, mask_id, tokens)
    labels = torch.where(masked, tokens, -100)
    logits = model(inputs, micro_conds=micro, pooled_text_emb=pooled,
                   encoder_hidden_states=hidden)
    logits = logits.reshape(cfg.batch, cfg.codebook_size, -1).permute(
        0, 2, 1).reshape(-1, cfg.codebook_size)
    loss = F.cross_entropy(logits, labels.view(-1), ignore_index=-100)
    losses.append(measure.optimizer_step(loss, model.parameters(), opt))

  timing.log(f"[{IMPL}] train {cfg.name}: counted warm-up + {repeats}")
  flops, t = measure.counted_then_timed(step, repeats)
  return measure.train_record(
      IMPL, cfg, flops, t, peak=peak, final_loss=losses[-1],
      diffusers_version=diffusers.__version__,
      params=sum(p.numel() for p in model.parameters()),
      note="train_amused.py step: masking, CE on masked tokens, backward, "
           "clip_grad_norm_(1.0), torch.optim.AdamW (default "
           "implementation); eager torch")
