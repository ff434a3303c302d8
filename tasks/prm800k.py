"""PRM800K (Lightman et al. 2023): human step labels for model solutions to MATH.

Reads both formats in `<data_dir>/prm800k` (see its README):
  - the step-wise files (`phase1_{train,test}_stepwise.jsonl.gz`, one row per
    rated candidate step after an accepted prefix), and
  - raw OpenAI records (`raw_examples*.jsonl`, one labelled trajectory each).
Both give solutions as `dict(id, problem, steps [str], ratings [+1/0/-1 or
None per step], finish_reason)`.  Splits: "train" (phase1_train), "test"
(phase1_test); "raw_train" / "raw_test" read the raw records.

A step-wise row becomes the trajectory prefix + its candidate step; the
prefix steps take the ratings their own rows gave them (a labeler-written
step, unrated in the data, counts as +1).  The final step carries its answer
as "# Answer\\n\\n<answer>", as the raw records write it.
"""
from __future__ import annotations

import os

from tasks import common

FILES = {"train": "phase1_train_stepwise.jsonl.gz", "test": "phase1_test_stepwise.jsonl.gz",
         "raw_train": "raw_examples.jsonl", "raw_test": "raw_examples_phase1_test.jsonl"}
STEPWISE_FIELDS = {"instruction": str, "responses": list, "next_response": str,
                   "is_human_response": bool}


def _rating(row: dict, path: str, line: int):
  r = row.get("rating")
  if r is None:
    return 1 if row["is_human_response"] else None
  if r not in (-1, 0, 1):
    raise ValueError(f"{path}:{line}: field 'rating' should be -1, 0, 1 or null, got {r!r}")
  return int(r)


def read_stepwise(path: str) -> list[dict]:
  rows = common.read_jsonl(path, STEPWISE_FIELDS)
  rated = {}
  for i, row in enumerate(rows, 1):
    rated.setdefault((row["instruction"], tuple(row["responses"]), row["next_response"]),
                     _rating(row, path, i))
  out = []
  for i, row in enumerate(rows, 1):
    prefix = row["responses"]
    ratings = [rated.get((row["instruction"], tuple(prefix[:k]), s)) for k, s in enumerate(prefix)]
    last = row["next_response"]
    if row.get("answer") is not None:
      last = f"{last}\n\n# Answer\n\n{row['answer']}".lstrip()
    out.append(dict(id=f"prm800k/{os.path.basename(path)}/{i}", problem=row["instruction"],
                    steps=list(prefix) + [last], ratings=ratings + [_rating(row, path, i)],
                    finish_reason=None))
  return out


def read_raw(path: str) -> list[dict]:
  """The chosen trajectory of each raw record, with its ratings (labeling stops at
  the last step that has a rated or human completion)."""
  out = []
  for i, rec in enumerate(common.read_jsonl(path, {"question": dict, "label": dict}), 1):
    steps, ratings = [], []
    for k, st in enumerate(rec["label"].get("steps") or []):
      comps, chosen, human = st.get("completions") or [], st.get("chosen_completion"), st.get("human_completion")
      if chosen is not None:
        if not 0 <= chosen < len(comps):
          raise ValueError(f"{path}:{i}: label.steps[{k}].chosen_completion {chosen} out of range")
        steps.append(comps[chosen]["text"])
        ratings.append(comps[chosen].get("rating"))
      elif human:
        steps.append(human["text"])
        ratings.append(1)
      elif comps:  # the last step, where labeling stopped: its first rated candidate
        steps.append(comps[0]["text"])
        ratings.append(comps[0].get("rating"))
        break
    out.append(dict(id=f"prm800k/{os.path.basename(path)}/{i}", problem=rec["question"]["problem"],
                    steps=steps, ratings=ratings, finish_reason=rec["label"].get("finish_reason")))
  return out


def read(split: str, data_dir: str = "") -> list[dict]:
  if split not in FILES:
    raise KeyError(f"prm800k: unknown split {split!r}; splits: {list(FILES)}")
  path = common.data_path(common.resolve_data_dir(data_dir), "prm800k", FILES[split])
  return read_raw(path) if split.startswith("raw") else read_stepwise(path)
