"""`humaneval`: OpenAI HumanEval (evaluation only): the prompt is the function
signature + docstring, the completion its body."""
from __future__ import annotations

import functools

from restem_jax.verifiers import HumanEvalVerifier
from tasks import common


@functools.lru_cache(maxsize=None)
def _read(data_dir: str):
  rows = common.read_jsonl(common.data_path("humaneval", "HumanEval.jsonl.gz"),
                           {"task_id": str, "prompt": str, "test": str, "entry_point": str})
  return [dict(id=r["task_id"], prompt=r["prompt"], solution=r.get("canonical_solution", ""),
               answer="", test=r["test"], entry_point=r["entry_point"]) for r in rows]


def load(split: str) -> list[dict]:
  if split != "test":
    raise KeyError(f"humaneval: only a 'test' split (got {split!r})")
  return _read(common.data_dir())


TASK = common.register(common.Task("humaneval", ("test",), load, HumanEvalVerifier(),
                                   stop="\ndef "))
