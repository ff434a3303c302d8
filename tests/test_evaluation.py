"""pass@k and maj@k against brute-force enumeration."""
import dataclasses
import itertools
import math

import numpy as np
import pytest

from restem_jax import evaluation


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (6, 3, 4), (8, 1, 3), (7, 7, 2), (10, 4, 10)])
def test_pass_at_k_equals_enumeration(n, c, k):
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  brute = np.mean([any(samples[i] for i in s) for s in subsets])
  assert evaluation.pass_at_k(n, c, k) == pytest.approx(brute)
  assert len(subsets) == math.comb(n, k)


def test_pass_at_k_rejects_k_above_n():
  with pytest.raises(ValueError):
    evaluation.pass_at_k(3, 1, 4)


def test_majority_at_k_equals_enumeration():
  keys = ["5", "5", "7", "7", "7", None, "5", "9"]
  correct = [k == "5" for k in keys]
  for k in (1, 2, 3, 5, 8):
    vals = []
    for s in itertools.combinations(range(len(keys)), k):
      votes = {}
      for i in s:
        if keys[i] is not None:
          votes[keys[i]] = votes.get(keys[i], 0) + 1
      if not votes:
        vals.append(0.0)
        continue
      top = max(votes.values())
      winners = [a for a, v in votes.items() if v == top]
      vals.append(sum(w == "5" for w in winners) / len(winners))
    assert evaluation.majority_at_k(keys, correct, k) == pytest.approx(np.mean(vals))


def test_majority_hand_cases():
  assert evaluation.majority_at_k(["a", "a", "b"], [True, True, False], 3) == 1.0
  assert evaluation.majority_at_k(["a", "b", "b"], [True, False, False], 3) == 0.0
  assert evaluation.majority_at_k(["a", "b"], [True, False], 2) == 0.5  # a tie splits the credit
  assert evaluation.majority_at_k([None, None], [False, False], 1) == 0.0


def test_score_reads_majority_keys_from_the_typed_answers():
  from test_rollouts import _fake
  r = _fake(np.array([[1, 0, 0], [0, 0, 1]]), [[[4], [5], [6]], [[4], [5], [6]]])
  r = dataclasses.replace(r, answers=np.array([["7", "8", "7"], ["1", "1", "2"]]))
  summary, rows = evaluation.score(r, ks=(1, 3))
  assert rows[0]["maj@3"] == 1.0 and rows[1]["maj@3"] == 0.0  # "7" wins (right); "1" wins (wrong)
  assert summary["pass@3"] == 1.0 and summary["pass@1"] == pytest.approx((1 / 3 + 1 / 3) / 2)
  assert summary["statuses"] == {"passed": 2, "wrong_answer": 4}
  with pytest.raises(ValueError, match="not verified"):
    evaluation.score(dataclasses.replace(r, rewards=np.full((2, 3), np.nan, np.float32)))
