"""The best-of-N study of Let's Verify Step by Step, in one run: reward models trained on
a policy's samples (an ORM and a PRM, unless given), best-of-N against majority voting on a
pool of test samples (`reward_run.best_of_n_run`), and one ReST^EM iteration from the policy
without and with the PRM as the E-step's filter.  Its entry point is `main.best_of_n_main`
(gin/best_of_n*.gin)."""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil

from restem_jax import multihost, restem, reward_run
from restem_jax.files import write_json
from restem_jax.sampling import SamplingConfig


def run(run_dir: str, policy: str, orm: str, prm: str, model, vocab, task, *, split: str = "test",
        limit: int = 0, sampling: SamplingConfig | None = None, num_subsets: int = 200,
        config: reward_run.RewardConfig | None = None, reward_train=None, filter_restem=None,
        filter_mstep=None, mesh_shape=(-1, 1, 1), sample_task=None, hf_model_dir: str = "") -> dict:
  """Best-of-N of `policy`'s samples (`hf_model_dir` itself when empty): pass@N,
  majority, ORM / PRM picks and weighted votes.  An empty `orm` / `prm` is trained
  here first (run_dir/orm, run_dir/prm, with `config` and `reward_train`, on the
  same samples, run_dir/rm_rollouts); with `filter_restem` (a RestemConfig) one
  ReST^EM run from `policy` without and one with the PRM filter are compared.  The
  policy samples behind `sample_task`'s prompts where given; the reward models read
  the samples behind `task`'s.  Paths are absolute."""
  if filter_restem is not None and filter_restem.human_split:  # restem.run would re-train the policy (SFT)
    raise ValueError(f"filter RestemConfig.human_split = {filter_restem.human_split!r}: the PRM-filter arms "
                     "start from the policy itself; set it to ''")
  config = config or reward_run.RewardConfig()
  trained = {}
  for kind in ("orm", "prm"):
    if (orm if kind == "orm" else prm) or reward_train is None:
      continue
    trained[kind] = reward_run.train_run(
        os.path.join(run_dir, kind), dataclasses.replace(config, kind=kind, policy=policy or hf_model_dir),
        model, reward_train, vocab, task, tuple(mesh_shape), sample_task,
        os.path.join(run_dir, "rm_rollouts"))
  orm = orm or (os.path.join(run_dir, "orm", "train") if "orm" in trained else "")
  prm = prm or (os.path.join(run_dir, "prm", "train") if "prm" in trained else "")
  summary = reward_run.best_of_n_run(
      run_dir, policy or hf_model_dir, orm, prm, model, vocab, task, split, limit,
      sampling or SamplingConfig(num_samples=16, temperature=1.0, max_new_tokens=48), num_subsets,
      config, tuple(mesh_shape), sample_task)
  if "prm" in trained and "first_wrong_step" not in summary and trained["prm"]["test"]:
    t = trained["prm"]["test"]
    summary["first_wrong_step"] = {"accuracy": t["first_wrong_step_accuracy"], "solutions": t["solutions"],
                                   "always_none_baseline": t["always_none_baseline"]}
  if filter_restem is not None and prm:
    summary["prm_filter"] = {}
    for name, path in (("without", ""), ("with", prm)):
      cfg = dataclasses.replace(filter_restem, base_checkpoint=policy, prm_filter=path,
                                hf_model_dir=filter_restem.hf_model_dir or hf_model_dir)
      if trained:
        share_samples(os.path.join(run_dir, "rm_rollouts", config.train_split), config, cfg,
                      os.path.join(run_dir, f"restem_{name}_prm_filter", "iter_1", "rollouts"))
      s = restem.run(os.path.join(run_dir, f"restem_{name}_prm_filter"), cfg, model,
                     mstep=filter_mstep, mesh_shape=tuple(mesh_shape), vocab=vocab, task=task,
                     transfer=[], sample_task=sample_task)
      last = s["iterations"][-1]
      summary["prm_filter"][name] = {
          "kept_with_wrong_step": last.get("kept_with_wrong_step"), "kept_samples": last.get("kept_samples"),
          "test_pass_at_1_before": s["baseline_test_pass_at_1"], "test_pass_at_1": last["test_pass_at_1"],
          "prm_dropped": last.get("prm_dropped", 0), "wall_time_s": s["wall_time_s"]}
  # the whole run's wall time: reward models, the best-of-N pool and scores, the PRM filter
  summary["best_of_n_wall_time_s"] = summary["wall_time_s"]
  summary["wall_time_s"] = round(summary["wall_time_s"] + sum(t["wall_time_s"] for t in trained.values()) +
                                 sum(v["wall_time_s"] for v in summary.get("prm_filter", {}).values()), 1)
  write_json(os.path.join(run_dir, "summary.json"), summary)
  print(json.dumps({k: summary[k] for k in ("first_wrong_step", "prm_filter") if k in summary}, indent=1))
  return summary


def share_samples(src: str, rc, cfg, dst: str) -> None:
  """Both arms of the PRM-filter comparison start from the reward models' own
  samples where they are the same E-step (policy, problems, sampling, batches):
  the arms then differ by the filter alone, and the E-step is not sampled again.
  The batch files go where the first E-step resumes from."""
  same = (cfg.train_split == rc.train_split and cfg.train_limit == rc.train_limit and
          cfg.sampling == rc.sampling and cfg.sample_batch_size == rc.sample_batch_size)
  if not same:
    return
  if not os.path.exists(dst) and multihost.is_writer():
    os.makedirs(dst + ".tmp", exist_ok=True)
    for f in sorted(glob.glob(os.path.join(src, "batch_*.npz"))):
      shutil.copy(f, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    logging.info("PRM filter: %s starts from the reward models' samples (%s)", dst, src)
  multihost.barrier("shared samples")  # every process reads them from the run folder
