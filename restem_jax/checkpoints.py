"""Checkpoints with orbax: named pytrees per step, kept by recency and by a metric.

Plain functions over `ocp.CheckpointManager`; restores land directly on the
shardings of target trees (live arrays or ShapeDtypeStructs with shardings),
and a subset of the items can be restored (evaluation reads only `params`).
Orbax writes each step to a temporary folder and renames it when complete, so
a process killed mid-save leaves the previous checkpoint intact.  With
`best_metric`, orbax's own `best_fn` / `BestN` keep the best step beside the
latest ones, in the same folder.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from restem_jax import files, partitioning
from restem_jax import model as model_lib


class _QuietUnscoredSaves(logging.Filter):
  """Steps saved between validations carry no metrics by design; orbax warns on each."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


_QUIET = _QuietUnscoredSaves()


def manager(directory: str, keep: int = 2, best_metric: str | None = None) -> ocp.CheckpointManager:
  """Keeps the `keep` latest steps and, with `best_metric`, the step whose
  metrics[best_metric] is highest (`mngr.best_step()`)."""
  logging.getLogger("absl").addFilter(_QUIET)  # once: a logger holds a filter once
  if best_metric is None:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
  else:
    score = lambda metrics: metrics[best_metric]  # noqa: E731
    options = ocp.CheckpointManagerOptions(
        best_fn=score, best_mode="max", create=True, enable_async_checkpointing=False,
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=score, n=1, keep_checkpoints_without_metrics=False)]))
  return ocp.CheckpointManager(files.absolute(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, items: dict, metrics: dict | None = None) -> None:
  """Saves the named pytrees `items` at `step` (with `metrics` for best_fn)."""
  args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
  mngr.save(step, args=args, metrics=metrics)
  mngr.wait_until_finished()


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a live tree."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(mngr: ocp.CheckpointManager, step: int, targets: dict) -> dict:
  """The items named in `targets` at `step`, each placed like its target."""
  out = mngr.restore(step, args=ocp.args.Composite(
      **{k: ocp.args.StandardRestore(abstract(v)) for k, v in targets.items()}))
  return {k: out[k] for k in targets}


def best_score(mngr: ocp.CheckpointManager, metric: str) -> tuple[int | None, float | None]:
  """(step, score) of the best step saved with metrics (orbax's `best_step`), or (None, None)."""
  step = mngr.best_step()
  metrics = mngr.metrics(step) if step is not None else None
  if not metrics or metric not in metrics:
    return None, None
  return step, float(metrics[metric])


def load_params(path: str, cfg, mesh=None, step: int | None = None, init=None):
  """Parameters from a training folder written by `training.train` (its best
  step by validation, else its latest; `.../train` or `.../train/checkpoints`),
  or from a Hugging Face model folder.  `init(cfg, rng)` gives the tree's
  structure (default the decoder's; a reward model's: `reward.init_params`)."""
  init = init or model_lib.init_params
  path = files.absolute(path)
  if path.endswith(".gguf") or os.path.exists(os.path.join(path, "config.json")):
    from restem_jax import hf
    return hf.load_params(path, cfg, mesh)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  mesh = mesh or partitioning.make_mesh()
  target = partitioning.abstract_target(lambda r: init(cfg, r), mesh)
  mngr = manager(path, best_metric="validation")
  step = mngr.best_step() if step is None else step
  if step is None:
    step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{path}: no checkpoint found")
  return restore(mngr, step, {"params": target})["params"]
