"""`gsm8k`: grade-school math (question, answer ending in "#### N"); used for
transfer evaluation of MATH-trained models and as a task of its own."""
from __future__ import annotations

import functools

from restem_jax.verifiers import MathVerifier
from tasks import common

PROMPT = "Problem:\n{problem}\n\nSolution:\n"


@functools.lru_cache(maxsize=None)
def read(split: str, data_dir: str, options=None) -> list[dict]:
  rows = common.read_jsonl(common.data_path(data_dir, "gsm8k", f"{split}.jsonl"),
                           {"question": str, "answer": str})
  return [dict(id=f"gsm8k/{split}/{i}", problem=r["question"], solution=r["answer"],
               answer=r["answer"].split("####")[-1].strip()) for i, r in enumerate(rows)]


TASK = common.Task("gsm8k", ("train", "test"), read, MathVerifier(), prompt=PROMPT)
