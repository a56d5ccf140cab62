"""MaskGIT's Flax VQGAN tokenizer checkpoints read into our `VQModel` layout.

MaskGIT (google-research/maskgit, `maskgit/nets/vqgan_tokenizer.py`) writes
its tokenizer with `flax.linen` modules whose parameters are named by linen's
automatic scheme (``Conv_0``, ``ResBlock_3``, ``GroupNorm_0``, ...), and
releases it as one file: `flax.serialization.to_bytes` of the variables dict
``{"params": {"encoder": ..., "decoder": ..., "quantizer": {"codebook"}}}``
(its `utils.restore_from_path` reads it back with
`flax.serialization.from_bytes(None, ...)`, i.e. plain msgpack).

`read(path)` loads such a file (or a `flax.training.checkpoints` directory)
and `convert(tree)` maps an in-memory tree; both return the `VQConfig` that
reproduces the network (``quantizer="euclidean"``, ``conv_bias=False``,
``downsample="avg_pool"``, ``shortcut="branch"``, ``encoder_out_kernel=1``)
and the parameters keyed by our parameter paths (``"encoder/conv_in/kernel"``,
``"quantizer/codebook"``, ...) as float32 numpy arrays.

Why the mapping is positional: linen numbers each module class separately
in creation order within its parent, so the n-th ``ResBlock`` of the encoder
is our n-th residual block only once the downsamplings (parameter-free average
pools in MaskGIT, entries of our ``blocks`` list) are skipped over, and the
decoder's ``Conv_1 .. Conv_{L-1}`` are the convolutions of its upsamplings.

The architecture comes from the tree's shapes unless MaskGIT's ``vqvae``
config is given (then it is taken from the config, and every tensor must fit
it):

* ``codebook_size``, ``embedding_dim``: the codebook's shape;
* ``filters`` (and the image channels): the encoder's first convolution;
* resolution levels: the decoder's convolutions (input, one per upsampling,
  output); ``num_res_blocks``: the encoder's ``ResBlock`` count over
  (levels + 1) (every level plus the bottleneck);
* ``channel_multipliers``: the width of each level's first encoder block.

Not visible in the weights, and assumed as in MaskGIT's released configs
unless a config says otherwise: ``activation_fn="swish"`` (ours; ``"relu"``
is rejected), GroupNorm with linen's default 32 groups and epsilon 1e-6 (the
same as our `GroupNorm`). ``quantizer="gumbel"`` is accepted: at inference
it is the same nearest-code lookup. Training hyperparameters (commitment,
entropy loss) are not imported.

Layouts `VQConfig` cannot express are refused with the reason:
``conv_downsample=True`` (4x4 stride-2 convolutions), BatchNorm / LayerNorm,
``channel_multipliers[0] != 1`` (MaskGIT's first convolution then outputs
``filters`` channels and its first block widens them; ours outputs
``base_channels * channel_mult[0]``) and ``num_res_blocks=0``.

Pixel range: MaskGIT's tokenizer reads and writes images in [0, 1] (its
demo feeds ``uint8 / 255``), while our pipeline uses [-1, 1]; the weights
imported here reproduce MaskGIT's network on the same input array.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

from flax import nnx
import jax
import numpy as np

from muse_jax.models import vqgan

# Shown in errors: at most this many lines per kind of problem.
_MAX_LISTED = 12
_INDEXED = re.compile(r'^([A-Za-z]+)_(\d+)$')


class MaskGITCheckpointError(ValueError):
  """A MaskGIT tokenizer checkpoint that does not map onto `VQModel`."""


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def read(path: str | os.PathLike, vqvae_config: Any = None
         ) -> tuple[vqgan.VQConfig, dict[str, np.ndarray]]:
  """Reads a MaskGIT tokenizer checkpoint and maps it onto our layout.

  Args:
    path: A file written by `flax.serialization.to_bytes` / msgpack (the
      released ``tokenizer_imagenet{256,512}_checkpoint``), or a directory of
      `flax.training.checkpoints` checkpoints (its latest step is read).
    vqvae_config: Optional MaskGIT config (the whole config or its ``vqvae``
      part, a ConfigDict or a dict); see `convert`.

  Returns:
    (config, params) as `convert`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    from flax.training import checkpoints  # pylint: disable=g-import-not-at-top
    root = checkpoints.restore_checkpoint(path, target=None)
    if root is None:
      raise MaskGITCheckpointError(
          f'{path}: no flax checkpoint (checkpoint_<step>) in this directory')
  elif os.path.isfile(path):
    from flax import serialization  # pylint: disable=g-import-not-at-top
    with open(path, 'rb') as f:
      data = f.read()
    try:
      root = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types.
      raise MaskGITCheckpointError(
          f'{path}: not a flax msgpack checkpoint ({type(e).__name__}: {e})'
      ) from None
  else:
    raise MaskGITCheckpointError(f'{path}: no such file or directory')
  try:
    return convert(root, vqvae_config)
  except MaskGITCheckpointError as e:
    raise MaskGITCheckpointError(f'{path}: {e}') from None


