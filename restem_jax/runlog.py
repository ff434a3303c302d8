"""A run's log: metrics.jsonl + TensorBoard, the wall time across restarts,
and atomic JSON files for the stages' results."""
from __future__ import annotations

import contextlib
import json
import os
import time

from restem_jax import multihost
from restem_jax.files import read_json, write_json


class RunLog:
  """Appends rows to `run_dir/metrics.jsonl` (and TensorBoard when tensorboardX
  is installed); `wall_time()` counts the time of earlier, interrupted runs too.
  With several processes only process 0 writes."""

  def __init__(self, run_dir: str):
    os.makedirs(run_dir, exist_ok=True)
    self.run_dir = run_dir
    self._writer = multihost.is_writer()
    self._progress = os.path.join(run_dir, "progress.json")
    before = read_json(self._progress) if os.path.exists(self._progress) else {}
    self._before = before.get("wall_time_s", 0.0)
    self._seconds = dict(before.get("seconds", {}))  # per kind of work, across restarts
    self._timing: list[list] = []  # open `timed` blocks: [kind, start]
    self._stage = before.get("stage", "")
    self._t0 = time.time()
    self._tb = None
    if self._writer:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
      except ImportError:
        pass

  def wall_time(self) -> float:
    return self._before + time.time() - self._t0

  def mark(self, stage: str) -> None:
    """Records the stage reached, with the time so far (also done by every logged row,
    so a run killed between marks loses at most the time since its last row)."""
    self._stage = stage
    write_json(self._progress, {"wall_time_s": self.wall_time(), "stage": stage, "seconds": self.seconds()})

  def seconds(self) -> dict:
    """Seconds spent in each kind of `timed` work so far (earlier runs and the open block included)."""
    out = dict(self._seconds)
    if self._timing:
      kind, start = self._timing[-1]
      out[kind] = out.get(kind, 0.0) + time.time() - start
    return {k: round(v, 1) for k, v in out.items()}

  @contextlib.contextmanager
  def timed(self, kind: str):
    """Counts the block's time as `kind`; a nested block's time counts only as its own kind."""
    now = time.time()
    if self._timing:
      outer = self._timing[-1]
      self._seconds[outer[0]] = self._seconds.get(outer[0], 0.0) + now - outer[1]
    self._timing.append([kind, now])
    try:
      yield
    finally:
      now = time.time()
      k, start = self._timing.pop()
      self._seconds[k] = self._seconds.get(k, 0.0) + now - start
      if self._timing:
        self._timing[-1][1] = now

  def __call__(self, stage: str, metrics: dict, step: int | None = None) -> None:
    if not self._writer:
      return
    row = dict(stage=stage, time=round(self.wall_time(), 2), **({"step": step} if step is not None else {}),
               **metrics)
    with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
    self.mark(self._stage)
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{stage}/{k}", v, step or 0)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


@contextlib.contextmanager
def run(run_dir: str, mesh_shape=(-1, 1, 1)):
  """A run's set-up and tear-down: its device mesh, made the current one, and its
  RunLog, closed on any exit.  Yields (log, mesh)."""
  import jax

  from restem_jax import partitioning
  mesh = partitioning.make_mesh(tuple(mesh_shape))
  with contextlib.closing(RunLog(run_dir)) as log, jax.set_mesh(mesh):
    yield log, mesh
