"""Best-of-N selection, measured as in Lightman et al. (2023), Fig. 3.

For each problem there is a pool of M samples: whether each is correct, its
final answer (the majority-vote key) and any reward-model scores.  For
N = 1, 2, 4, ..., the accuracy of each way of choosing one of N samples is
averaged over `num_subsets` random size-N subsets per problem (every subset
when there are no more than that many):
  pass@N            some sample of the subset is correct (an upper bound)
  majority          the most frequent answer
  <rm>              the sample the reward model scores highest
  <rm>-weighted     the answer with the largest total score
Ties count fractionally (the expected accuracy of a uniform tie-break).
Samples without an answer (None or "") never win a vote.
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np


def _vote(answers: Sequence, correct: Sequence[bool], weights: Sequence[float]) -> float:
  """Expected correctness of the answer with the largest total weight."""
  totals: dict = {}
  right: dict = {}
  for a, c, w in zip(answers, correct, weights):
    if a is None or a == "":
      continue
    totals[a] = totals.get(a, 0.0) + float(w)
    right[a] = right.get(a, False) or bool(c)
  if not totals:
    return 0.0
  best = max(totals.values())
  winners = [a for a, t in totals.items() if math.isclose(t, best, rel_tol=1e-9, abs_tol=1e-12)]
  return sum(right[a] for a in winners) / len(winners)


def _pick(scores: Sequence[float], correct: Sequence[bool]) -> float:
  s = np.asarray(scores, np.float64)
  top = np.isclose(s, s.max(), rtol=1e-9, atol=1e-12)
  return float(np.asarray(correct, bool)[top].mean())


def subset_accuracies(correct: Sequence[bool], answers: Sequence, scores: Mapping[str, Sequence[float]],
                      subset: Sequence[int]) -> dict[str, float]:
  """Every method's accuracy on one subset (indices into the pool)."""
  c = [bool(correct[i]) for i in subset]
  a = [answers[i] for i in subset]
  out = {"pass@N": float(any(c)), "majority": _vote(a, c, [1.0] * len(c))}
  for name, s in scores.items():
    sv = [float(s[i]) for i in subset]
    out[name] = _pick(sv, c)
    out[f"{name}-weighted"] = _vote(a, c, sv)
  return out


def subsets(m: int, n: int, num_subsets: int, rng: np.random.Generator) -> list[tuple]:
  """All size-n subsets of range(m) if there are at most num_subsets, else that
  many drawn uniformly (with replacement among subsets)."""
  if math.comb(m, n) <= num_subsets:
    return list(itertools.combinations(range(m), n))
  return [tuple(rng.choice(m, n, replace=False)) for _ in range(num_subsets)]


def table(correct: np.ndarray, answers: Sequence[Sequence], scores: Mapping[str, np.ndarray],
          ns: Sequence[int] | None = None, num_subsets: int = 200, seed: int = 0):
  """A pandas DataFrame: one row per N, one column per method (percent),
  averaged over problems.  correct [P, M]; answers P lists of M; scores
  {name: [P, M]}."""
  import pandas as pd
  correct = np.asarray(correct, bool)
  p, m = correct.shape
  ns = list(ns or [2 ** i for i in range(int(math.log2(m)) + 1)])
  if max(ns) > m:
    raise ValueError(f"N={max(ns)} is larger than the pool of {m} samples per problem")
  rng = np.random.default_rng(seed)
  rows = []
  for n in ns:
    sums: dict[str, float] = {}
    for i in range(p):
      subs = subsets(m, n, num_subsets, rng)
      for sub in subs:
        for k, v in subset_accuracies(correct[i], answers[i], {k: s[i] for k, s in scores.items()},
                                      sub).items():
          sums[k] = sums.get(k, 0.0) + v / len(subs)
    rows.append({"N": n, **{k: 100.0 * v / p for k, v in sums.items()}})
  return pd.DataFrame(rows).set_index("N")


def plot(df, path: str, title: str = "") -> None:
  """Accuracy against N (log scale), one line per method, as the paper's figure."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for col in df.columns:
    style = ":" if col == "pass@N" else "--" if col.endswith("-weighted") else "-"
    ax.plot(df.index, df[col], style, marker="o", markersize=3, label=col)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("N = number of solutions per problem")
  ax.set_ylabel("% problems solved (best-of-N)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