def convert(params_tree: Mapping[str, Any], vqvae_config: Any = None
            ) -> tuple[vqgan.VQConfig, dict[str, np.ndarray]]:
  """Maps MaskGIT's VQVAE parameter tree onto our `VQModel`.

  Args:
    params_tree: The nested dict of ``VQVAE.init(...)``: either the variables
      (``{"params": {...}}``; other collections beside it, e.g. a train
      state's ``step``, are ignored) or the params themselves (``encoder``,
      ``decoder``, ``quantizer``).
    vqvae_config: Optional MaskGIT config, its ``vqvae`` part or the whole
      config holding one. When given, the architecture comes from its
      ``filters``, ``channel_multipliers``, ``num_res_blocks``,
      ``embedding_dim`` and ``codebook_size`` (and ``conv_downsample``,
      ``norm_type``, ``activation_fn``, ``quantizer`` are checked), and every
      tensor must fit it; otherwise it is inferred from the shapes.

  Returns:
    (config, params): the `VQConfig` of the network and float32 arrays keyed
    by our parameter paths, exactly the `nnx.Param` leaves of
    ``VQModel(config)``.

  Raises:
    MaskGITCheckpointError: naming the linen path (and our path and both
      shapes) of every entry that is missing, unused or of the wrong shape,
      or the reason the layout has no `VQConfig` counterpart.
  """
  params = _params_of(params_tree)
  flat = _flatten(params)
  if vqvae_config is None:
    config = _infer_config(flat)
    return config, _take(flat, _name_map(config), config)
  config = _config_from_maskgit(flat, _vqvae_part(vqvae_config))
  try:
    return config, _take(flat, _name_map(config), config)
  except MaskGITCheckpointError as e:
    try:  # Say what the tensors themselves describe, if they are coherent.
      hint = f'\nthe checkpoint\'s shapes describe {_arch(_infer_config(flat))}'
    except MaskGITCheckpointError:
      hint = ''
    raise MaskGITCheckpointError(f'{e}{hint}') from None


def linen_names(config: vqgan.VQConfig) -> dict[str, str]:
  """Our parameter path -> MaskGIT's linen path, for a MaskGIT-layout config
  (the inverse mapping, e.g. to export our weights to MaskGIT's tree)."""
  return {ours: theirs for theirs, ours in _name_map(config)}


# ----------------------------------------------------------------------------
# The tree.
# ----------------------------------------------------------------------------


def _params_of(root: Any) -> Mapping[str, Any]:
  if not isinstance(root, Mapping):
    raise MaskGITCheckpointError(
        f'expected a nested dict of parameters, got {type(root).__name__}')
  if 'params' in root and isinstance(root['params'], Mapping):
    root = root['params']
  parts = ('encoder', 'decoder', 'quantizer')
  if not all(isinstance(root.get(p), Mapping) for p in parts):
    raise MaskGITCheckpointError(
        'not a MaskGIT VQVAE parameter tree: expected "encoder", "decoder" '
        'and "quantizer" (optionally under "params"), found keys '
        f'{sorted(map(str, root))}')
  return root


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_flatten(value, path + '/'))
    else:
      out[path] = value
  return out


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(value))


def _children(flat: Mapping[str, Any], prefix: str, kind: str) -> int:
  """How many ``{kind}_i`` modules sit directly under ``prefix`` (the
  largest index + 1: a gap shows up later as missing entries)."""
  count = 0
  for path in flat:
    if not path.startswith(prefix + '/'):
      continue
    m = _INDEXED.match(path[len(prefix) + 1:].split('/', 1)[0])
    if m and m.group(1) == kind:
      count = max(count, int(m.group(2)) + 1)
  return count


