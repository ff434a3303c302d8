"""Tasks as values: the built-in arith generator, real data, bad input, prompts."""
import dataclasses
import json

import pytest

import tasks
from tasks import arith


def test_arith_is_deterministic_and_splits_are_disjoint():
  a = {s: tasks.get("arith").load(s) for s in arith.TASK.splits}
  arith._all_splits.cache_clear()
  b = {s: tasks.get("arith", options=arith.ArithConfig()).load(s) for s in arith.TASK.splits}
  assert a == b
  seen = {}
  for split, rows in a.items():
    for r in rows:
      assert r["problem"] not in seen, (r["problem"], split, seen.get(r["problem"]))
      seen[r["problem"]] = split
  assert all(r["num_ops"] == 4 for r in a["test_ood"])
  assert all(r["solution"] == "" for r in a["pool"])


def test_arith_solutions_are_checkable_and_graded_correct():
  from restem_jax.verifiers import MathVerifier
  for r in tasks.get("arith").load("human")[:200]:
    assert all(arith.check_steps(r["solution"])) and all(arith.check_steps(r["solution"], r))
    assert MathVerifier()(r, r["solution"]).reward == 1.0
    # left-to-right semantics
    nums = [int(x) for x in r["problem"].replace("+", " ").replace("-", " ").replace("*", " ").split()]
    ops = [c for c in r["problem"] if c in "+-*"]
    acc = nums[0]
    for op, n in zip(ops, nums[1:]):
      acc = acc + n if op == "+" else acc - n if op == "-" else acc * n
    assert str(acc) == r["answer"]
  assert arith.check_steps("3+3=7;7*8=56\n#### 56") == [False, True]
  assert arith.check_steps("3+3=6;5*8=40\n#### 40") == [True, False]  # does not chain
  # given the problem: each step is its next operation, from its first operand
  assert arith.check_steps("3*8=24;24+3=27\n#### 27", {"problem": "3+3*8"}) == [False, False]
  assert arith.check_steps("3+3=6;6*8=48;48-1=47\n#### 47", {"problem": "3+3*8"}) == [True, True, False]
  with pytest.raises(ValueError, match="not an expression"):
    arith.operations("3+")


def test_arith_difficulty_knobs():
  cfg = arith.ArithConfig(min_ops=1, max_ops=1, ood_ops=2, max_operand=5, max_value=30,
                          sizes=(("human", 10), ("pool", 10), ("validation", 5), ("test", 5), ("test_ood", 5)))
  rows = tasks.get("arith", options=cfg).load("pool")
  assert len(rows) == 10 and all(r["num_ops"] == 1 for r in rows)
  assert all(0 <= int(r["answer"]) <= 30 for r in rows)
  assert len(tasks.get("arith").load("pool")) == 3000  # the default task is untouched


def test_real_data_tasks_load(shared_data):
  assert len(tasks.get("math").load("test")) == 500
  assert len(tasks.get("math").load("train")) + len(tasks.get("math").load("validation")) == 12000
  assert len(tasks.get("gsm8k").load("test")) == 1319
  assert len(tasks.get("humaneval").load("test")) == 164
  apps = tasks.get("apps").load("train") + tasks.get("apps").load("validation") + tasks.get("apps").load("test")
  assert len(apps) == 112 + 107
  call = [r for r in apps if r["input_output"].get("fn_name")]
  assert call and all("Call-Based" in r["prompt"] for r in call)


def test_bad_files_name_file_line_and_field(tmp_path):
  (tmp_path / "math").mkdir()
  (tmp_path / "math" / "test.jsonl").write_text(
      json.dumps({"problem": "1+1", "solution": "2", "answer": "2"}) + "\n" +
      json.dumps({"problem": "2+2", "solution": "4"}) + "\n")
  with pytest.raises(ValueError, match=r"test.jsonl:2: missing field 'answer'"):
    tasks.get("math", data_dir=str(tmp_path)).load("test")
  (tmp_path / "gsm8k").mkdir()
  (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
  with pytest.raises(ValueError, match=r"test.jsonl:2: invalid JSON"):
    tasks.get("gsm8k", data_dir=str(tmp_path)).load("test")
  with pytest.raises(FileNotFoundError, match="humaneval"):
    tasks.get("humaneval", data_dir=str(tmp_path)).load("test")
  with pytest.raises(KeyError, match="unknown split 'dev'"):
    tasks.get("math").load("dev")
  with pytest.raises(ValueError, match="unknown difficulties"):
    tasks.get("apps", options=("easy",)).load("test")


def test_prompts_are_task_values(shared_data):
  custom = tasks.get("arith", prompt="Q: {problem}\nA: ")
  assert custom.load("test")[0]["prompt"].startswith("Q: ")
  assert tasks.get("arith").load("test")[0]["prompt"].endswith("=")  # the default is untouched
  with pytest.raises(ValueError, match="names field 'question'"):
    tasks.get("gsm8k", prompt="{question}").load("test")
  chat = dataclasses.replace(tasks.get("gsm8k"), prompt=lambda r: f"<user>{r['problem']}</user>")
  assert chat.load("test")[0]["prompt"].startswith("<user>Janet")


def test_apps_difficulty_filter(shared_data):
  intro = tasks.get("apps", options=("introductory",))
  rows = intro.load("train") + intro.load("test")
  assert rows and all(r["difficulty"] == "introductory" for r in rows)
  assert len(rows) < len(tasks.get("apps").load("train") + tasks.get("apps").load("test"))
