"""`gsm8k`: grade-school math (question, answer ending in "#### N"); used for
transfer evaluation of MATH-trained models and as a task of its own."""
from __future__ import annotations

import functools

from restem_jax.verifiers import MathVerifier
from tasks import common

PROMPT = "Problem:\n{problem}\n\nSolution:\n"


@functools.lru_cache(maxsize=None)
def _read(name: str, data_dir: str, prompt: str):
  rows = common.read_jsonl(common.data_path("gsm8k", name), {"question": str, "answer": str})
  return [dict(id=f"gsm8k/{name}/{i}", prompt=prompt.format(problem=r["question"]),
               problem=r["question"], solution=r["answer"],
               answer=r["answer"].split("####")[-1].strip()) for i, r in enumerate(rows)]


def load(split: str) -> list[dict]:
  if split not in ("train", "test"):
    raise KeyError(f"gsm8k: unknown split {split!r} (train, test)")
  return _read(f"{split}.jsonl", common.data_dir(), common.template("gsm8k", PROMPT))


TASK = common.register(common.Task("gsm8k", ("train", "test"), load, MathVerifier()))
