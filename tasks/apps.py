"""`apps`: APPS programming problems (question, solutions, input_output,
difficulty, starter_code).  Standard-input problems and call-based ones
(fn_name, starter code, LeetCode-style `class Solution`) get different
prompts.  Filter by difficulty with `options` (a tuple of difficulties, e.g.
`tasks.get("apps", options=("introductory",))`).  Splits: `train` and `test`
are APPS's own; `validation` is every 10th train problem (held out from
`train`)."""
from __future__ import annotations

import functools
import json

from restem_jax.verifiers import AppsVerifier
from tasks import common

FILES = ("apps/apps_subset.jsonl", "apps/apps_subset_b.jsonl")
STDIN_PROMPT = ("QUESTION:\n{question}\n\nUse Standard Input format. Write a Python program.\n"
                "ANSWER:\n```python\n")
CALL_PROMPT = ("QUESTION:\n{question}\n\nUse Call-Based format. Complete this code:\n{starter}\n"
               "ANSWER:\n```python\n")
DIFFICULTIES = ("introductory", "interview", "competition")


def prompt(record: dict) -> str:
  """The APPS paper's prompt: call-based problems show their starter code."""
  if record["input_output"].get("fn_name"):
    return CALL_PROMPT.format(question=record["problem"], starter=record["starter_code"])
  return STDIN_PROMPT.format(question=record["problem"])


def _record(r: dict, path: str, lineno: int) -> dict:
  io_ = r["input_output"]
  if isinstance(io_, str):  # original APPS files store JSON strings
    try:
      io_ = json.loads(io_)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: field 'input_output': invalid JSON ({e.msg})") from None
  if not isinstance(io_, dict) or "inputs" not in io_ or "outputs" not in io_:
    raise ValueError(f"{path}:{lineno}: field 'input_output' needs 'inputs' and 'outputs'")
  sols = r.get("solutions") or []
  if isinstance(sols, str):
    sols = json.loads(sols) if sols.strip() else []
  return dict(id=f"apps/{r.get('apps_split', '?')}/{r.get('problem_id', lineno)}",
              problem=r["question"], starter_code=r.get("starter_code") or "",
              solution=(sols[0] + "\n```") if sols else "", answer="", input_output=io_,
              difficulty=r.get("difficulty"), apps_split=r.get("apps_split"))


@functools.lru_cache(maxsize=None)
def _read_files(data_dir: str):
  out = []
  for name in FILES:
    path = common.data_path(data_dir, name)
    for i, r in enumerate(common.read_jsonl(path, {"question": str, "input_output": (dict, str)}), 1):
      out.append(_record(r, path, i))
  return out


def read(split: str, data_dir: str, options: tuple | None) -> list[dict]:
  difficulties = tuple(options or DIFFICULTIES)
  unknown = set(difficulties) - set(DIFFICULTIES)
  if unknown:
    raise ValueError(f"apps: unknown difficulties {sorted(unknown)}; known: {DIFFICULTIES}")
  rows = [r for r in _read_files(data_dir) if r["difficulty"] in difficulties]
  if split == "test":
    return [r for r in rows if r["apps_split"] == "test"]
  train = [r for r in rows if r["apps_split"] != "test"]
  return train[::10] if split == "validation" else [r for i, r in enumerate(train) if i % 10]


TASK = common.Task("apps", ("train", "validation", "test"), read, AppsVerifier(), prompt=prompt,
                   options=DIFFICULTIES, stop="```")
