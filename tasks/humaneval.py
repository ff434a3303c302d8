"""`humaneval`: OpenAI HumanEval (evaluation only): the prompt is the function
signature + docstring, the completion its body."""
from __future__ import annotations

import functools

from restem_jax.verifiers import HumanEvalVerifier
from tasks import common


@functools.lru_cache(maxsize=None)
def read(split: str, data_dir: str, options=None) -> list[dict]:
  rows = common.read_jsonl(common.data_path(data_dir, "humaneval", "HumanEval.jsonl.gz"),
                           {"task_id": str, "prompt": str, "test": str, "entry_point": str})
  return [dict(id=r["task_id"], problem=r["prompt"], solution=r.get("canonical_solution", ""),
               answer="", test=r["test"], entry_point=r["entry_point"]) for r in rows]


TASK = common.Task("humaneval", ("test",), read, HumanEvalVerifier(), prompt="{problem}",
                   stop="\ndef ")
