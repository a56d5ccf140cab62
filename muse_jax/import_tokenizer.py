r"""Imports a pretrained VQ tokenizer into an Orbax checkpoint of ours.

  python -m muse_jax.import_tokenizer --format=diffusers \
      --src=path/to/amused-256/vqvae --out=workdir/amused_vq
  python -m muse_jax.import_tokenizer --format=maskgit \
      --src=path/to/maskgit_imagenet256_vq.ckpt --out=workdir/maskgit_vq

Formats: `diffusers`, a diffusers `VQModel` directory (config.json and
diffusion_pytorch_model.safetensors or .bin; a pipeline directory with a
`vqvae/` folder also works; `muse_jax.interop.diffusers_vq`), and
`maskgit`, MaskGIT's Flax VQGAN parameters (`muse_jax.interop.maskgit_vq`).
The output directory holds the model under the tokenizer part at step 0 of
`<out>/checkpoints` and its `VQConfig` in `<out>/vq_config.json`
(`muse_jax.interop.vq_checkpoint`; `vq_checkpoint.load(out)` reads it back).
Prints one line: the config and the parameter count.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

_FORMAT = flags.DEFINE_enum("format", None, ["diffusers", "maskgit"],
                            "Checkpoint format of --src.")
_SRC = flags.DEFINE_string("src", None, "The checkpoint to import.")
_OUT = flags.DEFINE_string("out", None,
                           "Output directory (created; must hold no "
                           "checkpoint yet).")

flags.mark_flags_as_required(["format", "src", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # Orbax's INFO chatter off.
  from muse_jax.interop import vq_checkpoint  # pylint: disable=g-import-not-at-top
  cfg, model = vq_checkpoint.import_checkpoint(_FORMAT.value, _SRC.value,
                                               _OUT.value)
  print(f"imported {_FORMAT.value} tokenizer {_SRC.value} -> {_OUT.value}: "
        f"{vq_checkpoint.num_params(model):,} parameters, "
        f"f={cfg.downsample_factor}, {cfg}", flush=True)


if __name__ == "__main__":
  app.run(main)
