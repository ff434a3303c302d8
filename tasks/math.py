"""`math`: MATH in the Hendrycks / PRM800K JSONL format (problem, solution,
answer, subject, level, unique_id): train.jsonl (12k) and test.jsonl (MATH-500).
Validation is a fixed 500-problem slice of train (held out from `train`)."""
from __future__ import annotations

import functools

from restem_jax.verifiers import MathVerifier
from tasks import common

PROMPT = "Problem:\n{problem}\n\nSolution:\n"
FIELDS = {"problem": str, "solution": str, "answer": str}
NUM_VALIDATION = 500


@functools.lru_cache(maxsize=None)
def _read(name: str, data_dir: str, prompt: str):
  rows = common.read_jsonl(common.data_path("math", name), FIELDS)
  return [dict(id=r.get("unique_id", f"math/{name}/{i}"), prompt=prompt.format(problem=r["problem"]),
               problem=r["problem"], solution=r["solution"], answer=r["answer"],
               subject=r.get("subject"), level=r.get("level")) for i, r in enumerate(rows)]


def load(split: str) -> list[dict]:
  if split == "test":
    return _read("test.jsonl", common.data_dir(), common.template("math", PROMPT))
  rows = _read("train.jsonl", common.data_dir(), common.template("math", PROMPT))
  if split == "train":
    return rows[NUM_VALIDATION:]
  if split == "validation":
    return rows[:NUM_VALIDATION]
  raise KeyError(f"math: unknown split {split!r} (train, validation, test)")


TASK = common.register(common.Task("math", ("train", "validation", "test"), load, MathVerifier()))
