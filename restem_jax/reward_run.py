"""Reward-model runs: train an ORM or PRM; best-of-N with them against majority voting.

`train_run` (gin/train_orm.gin, gin/train_prm.gin):
  data      (reward_data) "rollouts": samples of a policy checkpoint on the task's train,
            validation and test splits, verified (ORM labels) and step-labelled
            where the task's steps are checkable (arith: exact PRM labels)
            -> run_dir/rollouts/<split>/batch_NNNNN.npz (resumable);
            "prm800k": PRM800K phase1_train (train / validation by problem)
            and phase1_test, human step labels.
  train     the decoder + a 3-way head (from the policy, a Hugging Face /
            GGUF model, or scratch) with `training.train`: sharded, resumable,
            keep-best on validation (PRM: first-wrong-step accuracy; ORM:
            AUROC of right against wrong answers) -> run_dir/train/checkpoints
            (`train_rm`; active learning retrains with it)
  report    test metrics (reward_metrics) -> run_dir/summary.json

`best_of_n_run` (gin/best_of_n.gin): a pool of `sampling.num_samples` samples
per test problem from the policy, scored by the ORM and the PRM; the table of
best-of-N accuracies for N = 1, 2, 4, ... (best_of_n.csv / .png) and
summary.json.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import numpy as np

from restem_jax import (best_of_n, checkpoints, files, multihost, reward, reward_data,
                        reward_metrics, rollouts, runlog, training)
from restem_jax import model as model_lib
from restem_jax.files import read_json, write_json
from restem_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """What a reward-model run trains on and how it is judged."""
  kind: str = "prm"  # a key of reward.KINDS: "orm" | "prm"
  source: str = "rollouts"  # "rollouts" (of `policy`) | "prm800k"
  policy: str = ""  # training folder, Hugging Face folder or .gguf the samples come from
  init: str = "policy"  # "policy" | "scratch" | a checkpoint / HF folder / .gguf
  train_split: str = "pool"
  validation_split: str = "validation"
  test_split: str = "test"
  train_limit: int = 0  # problems (0: all)
  eval_limit: int = 0
  # PRM800K: problems drawn at random (with `seed`) when limited, and at most this
  # many of each problem's rated solutions, also at random (0: all of them)
  per_problem: int = 0
  sampling: SamplingConfig = SamplingConfig(num_samples=8, temperature=1.0, max_new_tokens=48)
  sample_batch_size: int = 64
  max_len: int = 128
  reduction: str = "product"  # PRM score: "product" | "min" of P(step correct)
  neutral_is_correct: bool = True
  seed: int = 0
  workers: int | None = None
  # active learning: score `active_samples` more samples per train problem, add the
  # `active_per_problem` convincing wrong answers of each to the data, retrain; the
  # same number of uniformly drawn samples is the control
  active_samples: int = 0
  active_per_problem: int = 2
  # PRM step labels of sampled solutions: "exact" (the task's checker) or "mc"
  # (Math-Shepherd: `mc_rollouts` completions from each step's prefix; for training,
  # while validation and test keep exact labels where the task has them)
  labels: str = "exact"
  mc_rollouts: int = 4
  # label balance: per right training sample, this many wrong copies (one step's
  # last number slipped, cut after it; `reward_data.perturbed`), exact labels only
  perturbed: int = 0

  def __post_init__(self):
    if self.kind not in reward.KINDS:
      raise ValueError(f"RewardConfig.kind: {self.kind!r} is not one of {tuple(reward.KINDS)}")
    if self.source not in ("rollouts", "prm800k"):
      raise ValueError(f"RewardConfig.source: {self.source!r} is not 'rollouts' or 'prm800k'")
    if self.labels not in ("exact", "mc"):
      raise ValueError(f"RewardConfig.labels: {self.labels!r} is not 'exact' or 'mc'")
    if self.active_samples and not self.test_split:
      raise ValueError("RewardConfig.active_samples: active learning is judged on test_split; give one")
    if self.perturbed and (self.source != "rollouts" or self.labels != "exact"):
      raise ValueError("RewardConfig.perturbed: needs source 'rollouts' with exact labels")
    if self.source == "prm800k" and self.kind != "prm":
      raise ValueError("RewardConfig: PRM800K has step labels only: kind must be 'prm'")


def _engine(model, vocab, mesh, rc):
  return rollouts.Engine(model, vocab, mesh, rc.sample_batch_size, rc.workers)


def train_run(run_dir: str, rc: RewardConfig, model: model_lib.ModelConfig, tc: training.TrainConfig,
              vocab, task, mesh_shape=(-1, 1, 1), sample_task=None, rollouts_dir: str = "") -> dict:
  """Trains a reward model in run_dir (resumable); returns the summary.
  `sample_task`: the policy samples behind its prompts (see `reward_data.rollouts_for`);
  `rollouts_dir` (default run_dir/rollouts): where the samples are kept, one
  folder for an ORM and a PRM trained on the same samples.  An empty
  `rc.test_split` skips the test metrics (best-of-N measures on its own pool)."""
  rollouts_dir = rollouts_dir or os.path.join(run_dir, "rollouts")
  with runlog.run(run_dir, mesh_shape) as (log, mesh):
    policy, mc_agreement = None, {}
    if rc.source == "rollouts":
      if not rc.policy:
        raise ValueError("RewardConfig.policy: a checkpoint to sample from is needed (source 'rollouts')")
      policy = checkpoints.load_params(rc.policy, model, mesh)
      engine = _engine(model, vocab, mesh, rc)
      splits, mc_agreement = reward_data.rollout_splits(engine, policy, task, rc, rollouts_dir, sample_task,
                                                        log.mark)
    else:
      splits = reward_data.prm800k_splits(task, vocab, rc)
    data = reward.pack(splits["train"].examples, rc.max_len)
    stats = {f"{k}_solutions": len(v.examples) for k, v in splits.items()}
    if mc_agreement:
      stats["mc_agreement_with_exact"] = mc_agreement
    stats["train_labels"] = int(data["label_mask"].sum())
    stats["train_negative_share"] = float((data["labels"][data["label_mask"] > 0] == reward.NEGATIVE).mean())
    log("data", stats)
    logging.info("reward model data: %s", stats)

    init_params = None
    if rc.init == "policy":
      if policy is None:
        raise ValueError("RewardConfig.init 'policy' needs source 'rollouts'; give a model path")
      init_params = reward.from_decoder(model, policy)
    elif rc.init != "scratch":
      init_params = reward.from_decoder(model, checkpoints.load_params(rc.init, model, mesh))
    fit = functools.partial(train_rm, rc, model, tc, splits["validation"], init_params, mesh, log)
    best, score = fit(data, os.path.join(run_dir, "train"), f"train_{rc.kind}")
    summary = dict(kind=rc.kind, source=rc.source, validation=score, data=stats, test=_test(model, best, rc, splits))
    if rc.active_samples:
      if policy is None:
        raise ValueError("RewardConfig.active_samples needs source 'rollouts' (a policy to sample)")
      summary["active_learning"] = active_learning(
          run_dir, rc, model, engine, task, policy, best, splits, fit, log, sample_task)
    summary["wall_time_s"] = round(log.wall_time(), 1)
    write_json(os.path.join(run_dir, "summary.json"), summary)
    log("test", summary["test"])
    log.mark("done")
    return summary


def train_rm(rc: RewardConfig, model, tc: training.TrainConfig, validation: reward_data.Split, init_params,
             mesh, log, data: dict, workdir: str, name: str):
  """One reward model trained on `data` (a `reward.pack` batch) in `workdir`
  (resumable), keeping the checkpoint best on `validation`: the PRM by locating
  first wrong steps; the ORM by how it ranks right answers above wrong ones
  (AUROC, x100), which is what picking among samples needs (its accuracy at 0.5
  rewards answering "wrong" when most samples are: the base model's are 96%
  wrong), accuracy where validation lacks a class.  (parameters, best score)"""
  both = validation.correct is not None and 0 < np.mean(validation.correct) < 1

  def validate(params):
    m = reward_metrics.evaluate_rm(model, params, validation.examples, rc.kind, rc, validation.correct)
    if reward.kind_of(rc.kind).steps:
      return m["first_wrong_step_accuracy"]
    return 100 * m["auroc"] if both else m["solution_accuracy"]

  params, score, _ = training.train(
      model, tc, data, workdir, mesh, loss_fn=reward.loss(model),
      init_fn=functools.partial(reward.init_params, model), init_params=init_params, validate=validate,
      log=lambda m: log(name, {k: v for k, v in m.items() if k != "step"}, m["step"]))
  return params, score


def _test(model, params, rc: RewardConfig, splits: dict) -> dict:
  if "test" not in splits:
    return {}
  t = splits["test"]
  m = reward_metrics.evaluate_rm(model, params, t.examples, rc.kind, rc, t.correct)
  return {k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}


def active_learning(run_dir, rc: RewardConfig, model, engine, task, policy, rm, splits: dict, fit, log,
                    sample_task=None) -> dict:
  """Retrains (`fit`: `train_rm` bound to the run) with the convincing wrong answers
  of a fresh pool (scored by `rm`) and, as the control, with as many uniformly
  drawn samples; test metrics of both."""
  sc = dataclasses.replace(rc.sampling, num_samples=rc.active_samples)
  pool = reward_data.rollouts_for(engine, policy, task, rc.train_split, rc.train_limit, sc,
                                  os.path.join(run_dir, "active_pool"), rc.seed + 1, sample_task)
  correct = pool.rewards > 0
  s, _ = reward.scores(model, rm, reward.from_rollouts(pool, engine.vocab, task, rc.kind, labelled=False),
                       rc.kind, max_len=rc.max_len, reduction=rc.reduction,
                       neutral_is_correct=rc.neutral_is_correct)
  picked = reward.convincing_wrong(s.reshape(correct.shape), correct, rc.active_per_problem).reshape(-1)
  n = int(picked.sum())
  control = np.zeros(picked.shape, bool)
  control[np.random.default_rng(rc.seed).choice(picked.size, n, replace=False)] = True
  labelled = reward.from_rollouts(pool, engine.vocab, task, rc.kind,
                                  records=reward_data.take(task.load(rc.train_split), rc.train_limit))
  out = {"pool_samples": int(picked.size), "selected": n,
         "selected_mean_score": float(s[picked].mean()) if n else None,
         "wrong_answer_share_of_pool": float(1 - correct.mean())}
  for name, mask in (("convincing_wrong", picked), ("random", control)):
    extra = [ex for ex, m in zip(labelled, mask) if m]
    data = reward.pack(list(splits["train"].examples) + extra, rc.max_len)
    params, score = fit(data, os.path.join(run_dir, f"train_{name}"), f"train_{name}")
    out[name] = dict(validation=score, test=_test(model, params, rc, splits))
    log(f"active_{name}", out[name]["test"])
  return out


def load_rm(path: str, model):
  return checkpoints.load_params(path, model, init=reward.init_params)


def best_of_n_run(run_dir: str, policy: str, orm: str, prm: str, model: model_lib.ModelConfig, vocab,
                  task, split: str = "test", limit: int = 0,
                  sampling: SamplingConfig = SamplingConfig(num_samples=16, temperature=1.0, max_new_tokens=48),
                  num_subsets: int = 200, rc: RewardConfig = RewardConfig(), mesh_shape=(-1, 1, 1),
                  sample_task=None) -> dict:
  """Best-of-N on a pool of samples per problem: pass@N, majority, and each
  given reward model's pick and weighted vote (table, PNG, summary.json).
  The reward models read the samples behind `task`'s prompts (the policy
  samples behind `sample_task`'s, where given).  Where the task's steps are
  checkable, the PRM's first-wrong-step accuracy on the pool is reported too
  (`first_wrong_step`: held-out problems, every sample)."""
  with runlog.run(run_dir, mesh_shape) as (log, mesh):
    params = checkpoints.load_params(policy, model, mesh)
    r = reward_data.rollouts_for(_engine(model, vocab, mesh, rc), params, task, split, limit, sampling,
                     os.path.join(run_dir, "rollouts"), rc.seed, sample_task)
    log.mark("pool")
    correct = r.rewards > 0
    answers = [[a if a else None for a in row] for row in r.answers.tolist()]
    scores, rm_metrics = {}, {}
    cache = os.path.join(run_dir, "scores.npz")
    saved = dict(np.load(cache)) if os.path.exists(cache) else {}
    steps_path = os.path.join(run_dir, "first_wrong_step.json")
    steps = read_json(steps_path) if os.path.exists(steps_path) else None
    for name, path in (("ORM", orm), ("PRM", prm)):
      if not path:
        continue
      kind = name.lower()
      if name not in saved:
        examples = reward.from_rollouts(r, vocab, task, kind, labelled=False)
        s, per = reward.scores(model, load_rm(path, model), examples, kind, max_len=rc.max_len,
                               reduction=rc.reduction, neutral_is_correct=rc.neutral_is_correct)
        saved[name] = s.reshape(correct.shape)
        if kind == "prm" and task.step_labels is not None:  # exact labels: judge the steps too
          records = reward_data.take(task.load(split), limit)
          labelled = reward.from_rollouts(r, vocab, task, "prm", records=records)
          steps = reward_metrics.step_metrics([p[:len(ex.labels)] for p, ex in zip(per, labelled)], labelled)
          if multihost.is_writer():
            write_json(steps_path, steps)
        if multihost.is_writer():
          with files.atomic(cache, "wb") as f:
            np.savez(f, **saved)
      scores[name] = saved[name]
      rm_metrics[name] = reward_metrics.outcome_metrics(scores[name].reshape(-1), correct.reshape(-1))
    df = best_of_n.table(correct, answers, scores, num_subsets=num_subsets, seed=rc.seed)
    if multihost.is_writer():
      df.round(2).to_csv(os.path.join(run_dir, "best_of_n.csv"))
      best_of_n.plot(df, os.path.join(run_dir, "best_of_n.png"),
                     f"{task.name}/{split}: {r.num_problems} problems, pool of {r.num_samples}")
    print(df.round(1).to_string())
    cols = {"pass@N": "pass_at_n", "majority": "majority", "ORM": "orm", "PRM": "prm",
            "ORM-weighted": "orm_weighted", "PRM-weighted": "prm_weighted"}
    table = {"N": [int(n) for n in df.index]}
    table.update({key: [round(float(v), 2) for v in df[col]] for col, key in cols.items() if col in df})
    summary = dict(problems=r.num_problems, pool=r.num_samples, best_of_n=table,
                   reward_models=rm_metrics, wall_time_s=round(log.wall_time(), 1))
    if steps is not None and prm:
      summary["first_wrong_step"] = {k: steps[k] for k in ("first_wrong_step_accuracy", "solutions",
                                                           "always_none_baseline", "negative_step_auroc",
                                                           "truncated_solutions")}
    write_json(os.path.join(run_dir, "summary.json"), summary)
    log.mark("done")
    return summary
