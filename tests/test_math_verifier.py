"""Math grader: extraction, the equivalence table, hostile inputs, and the real data."""
import gzip
import json
import os
import time

import pytest

from restem_jax.verifiers import math as vm
from tests.math_pairs import EQUIVALENT, HOSTILE, NOT_EQUIVALENT


def test_table_is_large_enough():
  assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 150


@pytest.mark.parametrize("given,gold", EQUIVALENT)
def test_equivalent_pairs(given, gold):
  assert vm.is_equivalent(given, gold), (given, gold)


@pytest.mark.parametrize("given,gold", NOT_EQUIVALENT)
def test_not_equivalent_pairs(given, gold):
  assert not vm.is_equivalent(given, gold), (given, gold)


@pytest.mark.parametrize("text,answer", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{\\{2, \\{3\\}\\}}", "\\{2, \\{3\\}\\}"),
    ("\\fbox{42}", "42"), ("thus \\boxed 7.", "7"),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("We get 5.\n\n# Answer\n\n5", "5"), ("Therefore, the answer is $-3$.", "-3"),
    ("She pays 10 dollars.\nA: 10", "10"),
])
def test_extract_answer(text, answer):
  assert vm.extract_answer(text) == answer


@pytest.mark.parametrize("text", ["\\boxed{\\frac{1}{2", "no answer here", "", None, "\\boxed{}", "#### "])
def test_truncated_or_missing_answer_gives_none(text):
  assert vm.extract_answer(text) in (None, "")
  assert vm.grade(text, "1") == 0.0


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_inputs_are_false_within_timeout(hostile):
  t = time.time()
  assert not vm.is_equivalent(hostile, "1", timeout_s=2.0)
  assert not vm.grade("\\boxed{" + hostile + "}", "2", timeout_s=2.0)
  assert time.time() - t < 2 * 2.0 + 2.0


def _jsonl(path):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return [json.loads(line) for line in f]


def test_math_dataset_self_consistency(shared_data):
  rows = _jsonl(os.path.join(shared_data, "math/train.jsonl")) + _jsonl(os.path.join(shared_data, "math/test.jsonl"))
  assert len(rows) == 12500
  failed = [(r["unique_id"], r["answer"]) for r in rows if vm.grade(r["solution"], r["answer"]) != 1.0]
  assert len(failed) <= 0.005 * len(rows), failed
  wrong, pairs = [], 0
  for i, r in enumerate(rows):
    other = rows[(i * 7919 + 13) % len(rows)]
    if vm.normalize(other["answer"]) == vm.normalize(r["answer"]) or not r["answer"].strip():
      continue
    pairs += 1
    if vm.is_equivalent(other["answer"], r["answer"]):
      wrong.append((other["answer"], r["answer"]))
  assert len(wrong) <= 0.005 * pairs, wrong


def test_gsm8k(shared_data):
  for split in ("train", "test"):
    for r in _jsonl(os.path.join(shared_data, f"gsm8k/{split}.jsonl")):
      gold = r["answer"].split("####")[-1].strip()
      assert vm.extract_answer(r["answer"]) == gold
      assert vm.grade(r["answer"], gold) == 1.0
  rows = _jsonl(os.path.join(shared_data, "gsm8k/example_model_solutions.jsonl"))
  agree = total = 0
  for r in rows:
    gold = vm.extract_answer(r["ground_truth"])
    for key in ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"):
      total += 1
      agree += vm.grade(r[key]["solution"], gold) == float(r[key]["is_correct"])
  assert agree / total >= 0.99, agree / total


def test_prm800k_human_verified_answers_are_accepted(shared_data):
  rows = [r for r in _jsonl(os.path.join(shared_data, "math/answer_pairs.jsonl"))
          if r["label_from_dataset"].get("is_solution")]
  rejected = [(r["model_answer"], r["gold_answer"]) for r in rows
              if not vm.is_equivalent(r["model_answer"], r["gold_answer"])]
  assert len(rejected) <= 1, rejected


# Final lines of real SmolLM2-135M-Instruct samples on GSM8K (chat prompt asking for "#### <number>";
# the lines before them shortened here),
# with the answer each states.
SMOLLM2_ENDINGS = [
    ("Step 2: Add them up: 40 + 40 = 80\nThe final answer is: 80", "80"),
    ("So she has 96 cookies left.\nThe answer is: 96", "96"),
    ("12 + 50 = 60\nA total of 60 is the answer.\n\n12 is the answer.", "12"),
    ("600 / 1 = 600\nThe final answer is 600.", "600"),
    ("Therefore, 115 is the answer to the problem.", "115"),
    ("Step 4: 75 - 0 = 75\n#### The final answer is 75", "75"),
    ("They share it, so each pays 2000 / 10.\nThe answer is 2000:2 = $200.", "200"),
    ("He reads 40 pages a day.\nSo, the answer is: 48.", "48"),
    ("She earns 183 dollars.\n#### 183", "183"),
    ("The answer is $38", "38"),
    ("The answer is 4 hours.", "4 hours"),
    ("So, Alexis paid $6 for the shoes.", None),  # no final answer stated: no reward
]


@pytest.mark.parametrize("text,want", SMOLLM2_ENDINGS)
def test_extracts_how_an_instruct_model_ends(text, want):
  assert vm.extract_answer(text) == want
  if want is not None:
    assert vm.grade(text, want.split()[0]) == 1.0
