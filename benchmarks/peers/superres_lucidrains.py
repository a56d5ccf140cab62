"""lucidrains' super-resolution MaskGit sampling at a matched size; JSON lines.

Run in the peers' virtual environment from the repository root
(benchmarks/superres.py does this as a subprocess):

  .venv-peers/bin/python -m benchmarks.peers.superres_lucidrains \
      --config_json='{"name": "SR", "width": 512, ...}' --lowres_grid=16 \
      [--repeats=2] [--forward_repeats=1] [--flash=1] [--threads=N]

`--config_json` is a `benchmarks.configs.BenchConfig` as a dict (the
high-res grid, model size, batch, steps, guidance scale: the same object
our side runs). muse-maskgit-pytorch's `MaskGit` is its own super-res
model when given `cond_vae` + `cond_image_size`: `generate(cond_images=...)`
tokenizes the low-res image with the cond VAE once, and every forward
embeds those ids with the transformer's own token embedding (no position
embedding, no separate encoder) and appends them to the projected text as
the cross-attention context; `cond_drop_prob=1` (the unconditional half of
`forward_with_cond_scale`) drops the text only, the low-res tokens stay
(as ours). Here the cond VAE's `encode` is stubbed to return the given
low-res token ids (we feed ids on our side too), `encode_text` returns
precomputed random text embeddings (no T5) and `decode_from_ids` returns
the ids (no VQ decode). Both VQGANs are tiny placeholders that only have to
exist with the right codebook size.

Matched as `benchmarks/peers/lucidrains.py`: dim = width, depth, heads,
dim_head = width / heads, ff_mult = mlp_dim / width (its GEGLU uses 2/3 of
it: our MLP's FLOPs), num_tokens = codebook_size (low-res and high-res
share it: MaskGit asserts one codebook size), seq_len = grid_size^2;
`timesteps` = steps, `cond_scale` = guidance scale, its default top-k
filtering (0.9) and `flash=True` (on the CPU its chunked pure-PyTorch
attention). A warm-up request of --warmup_steps steps (the same forwards
at the same shapes; counted by FlopCounterMode, its count scaled to the
full request) is excluded; then --repeats full requests (median). torch's
2048^3 float32 matmul rate is measured after them (`torch_peak_flops_per_s`).
"""

from __future__ import annotations

import argparse
import json
import os

# Before anything imports tqdm: generate() wraps its loop in it.
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks import configs  # pylint: disable=g-import-not-at-top
from benchmarks import timing  # pylint: disable=g-import-not-at-top

IMPL = "lucidrains-muse-maskgit-superres"
WHAT = "sample_superres"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config_json", required=True,
                 help="a benchmarks.configs.BenchConfig as a JSON dict")
  p.add_argument("--lowres_grid", type=int, default=16,
                 help="low-res tokens per side")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--warmup_steps", type=int, default=1,
                 help="decoding steps of the warm-up request (same shapes; "
                 "0: a full request)")
  p.add_argument("--forward_repeats", type=int, default=1)
  p.add_argument("--flash", type=int, default=1,
                 help="lucidrains' flash=True (its default) or 0")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def make_superres_maskgit(cfg: configs.BenchConfig, lowres_grid: int,
                          flash: bool = True):
  """(MaskGit with a cond VAE, its MaskGitTransformer), random weights."""
  from benchmarks.peers import lucidrains  # pylint: disable=g-import-not-at-top

  mm, transformer = lucidrains.make_transformer(cfg, flash)
  vae, cond_vae = (
      mm.VQGanVAE(dim=16, layers=1, codebook_size=cfg.codebook_size,
                  use_vgg_and_gan=False) for _ in range(2))
  # layers=1: images are 2x the token grid (only used for fmap sizes).
  maskgit = mm.MaskGit(image_size=cfg.grid_size * 2, transformer=transformer,
                       vae=vae, cond_vae=cond_vae,
                       cond_image_size=lowres_grid * 2)
  maskgit.vae.decode_from_ids = lambda ids: ids
  # generate() runs `_, cond_ids, _ = cond_vae.encode(cond_images)`: the
  # "images" we pass are the low-res token ids.
  maskgit.cond_vae.encode = lambda ids: (None, ids, None)
  return maskgit, transformer


