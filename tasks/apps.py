"""`apps`: APPS programming problems (question, solutions, input_output,
difficulty, starter_code).  Standard-input problems and call-based ones
(fn_name, starter code, LeetCode-style `class Solution`) get different
prompts.  Filter by difficulty with `configure(difficulties=...)`.
Splits: `train` and `test` are APPS's own; `validation` is every 10th train
problem (held out from `train`)."""
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


def configure(difficulties=DIFFICULTIES, files=FILES) -> None:
  global DIFFICULTIES, FILES
  DIFFICULTIES, FILES = tuple(difficulties), tuple(files)


def _record(r: dict, path: str, lineno: int, templates: tuple) -> dict:
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
  starter = r.get("starter_code") or ""
  prompt = (templates[1].format(question=r["question"], starter=starter) if io_.get("fn_name")
            else templates[0].format(question=r["question"]))
  return dict(id=f"apps/{r.get('apps_split', '?')}/{r.get('problem_id', lineno)}", prompt=prompt,
              problem=r["question"], solution=(sols[0] + "\n```") if sols else "", answer="",
              input_output=io_, difficulty=r.get("difficulty"), apps_split=r.get("apps_split"))


@functools.lru_cache(maxsize=None)
def _read(files: tuple, data_dir: str, templates: tuple):
  out = []
  for name in files:
    path = common.data_path(name)
    for i, r in enumerate(common.read_jsonl(path, {"question": str, "input_output": (dict, str)}), 1):
      out.append(_record(r, path, i, templates))
  return out


def load(split: str) -> list[dict]:
  templates = (common.template("apps", STDIN_PROMPT), common.template("apps_call", CALL_PROMPT))
  rows = [r for r in _read(FILES, common.data_dir(), templates) if r["difficulty"] in DIFFICULTIES]
  if split == "test":
    return [r for r in rows if r["apps_split"] == "test"]
  train = [r for r in rows if r["apps_split"] != "test"]
  if split == "validation":
    return train[::10]
  if split == "train":
    return [r for i, r in enumerate(train) if i % 10]
  raise KeyError(f"apps: unknown split {split!r} (train, validation, test)")


TASK = common.register(common.Task("apps", ("train", "validation", "test"), load, AppsVerifier(),
                                   stop="```"))
