"""Regenerates tests/golden/maskgit_vq_small.npz with MaskGIT's own VQGAN code.

The golden file pins `muse_jax.interop.maskgit_vq` (and our `VQModel` in
MaskGIT's layout) to the reference: google-research/maskgit's linen `VQVAE`
(`maskgit/nets/vqgan_tokenizer.py`), run here from a checkout or a git
mirror of that repository:

  python scripts/make_maskgit_vq_golden.py /path/to/maskgit [--out PATH]

with the project's venv, where /path/to/maskgit is a checkout (the files are
read from its work tree) or a git directory (read with ``git show
HEAD:...``). Only the three files the tokenizer needs are copied to a
temporary directory and imported (`nets/vqgan_tokenizer.py`,
`nets/layers.py`, `libml/losses.py`); they run unchanged on the venv's jax,
flax.linen and ml_collections. The output is deterministic for a given
``--seed``.

The network is a small one of the released structure (filters 32,
channel_multipliers [1, 2, 2], num_res_blocks 2, embedding_dim 16,
codebook_size 64, GroupNorm, swish, average-pool downsampling, "vq"). Its
parameters start from MaskGIT's own initialisation, then:

* GroupNorm scales / biases and convolution biases (initialised to 1 / 0)
  are randomised, so that swapping two of them changes the outputs;
* the codebook is drawn from the encoder's outputs on the images (plus
  noise), so that the lookup picks many different codes, and it is redrawn
  until every nearest code wins by a clear margin (no near-ties that float
  rounding could flip);
* the encoder's and the decoder's output convolutions are scaled by powers
  of two so that latents and reconstructions lie in [-1, 1], as a trained
  tokenizer's do (float32 rounding, and so the parity tolerance, scales with
  them);
* every tensor is rounded to 5-bit integers times a power-of-two scale,
  exact in float32, which keeps the file under 1 MB: the file stores the
  integers and the scale, the test multiplies them back.

It stores

  param/<linen path>   int8    the parameter tree, flattened ('/'-joined
                               linen paths below "params", e.g.
                               encoder/ResBlock_3/Conv_0/kernel)
  scale/<linen path>   float32 its power-of-two scale (value = param * scale)
  images_a, images_b   uint8   [8, 32, 32, 3] and [2, 48, 32, 3] images; the
                               networks read them as float32 uint8 / 255, the
                               [0, 1] range of MaskGIT's demo
  latents_a            float32 the encoder's output on images_a
  indices_a, indices_b int32   VQVAE.encode_to_indices
  decoded_a, decoded_b float32 VQVAE.decode_from_indices of those indices
  min_margin           float32 smallest gap, over all positions, between
                               the nearest and second-nearest code distance
                               (relative to |z|^2 + max |c|^2)
  config               str     the vqvae config as JSON
  versions             str     maskgit commit, jax and flax versions
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ('maskgit/nets/vqgan_tokenizer.py', 'maskgit/nets/layers.py',
         'maskgit/libml/losses.py')
VQVAE = dict(filters=32, channel_multipliers=[1, 2, 2], num_res_blocks=2,
             embedding_dim=16, codebook_size=64, conv_downsample=False,
             norm_type='GN', activation_fn='swish', quantizer='vq',
             commitment_cost=0.25, entropy_loss_ratio=0.0,
             entropy_temperature=0.01, entropy_loss_type='softmax')
LEVELS = 15  # Parameters are integers in [-LEVELS, LEVELS] times 2^k.
MIN_MARGIN = 1e-4  # See `margins`; float32 rounding is ~1e-7 there.


def export_maskgit(source: str, dest: str) -> str:
  """Copies the tokenizer's files into `dest`; returns the commit (or '')."""
  commit = ''
  try:
    commit = subprocess.run(['git', '-C', source, 'rev-parse', 'HEAD'],
                            check=True, capture_output=True,
                            text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  for name in FILES:
    worktree = os.path.join(source, name)
    if os.path.isfile(worktree):
      with open(worktree, 'rb') as f:
        text = f.read()
    else:
      try:
        text = subprocess.run(['git', '-C', source, 'show', f'HEAD:{name}'],
                              check=True, capture_output=True).stdout
      except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f'{source}: cannot read {name} (neither a checkout '
                         f'nor a git directory of maskgit): {e}') from None
    path = os.path.join(dest, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(text)
  return commit


def make_images(rng: np.random.Generator, n: int, h: int, w: int
                ) -> np.ndarray:
  """Varied uint8 images: smooth noise, gradients, checkers, discs, stripes,
  white noise and flat colours."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  out = []
  for i in range(n):
    kind = i % 7
    if kind == 0:  # Smooth noise: a coarse grid upsampled bilinearly.
      coarse = rng.uniform(0, 1, (h // 8 + 2, w // 8 + 2, 3))
      gy, gx = yy / 8, xx / 8
      y0, x0 = gy.astype(int), gx.astype(int)
      fy, fx = (gy - y0)[..., None], (gx - x0)[..., None]
      img = (coarse[y0, x0] * (1 - fy) * (1 - fx) +
             coarse[y0 + 1, x0] * fy * (1 - fx) +
             coarse[y0, x0 + 1] * (1 - fy) * fx +
             coarse[y0 + 1, x0 + 1] * fy * fx)
    elif kind == 1:  # Linear gradient in a random direction and colour.
      a = rng.uniform(0, 2 * np.pi)
      t = (np.cos(a) * xx / w + np.sin(a) * yy / h)[..., None]
      img = (t - t.min()) / (np.ptp(t) + 1e-6) * rng.uniform(0, 1, 3)
    elif kind == 2:  # Checkerboard.
      s = int(rng.integers(2, 6))
      c = ((yy // s + xx // s) % 2)[..., None]
      img = c * rng.uniform(0, 1, 3) + (1 - c) * rng.uniform(0, 1, 3)
    elif kind == 3:  # Discs on a background.
      img = np.broadcast_to(rng.uniform(0, 1, 3), (h, w, 3)).copy()
      for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
    elif kind == 4:  # Stripes.
      period = rng.uniform(3, 9)
      img = (0.5 + 0.5 * np.sin(2 * np.pi * (xx + 0.5 * yy) / period))[
          ..., None] * rng.uniform(0.3, 1, 3)
    elif kind == 5:  # White noise.
      img = rng.uniform(0, 1, (h, w, 3))
    else:  # Flat colour with a bright square.
      img = np.broadcast_to(rng.uniform(0, 1, 3), (h, w, 3)).copy()
      img[h // 4:h // 2, w // 4:w // 2] = 1.0
    out.append(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
  return np.stack(out)


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
  """x ~ q * scale with |q| <= LEVELS and a power-of-two scale."""
  peak = float(np.max(np.abs(x)))
  scale = 1.0 if peak == 0 else 2.0 ** np.ceil(np.log2(peak / LEVELS))
  q = np.clip(np.round(x / scale), -LEVELS, LEVELS).astype(np.int8)
  return q, np.float32(scale)


def flatten(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, 'items'):
      out.update(flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = np.asarray(v)
  return out


def unflatten(flat):
  tree = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def margins(latents: np.ndarray, codebook: np.ndarray) -> float:
  """Smallest gap between the two nearest code distances, relative to the
  squared norms they are computed from."""
  z = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
  c = codebook.astype(np.float64)
  d = np.sum((z[:, None, :] - c[None]) ** 2, -1)
  d.sort(axis=1)
  # Relative to the terms of |z|^2 - 2 z.c + |c|^2, whose float32 rounding
  # is what could reorder two codes.
  size = np.sum(z * z, -1) + np.max(np.sum(c * c, -1))
  return float(np.min((d[:, 1] - d[:, 0]) / size))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('maskgit', help='maskgit checkout or git directory')
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'tests', 'golden', 'maskgit_vq_small.npz'))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory(prefix='maskgit_src_') as tmp:
    commit = export_maskgit(args.maskgit, tmp)
    sys.path.insert(0, tmp)
    try:
      run(args, commit)
    finally:
      sys.path.remove(tmp)


def run(args: argparse.Namespace, commit: str) -> None:
  """Builds the reference network and writes the golden file."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from maskgit.nets import vqgan_tokenizer

  config = ml_collections.ConfigDict({'vqvae': VQVAE})
  model = vqgan_tokenizer.VQVAE(config=config, train=False, dtype=jnp.float32)
  rng = np.random.default_rng(args.seed)
  images_a = make_images(rng, 8, 32, 32)
  images_b = make_images(rng, 2, 48, 32)
  x_a = jnp.asarray(images_a, jnp.float32) / 255.0
  x_b = jnp.asarray(images_b, jnp.float32) / 255.0

  def everything(m, x):  # VQVAE.__call__ passes a tuple to the decoder.
    return m.decode_from_indices(m.encode_to_indices(x))

  variables = model.init(jax.random.key(args.seed), x_a, method=everything)
  flat = flatten(variables['params'])
  for path, v in flat.items():
    name = path.rsplit('/', 1)[-1]
    if '/GroupNorm_' in path and name == 'scale':
      flat[path] = 1.0 + 0.3 * rng.standard_normal(v.shape)
    elif name == 'bias':
      flat[path] = 0.3 * rng.standard_normal(v.shape)
  packed = {p: quantize(v) for p, v in flat.items()}

  def params_of(packed):
    return {'params': unflatten(
        {p: jnp.asarray(q.astype(np.float32) * s)
         for p, (q, s) in packed.items()})}

  def encoder_out(m, x):
    return m.encoder(x)

  def shrink(conv, peak):
    # Divides a convolution's output by a power of two >= peak (exact).
    div = np.float32(2.0 ** np.ceil(np.log2(peak)))
    for leaf in ('kernel', 'bias'):
      q, s = packed[f'{conv}/{leaf}']
      packed[f'{conv}/{leaf}'] = (q, s / div)

  def latents(x):
    return np.asarray(model.apply(params_of(packed), x, method=encoder_out))

  shrink('encoder/Conv_1', max(np.abs(latents(x_a)).max(),
                               np.abs(latents(x_b)).max()))
  latents_a, latents_b = latents(x_a), latents(x_b)
  pool = np.concatenate([latents_a.reshape(-1, latents_a.shape[-1]),
                         latents_b.reshape(-1, latents_b.shape[-1])])
  k = VQVAE['codebook_size']
  for attempt in range(100):
    picks = rng.choice(len(pool), k, replace=False)
    codebook = pool[picks] + 0.1 * pool.std() * rng.standard_normal(
        (k, pool.shape[-1]))
    packed['quantizer/codebook'] = quantize(codebook)
    q, s = packed['quantizer/codebook']
    real = q.astype(np.float32) * s
    margin = min(margins(latents_a, real), margins(latents_b, real))
    if margin > MIN_MARGIN:
      break
  else:
    raise SystemExit(f'no codebook with margin > {MIN_MARGIN} in 100 draws')
  print(f'codebook draw {attempt}: min relative margin {margin:.2e}')

  variables = params_of(packed)
  indices_a = np.asarray(model.apply(variables, x_a,
                                     method=model.encode_to_indices))
  indices_b = np.asarray(model.apply(variables, x_b,
                                     method=model.encode_to_indices))

  def decoded(ids):
    return np.asarray(model.apply(params_of(packed), ids,
                                  method=model.decode_from_indices))

  out_conv = f'decoder/Conv_{len(VQVAE["channel_multipliers"])}'
  shrink(out_conv, max(np.abs(decoded(indices_a)).max(),
                       np.abs(decoded(indices_b)).max()))
  decoded_a, decoded_b = decoded(indices_a), decoded(indices_b)
  print(f'indices: {len(np.unique(indices_a))} distinct codes in batch a, '
        f'{len(np.unique(indices_b))} in batch b; decoded range '
        f'[{decoded_a.min():.2f}, {decoded_a.max():.2f}]')

  arrays = dict(
      images_a=images_a, images_b=images_b,
      latents_a=latents_a.astype(np.float32),
      indices_a=indices_a.astype(np.int32),
      indices_b=indices_b.astype(np.int32),
      decoded_a=decoded_a.astype(np.float32),
      decoded_b=decoded_b.astype(np.float32),
      min_margin=np.float32(margin),
      config=np.array(json.dumps(VQVAE, sort_keys=True)),
      versions=np.array(json.dumps(dict(maskgit=commit,
                                        jax=jax.__version__,
                                        flax=flax.__version__))))
  for path, (q, s) in packed.items():
    arrays[f'param/{path}'] = q
    arrays[f'scale/{path}'] = s
  np.savez_compressed(args.out, **arrays)
  size = os.path.getsize(args.out)
  print(f'wrote {args.out}: {len(packed)} tensors, '
        f'{sum(q.size for q, _ in packed.values())} parameters, '
        f'{size / 1e6:.2f} MB')


if __name__ == '__main__':
  main()
