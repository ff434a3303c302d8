"""Checkpoints with orbax: a pytree plus a JSON metadata dict per step.

Plain functions over `ocp.CheckpointManager`; restores land directly on the
shardings of a target tree (live arrays or ShapeDtypeStructs with shardings).
Orbax writes each step to a temporary folder and renames it when complete, so
a process killed mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def absolute(path: str) -> str:
  """A local path made absolute (orbax refuses relative ones); a URI such as
  gs://bucket/run passes through untouched; "" stays ""."""
  if not path or "://" in str(path):
    return path
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def manager(directory: str, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
  directory = absolute(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, tree, metadata: dict, force=False) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(tree), metadata=ocp.args.JsonSave(metadata)), force=force)
  mngr.wait_until_finished()


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a live tree."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(mngr: ocp.CheckpointManager, step: int, target):
  """(tree, metadata) at `step`, placed like `target`."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract(target)), metadata=ocp.args.JsonRestore()))
  return out.state, dict(out.metadata)


def read_metadata(mngr: ocp.CheckpointManager, step: int) -> dict:
  out = mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  return dict(out.metadata)
