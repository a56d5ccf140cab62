"""Meshes, logical-axis rules and sharded state creation.

Modules annotate parameters and key activations with *logical* axis names;
the config's `sharding_rules` table maps each name to a mesh axis (or None =
replicated). Changing parallelism is then a config edit: data parallel is
`batch -> data`, FSDP adds `embed -> fsdp`, tensor parallel `mlp/heads/vocab
-> tensor`. The code runs in JAX's *auto* sharding mode (the compiler
propagates shardings from the annotated parameters, inputs and the
`constrain` calls at block boundaries).

State is built shape-first: `nnx.eval_shape` gives the abstract model, the
rules give its shardings, and a jitted constructor with those
`out_shardings` materialises every parameter directly on its devices, so no
host or device ever holds the whole unsharded model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from typing import Any

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

Rules = tuple[tuple[str, Any], ...]

# Every logical name used by the models. A rules table must map each of them.
LOGICAL_AXES = (
    # Activations.
    "batch", "length", "text_length", "act_embed", "act_vocab",
    # Transformer parameters.
    "embed", "mlp", "heads", "kv", "vocab", "layers", "positions",
    "text_embed",
    # Convolutional tokenizer parameters.
    "conv_h", "conv_w", "conv_in", "conv_out", "codebook", "code_dim",
)

MESH_AXES = ("data", "fsdp", "tensor")

# Data parallel over `data`, ZeRO-3 style parameter sharding over `fsdp`,
# Megatron-style tensor parallelism over `tensor`. With the default mesh
# (all devices on `data`) this is plain data parallelism.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("text_length", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("positions", None),
    ("text_embed", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("codebook", None),
    ("code_dim", None),
)


def make_mesh(
    axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None
) -> Mesh:
  """`jax.make_mesh` in auto mode; one axis size may be -1 (all remaining)."""
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(str(name) for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh {list(axes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if len(devices) % known:
      raise ValueError(
          f"mesh {list(axes)}: {len(devices)} devices not divisible by {known}")
    sizes[unknown[0]] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh {list(axes)} needs {math.prod(sizes)} devices, "
        f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(AxisType.Auto,) * len(names))


def validate_rules(rules: Sequence[Sequence[Any]], mesh: Mesh | None = None
                   ) -> Rules:
  """Checks a rules table covers every logical axis and names real mesh axes."""
  rules = tuple((str(k), _as_mesh_axes(v)) for k, v in rules)
  names = [k for k, _ in rules]
  missing = sorted(set(LOGICAL_AXES) - set(names))
  if missing:
    raise ValueError(f"sharding_rules is missing logical axes {missing}")
  unknown = sorted(set(names) - set(LOGICAL_AXES))
  if unknown:
    raise ValueError(f"sharding_rules names unknown logical axes {unknown}")
  if mesh is not None:
    for name, target in rules:
      for axis in (target if isinstance(target, tuple) else (target,)):
        if axis is not None and axis not in mesh.axis_names:
          raise ValueError(
              f"sharding_rules maps {name!r} to mesh axis {axis!r}, "
              f"not in mesh axes {mesh.axis_names}")
  return rules


def _as_mesh_axes(v: Any) -> Any:
  if isinstance(v, (list, tuple)):
    return tuple(v)
  return v


def logical_to_spec(names: Sequence[str | None], rules: Rules
                    ) -> PartitionSpec:
  return PartitionSpec(*flax_spmd.from_sharding_rules(tuple(names), rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh + rules."""
  rules = flax_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def abstract_state(
    make: Callable[[], Any], mesh: Mesh, rules: Rules
) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """Shapes and target shardings of `make()`'s state, without allocating it.

  Returns (graphdef, abstract state whose ShapeDtypeStructs carry their
  NamedShardings, the shardings tree).
  """
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(state, mesh)
  state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      state, shardings)
  # Same pytree structure as the state itself (usable as jit shardings).
  shardings = jax.tree.map(lambda a: a.sharding, state)
  return graphdef, state, shardings


def create_sharded(make: Callable[[], Any], mesh: Mesh, rules: Rules) -> Any:
  """Materialises `make()` (modules, optimizers) directly sharded on `mesh`."""
  graphdef, _, shardings = abstract_state(make, mesh, rules)
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
    state = jax.jit(
        lambda: nnx.split(make())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def data_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of batches: leading (batch) axis over the data axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def data_shards(mesh: Mesh, rules: Rules | None) -> int:
  """How many slices a batch is cut into (the data axes' total size)."""
  if rules is None:
    return 1
  spec = logical_to_spec(("batch",), rules)[0]
  axes = spec if isinstance(spec, tuple) else (spec,)
  return math.prod(mesh.shape[a] for a in axes if a is not None)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules
                 ) -> dict[str, jax.Array]:
  """Assembles each process's slice of a batch into global sharded arrays."""
  sharding = data_sharding(mesh, rules)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def shard_host_batch(x: np.ndarray, mesh: Mesh, rules: Rules) -> jax.Array:
  """A batch every process holds whole -> a global array over the data axes.

  Each device receives only its slice (inference: encoding, tokenizing and
  sampling a list every process knows).
  """
  x = np.asarray(x)
  shards = data_shards(mesh, rules)
  if x.shape[0] % shards:
    raise ValueError(f"batch of {x.shape[0]} rows does not split over "
                     f"{shards} data shards")
  sharding = data_sharding(mesh, rules)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly sharded, multi-process) array on every host."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