def run(args: argparse.Namespace) -> None:
  import time  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  from benchmarks.peers import measure  # pylint: disable=g-import-not-at-top

  cfg = configs.BenchConfig(**json.loads(args.config_json))
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  maskgit, transformer = make_superres_maskgit(cfg, args.lowres_grid,
                                               bool(args.flash))
  maskgit.eval()
  g = torch.Generator().manual_seed(args.seed)
  text = torch.randn(cfg.batch, cfg.text_len, cfg.text_dim, generator=g)
  low = torch.randint(0, cfg.codebook_size,
                      (cfg.batch, args.lowres_grid**2), generator=g)
  transformer.encode_text = lambda texts: text
  prompts = ["a prompt"] * cfg.batch

  def sample(steps):
    out = maskgit.generate(texts=prompts, cond_images=low,
                           fmap_size=cfg.grid_size, timesteps=steps,
                           cond_scale=cfg.guidance_scale)
    assert tuple(out.shape) == (cfg.batch, cfg.grid_size, cfg.grid_size)
    return out

  # The warm-up request runs the same forwards at the same shapes (every
  # step of generate() is the same pair of full forwards), only fewer of
  # them; its FLOPs, counted by FlopCounterMode, scale with the steps.
  warm = args.warmup_steps or cfg.sample_steps
  timing.log(f"[{IMPL}] {cfg.name}: counted {warm}-step warm-up + "
             f"{args.repeats} x {cfg.sample_steps} steps")
  with flop_counter.FlopCounterMode(
      display=False,
      custom_mapping=measure._CPU_SDPA) as counter:  # pylint: disable=protected-access
    t0 = time.perf_counter()
    sample(warm)
    first = time.perf_counter() - t0
  flops = float(counter.get_total_flops()) * cfg.sample_steps / warm
  rest = timing.measure(lambda: sample(cfg.sample_steps),
                        repeats=args.repeats, warmup=0)
  t = timing.Timing(first, rest.times_s)

  # The bare forwards of one step: forward_with_cond_scale makes two (text
  # and dropped text, the low-res ids in both), each over the batch.
  ids = torch.full((cfg.batch, cfg.seq_len), transformer.mask_id,
                   dtype=torch.long)

  @torch.no_grad()
  def forwards():
    for drop in (0.0, 1.0):
      transformer(ids, text_embeds=text, cond_drop_prob=drop,
                  conditioning_token_ids=low)

  timing.log(f"[{IMPL}] {cfg.name}: bare forwards x {args.forward_repeats}")
  ft = timing.measure(forwards, repeats=args.forward_repeats)
  params = sum(p.numel() for p in transformer.parameters())
  peak = measure.peak_matmul_flops(2048, repeats=5)
  timing.emit(dict(
      impl=IMPL, what=WHAT, config=cfg.name, batch=cfg.batch,
      steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
      grid_size=cfg.grid_size, lowres_grid=args.lowres_grid,
      lowres_encoder="none (low-res ids embedded by the transformer's "
                     "token embedding, appended to the text context)",
      context_len=cfg.text_len + args.lowres_grid**2, **t.fields(),
      images_per_s=cfg.batch / t.median_s,
      tokens_per_s=cfg.batch * cfg.seq_len / t.median_s,
      flops_matmul=flops, flops_per_s=flops / t.median_s,
      forward_batch=cfg.batch, forward_median_s=ft.median_s,
      non_transformer_fraction=1.0 - cfg.sample_steps * ft.median_s
      / t.median_s,
      warmup_steps=warm,
      torch_peak_flops_per_s=peak["peak_flops_per_s"],
      params=params, flash=bool(args.flash), threads=args.threads,
      max_rss_bytes=timing.max_rss_bytes(), torch_version=torch.__version__,
      device=measure.device_name(), loadavg_1m=os.getloadavg()[0],
      config_detail=cfg.describe(),
      note="MaskGit.generate(cond_images=low-res ids) with a stubbed cond "
           "VAE encode, random text embeddings (no T5), no VQ decode; "
           "forward_median_s is the two forwards of one step; eager torch; "
           "flops_matmul counted by FlopCounterMode on the warm-up request "
           "and scaled by steps / warmup_steps"))


def main() -> None:
  run(parse_args())


if __name__ == "__main__":
  main()
