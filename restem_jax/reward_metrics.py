"""How well a reward model judges solutions: locating the first wrong step (PRM),
ranking right answers above wrong ones (AUROC), accuracy at 0.5."""
from __future__ import annotations

import numpy as np

from restem_jax import reward


def step_metrics(per_step: list[np.ndarray], examples: list[reward.Labelled]) -> dict:
  """PRM: accuracy of locating the first wrong step (or none) on solutions with
  every step labelled, and step-level accuracy of P(NEGATIVE) > 0.5."""
  located, n_sol, right, n_steps, clean, cut = 0, 0, 0, 0, 0, 0
  p_neg, is_neg = [], []
  for probs, ex in zip(per_step, examples):
    labels = np.asarray(ex.labels)
    if len(probs) < len(labels):  # steps past max_len: the first wrong one may be among them
      cut += 1
      continue
    if len(labels) == 0 or (labels < 0).any():
      continue
    truth = int(np.argmax(labels == reward.NEGATIVE)) if (labels == reward.NEGATIVE).any() else -1
    located += reward.first_wrong_step(probs) == truth
    clean += truth == -1
    n_sol += 1
    right += int(((probs[:, reward.NEGATIVE] > 0.5) == (labels == reward.NEGATIVE)).sum())
    n_steps += len(labels)
    p_neg.extend(probs[:len(labels), reward.NEGATIVE])
    is_neg.extend(labels == reward.NEGATIVE)
  return {"first_wrong_step_accuracy": 100.0 * located / max(n_sol, 1), "solutions": n_sol,
          "always_none_baseline": 100.0 * clean / max(n_sol, 1),  # answering "no wrong step"
          "truncated_solutions": cut,
          # does P(NEGATIVE) rank the wrong steps above the others (0.5: no better than chance)
          "negative_step_auroc": auroc(np.asarray(p_neg), np.asarray(is_neg, bool)),
          "step_accuracy": 100.0 * right / max(n_steps, 1)}


def auroc(s: np.ndarray, positive: np.ndarray) -> float:
  """Mann-Whitney U / (pos * neg), ties counted half; nan without both classes."""
  from scipy.stats import rankdata
  positive = np.asarray(positive, bool)
  pos, neg = int(positive.sum()), int((~positive).sum())
  if not pos or not neg:
    return float("nan")
  return float((rankdata(s)[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def outcome_metrics(s: np.ndarray, correct: np.ndarray) -> dict:
  """Solution level: accuracy of score > 0.5 against the verifier, and AUROC."""
  correct = np.asarray(correct, bool)
  return {"solution_accuracy": 100.0 * float(np.mean((s > 0.5) == correct)), "auroc": auroc(s, correct)}


def evaluate_rm(cfg, params, examples, kind, rc, correct=None) -> dict:
  """A reward model's metrics on labelled `examples` (`rc`: a RewardConfig's scoring
  settings); with `correct`, the solution-level ones too."""
  s, per = reward.scores(cfg, params, examples, kind, max_len=rc.max_len, reduction=rc.reduction,
                         neutral_is_correct=rc.neutral_is_correct)
  m = step_metrics(per, examples) if reward.kind_of(kind).steps else {}
  if correct is not None:
    m.update(outcome_metrics(s, correct))
  return m

