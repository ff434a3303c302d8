"""`gsm8k`: grade-school math (question, answer ending in "#### N"); used for
transfer evaluation of MATH-trained models and as a task of its own.  Splits:
train_all (7,473), train (all but its last 500), validation (those 500), test (1,319)."""
from __future__ import annotations

import functools

from restem_jax.verifiers import MathVerifier
from tasks import common

PROMPT = "Problem:\n{problem}\n\nSolution:\n"


NUM_VALIDATION = 500


@functools.lru_cache(maxsize=None)
def _read(name: str, data_dir: str) -> list[dict]:
  rows = common.read_jsonl(common.data_path(data_dir, "gsm8k", f"{name}.jsonl"),
                           {"question": str, "answer": str})
  return [dict(id=f"gsm8k/{name}/{i}", problem=r["question"], solution=r["answer"],
               answer=r["answer"].split("####")[-1].strip()) for i, r in enumerate(rows)]


def read(split: str, data_dir: str, options=None) -> list[dict]:
  """train_all: GSM8K's 7,473 training problems; train / validation: all but / only
  the last 500 of them; test: the 1,319 test problems."""
  if split == "test":
    return _read("test", data_dir)
  rows = _read("train", data_dir)
  return {"train_all": rows, "train": rows[:-NUM_VALIDATION], "validation": rows[-NUM_VALIDATION:]}[split]


TASK = common.Task("gsm8k", ("train", "validation", "train_all", "test"), read, MathVerifier(),
                   prompt=PROMPT)