def _need(flat: Mapping[str, Any], path: str, rank: int,
          why: str) -> tuple[int, ...]:
  if path not in flat:
    raise MaskGITCheckpointError(f'missing {path} (needed to infer {why})')
  shape = _shape(flat[path])
  if len(shape) != rank:
    raise MaskGITCheckpointError(
        f'{path} has shape {shape}, expected rank {rank} (inferring {why})')
  return shape


# ----------------------------------------------------------------------------
# The architecture.
# ----------------------------------------------------------------------------


def _refuse_foreign_layers(flat: Mapping[str, Any]) -> None:
  """Layers that exist in MaskGIT's code but not in `VQConfig`."""
  for norm in ('BatchNorm', 'LayerNorm'):
    hits = [p for p in flat if f'/{norm}_' in p]
    if hits:
      raise MaskGITCheckpointError(
          f'{hits[0]}: norm_type with {norm} is not supported, VQConfig '
          'uses GroupNorm (MaskGIT norm_type="GN")')
  encoder_convs = _children(flat, 'encoder', 'Conv')
  if encoder_convs > 2:
    raise MaskGITCheckpointError(
        f'the encoder has {encoder_convs} direct convolutions (Conv_0 .. '
        f'Conv_{encoder_convs - 1}): MaskGIT conv_downsample=True (4x4 '
        'stride-2 convolutions) has no VQConfig counterpart; only average '
        'pooling (conv_downsample=False) is supported')


