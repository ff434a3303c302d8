"""Evaluation: generation for records, pass@k (unbiased), maj@k, and a
notebook-friendly `evaluate()` returning a pandas DataFrame.

    from restem_jax import evaluation
    df = evaluation.evaluate("runs/arith/iter_2/train/best", "arith", split="test",
                             model=ModelConfig(...), num_samples=16, temperature=1.0)
    df.attrs["summary"]   # {'pass@1': ..., 'pass@16': ..., 'maj@16': ..., 'greedy_pass@1': ...}
"""
from __future__ import annotations

import collections
import itertools
import math
import os
import random
from typing import Callable, Sequence

import jax
import numpy as np

from restem_jax import checkpoints, partitioning, sampling
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


# ----------------------------------------------------------------------------- generation

def cut_completion(text: str, stop: str) -> str:
  if stop and stop in text:
    return text[:text.index(stop)]
  return text


def generate(cfg: model_lib.ModelConfig, params, vocab, records: Sequence[dict], *,
             num_samples: int = 1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             max_new_tokens: int = 64, batch_size: int = 64, seed: int = 0, stop: str = "",
             mesh=None, progress: Callable[[int], None] | None = None) -> list[list[str]]:
  """Completions (strings) for each record's prompt: [num_records][num_samples]."""
  prompts = [vocab.encode(r["prompt"]) for r in records]
  out = sampling.sample(cfg, params, prompts, num_samples=num_samples,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=vocab.eos_id, pad_id=0, rng=seed,
                        batch_size=batch_size, mesh=mesh, progress=progress)
  return [[cut_completion(vocab.decode(t), stop) for t in out.completions(i, vocab.eos_id)]
          for i in range(len(records))]


def score(task, records: Sequence[dict], completions: list[list[str]], *, ks=(1,),
          workers: int | None = None) -> tuple[dict, list[dict]]:
  """Verifies completions; returns (summary metrics, per-record rows)."""
  from restem_jax import verifiers
  from restem_jax.verifiers import math as vm
  flat = [(r, c) for r, cs in zip(records, completions) for c in cs]
  rewards, results, counts = verifiers.verify_batch(task.verifier, flat, workers=workers)
  has_answers = isinstance(task.verifier, verifiers.MathVerifier)  # maj@k needs final answers
  rows, i = [], 0
  for r, cs in zip(records, completions):
    n = len(cs)
    ok = [bool(x) for x in rewards[i:i + n]]
    res = results[i:i + n]
    i += n
    keys = [vm.normalize(x.detail) if has_answers and x.status in ("passed", "wrong_answer")
            and x.detail else None for x in res]
    row = dict(id=r["id"], n=n, correct=sum(ok), first_correct=ok[0] if n else False)
    for k in ks:
      if k <= n:
        row[f"pass@{k}"] = pass_at_k(n, sum(ok), k)
        if any(kk is not None for kk in keys):
          row[f"maj@{k}"] = majority_at_k(keys, ok, k)
    rows.append(row)
  summary = {key: float(np.mean([row[key] for row in rows if key in row]))
             for key in rows[0] if key.startswith(("pass@", "maj@"))} if rows else {}
  summary["statuses"] = dict(counts)
  return summary, rows


def load_params(path: str, cfg: model_lib.ModelConfig, mesh=None):
  """Parameters from an orbax folder written by training.train (`.../best` or
  `.../checkpoints`, latest step) or from a Hugging Face model folder."""
  path = checkpoints.absolute(path)
  if os.path.exists(os.path.join(path, "config.json")):
    from restem_jax import hf
    return hf.load_params(path, cfg, mesh)
  mesh = mesh or partitioning.make_mesh()
  boxed = jax.eval_shape(lambda r: model_lib.init_params(cfg, r), jax.random.key(0))
  shardings = partitioning.logical_shardings(boxed, mesh)
  import flax.linen as nn
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        nn.unbox(boxed), shardings)
  mngr = checkpoints.manager(path, None)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{path}: no checkpoint found")
  tree, _ = checkpoints.restore(mngr, step, target)
  return tree.params if hasattr(tree, "params") else tree


def evaluate(checkpoint_or_params, task, *, model: model_lib.ModelConfig, split: str = "test",
             vocab=None, num_samples: int = 1, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, ks: Sequence[int] = (1,), max_new_tokens: int = 64,
             batch_size: int = 64, limit: int | None = None, seed: int = 0, mesh=None):
  """Per-problem results of a model on a task split as a pandas DataFrame.

  `checkpoint_or_params`: a path (orbax folder or Hugging Face folder) or a
  parameter tree.  `task`: a name ("arith", "math", ...) or a Task.  Greedy
  pass@1 is always computed; with num_samples > 1, pass@k and maj@k from
  samples at `temperature`.  Summary numbers are in `df.attrs["summary"]`.
  """
  import pandas as pd
  import tasks as tasks_lib
  task = tasks_lib.get(task) if isinstance(task, str) else task
  if vocab is None:
    import seqio
    vocab = seqio.ByteVocabulary()
  params = (load_params(checkpoint_or_params, model, mesh)
            if isinstance(checkpoint_or_params, (str, os.PathLike)) else checkpoint_or_params)
  records = task.load(split)[:limit]
  kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, stop=task.stop, mesh=mesh)
  greedy = generate(model, params, vocab, records, **kw)
  g_summary, g_rows = score(task, records, greedy)
  summary = {"greedy_pass@1": g_summary["pass@1"]}
  df = pd.DataFrame(g_rows).rename(columns={"first_correct": "greedy_correct"})[["id", "greedy_correct"]]
  if num_samples > 1:
    samples = generate(model, params, vocab, records, num_samples=num_samples,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **kw)
    s_summary, s_rows = score(task, records, samples, ks=ks)
    summary.update({k: v for k, v in s_summary.items() if k != "statuses"})
    df = df.merge(pd.DataFrame(s_rows).drop(columns=["first_correct"]), on="id")
  df["completion"] = [g[0] for g in greedy]
  df.attrs["summary"] = summary
  return df
