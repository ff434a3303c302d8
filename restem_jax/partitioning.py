"""Device mesh, logical axis rules, and shardings derived from them.

The model names every parameter and activation axis logically ("embed",
"heads", "batch", ...).  One rules table maps logical names onto the mesh axes
`data`, `fsdp` and `tensor`.  Shardings are derived from `jax.eval_shape` of
the boxed init, as in t5x; a dimension that a mesh axis does not divide is
replicated instead of failing, so small models run on any mesh.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices=None) -> Mesh:
  """A mesh with Auto axes (needed by linen logical sharding); -1 fills up."""
  devices = devices if devices is not None else jax.devices()
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(shape), tuple(axis_names), devices=devices,
                       axis_types=(AxisType.Auto,) * len(shape))


def _fit_spec(spec: P, shape: tuple, mesh: Mesh) -> P:
  """Drop mesh axes that do not divide their dimension (replicate instead)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for a in axes:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*out)


def logical_shardings(boxed_abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of (boxed) ShapeDtypeStructs from eval_shape."""
  specs = nn.get_partition_spec(boxed_abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.unbox(boxed_abstract_tree)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, _fit_spec(s, x.shape, mesh)),
      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def abstract_target(init_fn, mesh: Mesh, rules=DEFAULT_RULES):
  """The tree `init_fn(rng)` would give (boxed, logically named parameters) as
  ShapeDtypeStructs carrying their shardings: what a checkpoint restores onto and what
  an importer places arrays by.  Nothing is allocated."""
  boxed = jax.eval_shape(init_fn, jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      nn.unbox(boxed), logical_shardings(boxed, mesh, rules))


def sharding_for(mesh: Mesh, logical_names: tuple, shape: tuple, rules=DEFAULT_RULES):
  """NamedSharding of one array given by its logical axis names."""
  spec = nn.logical_to_mesh_axes(logical_names, rules)
  return NamedSharding(mesh, _fit_spec(spec, shape, mesh))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
