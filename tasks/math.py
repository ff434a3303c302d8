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
def _read(name: str, data_dir: str):
  path = common.data_path(data_dir, "math", name)
  return [dict(id=r.get("unique_id", f"math/{name}/{i}"), problem=r["problem"],
               solution=r["solution"], answer=r["answer"], subject=r.get("subject"),
               level=r.get("level")) for i, r in enumerate(common.read_jsonl(path, FIELDS))]


def read(split: str, data_dir: str, options=None) -> list[dict]:
  if split == "test":
    return _read("test.jsonl", data_dir)
  rows = _read("train.jsonl", data_dir)
  return rows[NUM_VALIDATION:] if split == "train" else rows[:NUM_VALIDATION]


TASK = common.Task("math", ("train", "validation", "test"), read, MathVerifier(), prompt=PROMPT)
