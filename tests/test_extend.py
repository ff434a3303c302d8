"""Extending the project from a run file alone: a new task with options, an M-step loss
and a selection rule (tests/extension/), with no library file edited."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import subprocess_env
from restem_jax import main, rollouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT = os.path.join(ROOT, "tests", "extension")
pytestmark = pytest.mark.xdist_group("extend")


def test_a_task_a_loss_and_a_selection_rule_of_ones_own(tmp_path, monkeypatch):
  run_dir = tmp_path / "run"
  env = subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join([EXT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  r = subprocess.run([sys.executable, "-m", "restem_jax.main", f"--gin_file={EXT}/digitsum.gin",
                      f"--gin.RUN_DIR='{run_dir}'"], cwd=str(tmp_path), env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["task"] == "digitsum" and len(summary["iterations"]) == 1

  monkeypatch.syspath_prepend(EXT)
  import digitsum_task  # noqa: F401  (registers the task in this process too)
  task = main.run_values(str(run_dir))["task"]  # the options reached the task
  assert (task.options.seed, task.options.digits) == (3, 2) and len(task.load("test")) == 32

  # the selection rule: one sample per solved problem, on even-numbered problems only
  r = rollouts.concat([rollouts.load(p) for p in sorted(glob.glob(str(run_dir / "iter_1" / "rollouts" / "batch_*.npz")))])
  kept = [json.loads(line) for line in (run_dir / "iter_1" / "kept.jsonl").read_text().splitlines()]
  ids = [str(i) for i in r.problem_ids]
  solved = (r.rewards > 0).any(1)
  assert solved[1::2].any()  # the default rule would have kept some odd one
  assert 0 < len(kept) == len({k["id"] for k in kept}) == int(solved[::2].sum())
  assert all(ids.index(k["id"]) % 2 == 0 for k in kept)

  # the loss: the M-step logged its own metric; SFT (the NLL) did not
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  mstep = [row for row in rows if row["stage"] == "iter_1" and "loss" in row]
  assert mstep and all(row["counted_tokens"] == 1.0 for row in mstep)
  assert not any("counted_tokens" in row for row in rows if row["stage"] == "sft")