def _infer_config(flat: Mapping[str, Any]) -> vqgan.VQConfig:
  _refuse_foreign_layers(flat)
  codebook_size, code_dim = _need(flat, 'quantizer/codebook', 2,
                                  'codebook_size and embedding_dim')
  _, _, in_channels, filters = _need(flat, 'encoder/Conv_0/kernel', 4,
                                     'filters')
  decoder_convs = _children(flat, 'decoder', 'Conv')
  levels = decoder_convs - 1
  enc_blocks = _children(flat, 'encoder', 'ResBlock')
  dec_blocks = _children(flat, 'decoder', 'ResBlock')
  if levels < 1 or enc_blocks % (levels + 1) or dec_blocks != enc_blocks:
    raise MaskGITCheckpointError(
        f'cannot infer the layout: the decoder has {decoder_convs} direct '
        f'convolutions (so {levels} resolution levels), the encoder '
        f'{enc_blocks} ResBlocks and the decoder {dec_blocks}; MaskGIT builds '
        'num_res_blocks * (levels + 1) ResBlocks on each side and levels + 1 '
        'decoder convolutions')
  num_res_blocks = enc_blocks // (levels + 1)
  if num_res_blocks == 0:
    raise MaskGITCheckpointError(
        'num_res_blocks=0 (no ResBlocks) is not supported: channel_multipliers '
        'cannot be inferred and the widths differ from VQConfig\'s')
  mult = []
  for level in range(levels):
    path = f'encoder/ResBlock_{level * num_res_blocks}/Conv_0/kernel'
    width = _need(flat, path, 4, f'channel_multipliers[{level}]')[3]
    if width % filters:
      raise MaskGITCheckpointError(
          f'{path} outputs {width} channels, not a multiple of filters='
          f'{filters} (from encoder/Conv_0/kernel)')
    mult.append(width // filters)
  return _vq_config(filters=filters, channel_multipliers=mult,
                    num_res_blocks=num_res_blocks, embedding_dim=code_dim,
                    codebook_size=codebook_size, in_channels=in_channels)


def _vqvae_part(config: Any) -> Any:
  vqvae = _get(config, 'vqvae')
  return config if vqvae is None else vqvae


def _get(config: Any, name: str) -> Any:
  if isinstance(config, Mapping):
    return config.get(name)
  try:
    return getattr(config, name)
  except AttributeError:
    return None


def _config_from_maskgit(flat: Mapping[str, Any],
                         vqvae: Any) -> vqgan.VQConfig:
  _refuse_foreign_layers(flat)
  fields = {}
  for name in ('filters', 'channel_multipliers', 'num_res_blocks',
               'embedding_dim', 'codebook_size'):
    value = _get(vqvae, name)
    if value is None:
      raise MaskGITCheckpointError(f'the MaskGIT config has no vqvae.{name}')
    fields[name] = value
  checks = (('conv_downsample', (False, None), 'only False (average pooling) '
             'is supported'),
            ('norm_type', ('GN', None), 'only "GN" (GroupNorm) is supported'),
            ('activation_fn', ('swish', None), 'only "swish" is supported'),
            ('quantizer', ('vq', 'gumbel', None), 'expected "vq" or "gumbel"'))
  for name, allowed, why in checks:
    value = _get(vqvae, name)
    if value not in allowed:
      raise MaskGITCheckpointError(f'vqvae.{name}={value!r}: {why}')
  kernel = flat.get('encoder/Conv_0/kernel')
  in_channels = _shape(kernel)[2] if np.ndim(kernel) == 4 else 3
  return _vq_config(in_channels=in_channels, **fields)


def _vq_config(*, filters: int, channel_multipliers: Iterable[int],
               num_res_blocks: int, embedding_dim: int, codebook_size: int,
               in_channels: int) -> vqgan.VQConfig:
  mult = tuple(int(m) for m in channel_multipliers)
  if mult and mult[0] != 1:
    raise MaskGITCheckpointError(
        f'channel_multipliers={list(mult)}: a first multiplier other than 1 '
        'is not supported (MaskGIT\'s first convolution outputs `filters` '
        'channels and its first ResBlock widens them; VQConfig\'s outputs '
        'base_channels * channel_mult[0])')
  if int(num_res_blocks) < 1:
    raise MaskGITCheckpointError(
        f'num_res_blocks={num_res_blocks}: at least 1 is needed')
  try:
    return vqgan.VQConfig(
        in_channels=int(in_channels), patch_size=1,
        base_channels=int(filters), channel_mult=mult,
        num_res_blocks=int(num_res_blocks), codebook_size=int(codebook_size),
        code_dim=int(embedding_dim), num_groups=32, quantizer='euclidean',
        conv_bias=False, downsample='avg_pool', shortcut='branch',
        encoder_out_kernel=1, quant_conv=False,
        pixel_range='unit')
  except ValueError as e:
    raise MaskGITCheckpointError(
        f'the checkpoint\'s architecture (filters={filters}, '
        f'channel_multipliers={list(mult)}, num_res_blocks={num_res_blocks}, '
        f'embedding_dim={embedding_dim}, codebook_size={codebook_size}) is '
        f'not a valid VQConfig: {e}') from None


# ----------------------------------------------------------------------------
# Names.
# ----------------------------------------------------------------------------


def _res_block(theirs: str, ours: str, widens: bool) -> list[tuple[str, str]]:
  pairs = [(f'{theirs}/GroupNorm_0/{p}', f'{ours}/norm1/{p}')
           for p in ('scale', 'bias')]
  pairs.append((f'{theirs}/Conv_0/kernel', f'{ours}/conv1/kernel'))
  pairs += [(f'{theirs}/GroupNorm_1/{p}', f'{ours}/norm2/{p}')
            for p in ('scale', 'bias')]
  pairs.append((f'{theirs}/Conv_1/kernel', f'{ours}/conv2/kernel'))
  if widens:  # MaskGIT's 1x1 shortcut, created after both branch convs.
    pairs.append((f'{theirs}/Conv_2/kernel', f'{ours}/skip/kernel'))
  return pairs


def _conv(theirs: str, ours: str, bias: bool) -> list[tuple[str, str]]:
  pairs = [(f'{theirs}/kernel', f'{ours}/kernel')]
  if bias:
    pairs.append((f'{theirs}/bias', f'{ours}/bias'))
  return pairs


def _norm(theirs: str, ours: str) -> list[tuple[str, str]]:
  return [(f'{theirs}/{p}', f'{ours}/{p}') for p in ('scale', 'bias')]


def _name_map(config: vqgan.VQConfig) -> list[tuple[str, str]]:
  """(linen path, our path) of every parameter, walking both networks in
  MaskGIT's creation order."""
  chans = [config.base_channels * m for m in config.channel_mult]
  n = config.num_res_blocks
  levels = len(chans)
  pairs = [('quantizer/codebook', 'quantizer/codebook')]

  # Encoder: Conv_0, ResBlocks (levels, then bottleneck), GroupNorm_0,
  # Conv_1. Our blocks list also holds the (parameter-free) downsamplings.
  pairs += _conv('encoder/Conv_0', 'encoder/conv_in', bias=False)
  ours, theirs, width = 0, 0, chans[0]
  for level in range(levels):
    for _ in range(n):
      pairs += _res_block(f'encoder/ResBlock_{theirs}',
                          f'encoder/blocks/{ours}', width != chans[level])
      width = chans[level]
      ours, theirs = ours + 1, theirs + 1
    if level < levels - 1:
      ours += 1  # Average pooling.
  for _ in range(n):
    pairs += _res_block(f'encoder/ResBlock_{theirs}', f'encoder/blocks/{ours}',
                        False)
    ours, theirs = ours + 1, theirs + 1
  pairs += _norm('encoder/GroupNorm_0', 'encoder/norm_out')
  pairs += _conv('encoder/Conv_1', 'encoder/conv_out', bias=True)

  # Decoder: Conv_0, ResBlocks (bottleneck, then levels coarsest first) with
  # an upsampling Conv_k after every level but the finest, GroupNorm_0, and
  # the output Conv_{levels}.
  pairs += _conv('decoder/Conv_0', 'decoder/conv_in', bias=True)
  ours, theirs, conv, width = 0, 0, 1, chans[-1]
  for _ in range(n):
    pairs += _res_block(f'decoder/ResBlock_{theirs}', f'decoder/blocks/{ours}',
                        False)
    ours, theirs = ours + 1, theirs + 1
  for level in reversed(range(levels)):
    for _ in range(n):
      pairs += _res_block(f'decoder/ResBlock_{theirs}',
                          f'decoder/blocks/{ours}', width != chans[level])
      width = chans[level]
      ours, theirs = ours + 1, theirs + 1
    if level > 0:
      pairs += _conv(f'decoder/Conv_{conv}', f'decoder/blocks/{ours}/conv',
                     bias=True)
      ours, conv = ours + 1, conv + 1
  pairs += _norm('decoder/GroupNorm_0', 'decoder/norm_out')
  pairs += _conv(f'decoder/Conv_{conv}', 'decoder/conv_out', bias=True)
  return pairs


# ----------------------------------------------------------------------------
# Checking and taking the tensors.
# ----------------------------------------------------------------------------


def _abstract_shapes(config: vqgan.VQConfig) -> dict[str, tuple[int, ...]]:
  """Our parameter paths and shapes, without allocating the model."""
  def build():
    return vqgan.VQModel(config, rngs=nnx.Rngs(jax.random.key(0, impl='rbg')))

  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(build)
  return {'/'.join(map(str, path)): tuple(v.shape)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _arch(config: vqgan.VQConfig) -> str:
  """The config in MaskGIT's vqvae terms."""
  return (f'filters={config.base_channels}, channel_multipliers='
          f'{list(config.channel_mult)}, num_res_blocks='
          f'{config.num_res_blocks}, embedding_dim={config.code_dim}, '
          f'codebook_size={config.codebook_size}')


def _listed(title: str, lines: list[str]) -> list[str]:
  if not lines:
    return []
  shown = lines[:_MAX_LISTED]
  more = len(lines) - len(shown)
  return ([f'{title} ({len(lines)}):'] + [f'  {s}' for s in shown] +
          ([f'  ... and {more} more'] if more else []))


def _take(flat: Mapping[str, Any], pairs: list[tuple[str, str]],
          config: vqgan.VQConfig) -> dict[str, np.ndarray]:
  expected = _abstract_shapes(config)
  mapped = {ours for _, ours in pairs}
  if mapped != set(expected):
    # A bug in this module, not in the checkpoint.
    raise AssertionError(
        'maskgit_vq name map out of sync with VQModel: unmapped '
        f'{sorted(set(expected) - mapped)[:5]}, unknown '
        f'{sorted(mapped - set(expected))[:5]}')
  out, missing, wrong = {}, [], []
  for theirs, ours in pairs:
    want = expected[ours]
    if theirs not in flat:
      missing.append(f'{theirs} (our {ours}, shape {want})')
      continue
    value = flat[theirs]
    got = _shape(value)
    if got != want:
      wrong.append(f'{theirs} has shape {got}, our {ours} needs {want}')
      continue
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
      wrong.append(f'{theirs} has dtype {array.dtype}, expected floats')
      continue
    out[ours] = array.astype(np.float32)
  used = {theirs for theirs, _ in pairs}
  unused = [f'{p} {_shape(v)}' for p, v in sorted(flat.items())
            if p not in used]
  if missing or wrong or unused:
    lines = [f'MaskGIT checkpoint does not match the VQGAN ({_arch(config)}):']
    lines += _listed('wrong shape', wrong)
    lines += _listed('missing', missing)
    lines += _listed('unused (not in this architecture)', unused)
    raise MaskGITCheckpointError('\n'.join(lines))
  return out
