"""Evaluation: pass@k (unbiased) and maj@k of verified rollouts, the metrics
of a policy after each ReST^EM stage, and a notebook-friendly `evaluate()`
returning a pandas DataFrame.

    from restem_jax import evaluation, sampling
    df = evaluation.evaluate("runs/arith/iter_2/train/checkpoints", "arith", split="test",
                             model=ModelConfig(...),
                             sc=sampling.SamplingConfig(num_samples=16, temperature=1.0))
    df.attrs["summary"]   # {'pass@1': ..., 'pass@16': ..., 'maj@16': ..., 'greedy_pass@1': ...}
"""
from __future__ import annotations

import collections
import itertools
import math
import os
import random
from typing import Sequence

import numpy as np

from restem_jax import checkpoints, report, rollouts, sampling
from restem_jax import model as model_lib


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased estimator of pass@k from n samples of which c are correct
  (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
  if k > n:
    raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _majority_correct(keys: Sequence, correct: Sequence[bool]) -> float:
  """Credit of one vote: 1 if the most frequent answer is correct; ties split evenly."""
  counts = collections.Counter(k for k in keys if k is not None)
  if not counts:
    return 0.0
  top = max(counts.values())
  winners = [k for k, v in counts.items() if v == top]
  right = {k for k, ok in zip(keys, correct) if ok and k is not None}
  return sum(w in right for w in winners) / len(winners)


def majority_at_k(keys: Sequence, correct: Sequence[bool], k: int, max_subsets: int = 5000,
                  seed: int = 0) -> float:
  """maj@k: expected correctness of the majority answer of k of the n samples.

  `keys` are the samples' normalised final answers (None for no answer),
  `correct` whether each sample is right.  Exact over all k-subsets when there
  are at most `max_subsets` of them, else a fixed-seed Monte Carlo estimate.
  """
  n = len(keys)
  if k > n:
    raise ValueError(f"maj@{k} needs at least {k} samples, got {n}")
  if math.comb(n, k) <= max_subsets:
    subsets = itertools.combinations(range(n), k)
  else:
    rng = random.Random(seed)
    subsets = (rng.sample(range(n), k) for _ in range(max_subsets))
  vals = [_majority_correct([keys[i] for i in s], [correct[i] for i in s]) for s in subsets]
  return float(np.mean(vals))


# ----------------------------------------------------------------------------- scoring


def score(r: rollouts.Rollouts, ks: Sequence[int] = (1,)) -> tuple[dict, list[dict]]:
  """(summary, per-problem rows) of verified rollouts: pass@k, and maj@k where
  the verifier gives final answers, for each k <= the samples per problem."""
  if not r.verified:
    raise ValueError("score: the rollouts are not verified yet")
  n = r.num_samples
  rows = []
  for i in range(r.num_problems):
    ok = (r.rewards[i] > 0).tolist()
    keys = [a or None for a in r.answers[i].tolist()]
    row = dict(id=str(r.problem_ids[i]), n=n, correct=sum(ok), first_correct=ok[0])
    for k in (k for k in ks if k <= n):
      row[f"pass@{k}"] = pass_at_k(n, sum(ok), k)
      if any(keys):
        row[f"maj@{k}"] = majority_at_k(keys, ok, k)
    rows.append(row)
  keys = [k for k in (rows[0] if rows else {}) if k.startswith(("pass@", "maj@"))]
  summary = {k: float(np.mean([row[k] for row in rows if k in row])) for k in keys}
  summary["statuses"] = dict(collections.Counter(r.statuses.ravel().tolist()))
  return summary, rows


def greedy_pass_at_1(engine: rollouts.Engine, params, task, records, max_new_tokens: int) -> float:
  sc = sampling.SamplingConfig(max_new_tokens=max_new_tokens)
  r = rollouts.rollout(engine, params, task, records, sc, desc=f"greedy {task.name}")
  return float(np.mean(r.rewards[:, 0] > 0)) if len(records) else 0.0


def policy_metrics(engine: rollouts.Engine, params, task, splits: dict, transfer: Sequence, *,
                   max_new_tokens: int, sc: sampling.SamplingConfig, ks: Sequence[int],
                   seed: int = 0, known: dict | None = None) -> dict:
  """What the report shows of a policy: greedy pass@1 on `splits` (name ->
  records; "train" and "test" give the train-test gap), on each transfer
  (task, split, records[, its max_new_tokens]), and pass@k / maj@k of `sc`
  samples on the test split.  Greedy decoding stops at `max_new_tokens`.
  `known`: split name -> its greedy pass@1, already measured the same way (the
  M-step's validation of the parameters it chose), not decoded again."""
  known = known or {}
  m = {f"{name}_pass_at_1": known[name] if name in known else
       greedy_pass_at_1(engine, params, task, recs, max_new_tokens) for name, recs in splits.items()}
  if "train" in splits and "test" in splits:
    m["train_test_gap"] = m["train_pass_at_1"] - m["test_pass_at_1"]
  for t, split, recs, *n in transfer:
    m[f"transfer/{t.name}/{split}_pass_at_1"] = greedy_pass_at_1(engine, params, t, recs,
                                                                 n[0] if n and n[0] else max_new_tokens)
  if sc.num_samples > 1:
    r = rollouts.rollout(engine, params, task, splits["test"], sc, seed=seed, desc="pass@k samples")
    summary, _ = score(r, ks)
    for key, v in summary.items():
      if key.startswith(("pass@", "maj@")):  # from temperature samples (greedy pass@1 is above)
        m[report.sampled_key(key)] = v
  return m


def evaluate(checkpoint_or_params, task, *, model: model_lib.ModelConfig, split: str = "test",
             vocab=None, sc: sampling.SamplingConfig = sampling.GREEDY, ks: Sequence[int] = (1,),
             max_new_tokens: int | None = None, batch_size: int = 64, limit: int | None = None,
             seed: int = 0, mesh=None):
  """Per-problem results of a model on a task split as a pandas DataFrame.

  `checkpoint_or_params`: a path (training folder or Hugging Face folder) or a
  parameter tree.  `task`: a name ("arith", "math", ...) or a Task.  Greedy
  pass@1 is always computed (up to `max_new_tokens`, default sc's); with
  sc.num_samples > 1, pass@k and maj@k of those samples.  Summary numbers are
  in `df.attrs["summary"]`.
  """
  import pandas as pd
  import tasks as tasks_lib
  from restem_jax import vocab as vocab_lib
  task = tasks_lib.get(task) if isinstance(task, str) else task
  engine = rollouts.Engine(model, vocab or vocab_lib.ByteVocabulary(), mesh, batch_size)
  params = (checkpoints.load_params(checkpoint_or_params, model, mesh)
            if isinstance(checkpoint_or_params, (str, os.PathLike)) else checkpoint_or_params)
  records = task.load(split)[:limit]
  greedy_sc = sampling.SamplingConfig(max_new_tokens=max_new_tokens or sc.max_new_tokens, stop=sc.stop)
  greedy = rollouts.rollout(engine, params, task, records, greedy_sc, desc="greedy")
  g_summary, g_rows = score(greedy)
  summary = {"greedy_pass@1": g_summary["pass@1"]}
  df = pd.DataFrame(g_rows).rename(columns={"first_correct": "greedy_correct"})[["id", "greedy_correct"]]
  if sc.num_samples > 1:
    s_summary, s_rows = score(rollouts.rollout(engine, params, task, records, sc, seed=seed), ks)
    summary.update({k: v for k, v in s_summary.items() if k != "statuses"})
    df = df.merge(pd.DataFrame(s_rows).drop(columns=["first_correct"]), on="id")
  df["completion"] = [t[0] for t in greedy.texts(engine.vocab, (task.stop, *greedy_sc.stop))]
  df.attrs["summary"] = summary
  return df
