"""The ReST^EM loop end to end (tiny config), resume after kill -9, and main's flags."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import subprocess_env
from restem_jax.sampling import SamplingConfig

# with test_multihost on one pytest-xdist worker: both use the session's tiny run
pytestmark = pytest.mark.xdist_group("tiny_run")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "gin", "restem_arith_tiny.gin")


def _cmd(run_dir):
  return [sys.executable, "-m", "restem_jax.main", f"--gin_file={TINY}", f"--gin.RUN_DIR='{run_dir}'"]


def _env():
  return subprocess_env()  # one CPU device, as a user's run


def _run(run_dir):
  r = subprocess.run(_cmd(run_dir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(run_dir, "summary.json")) as f:
    return json.load(f)


def _strip_times(summary):
  s = json.loads(json.dumps(summary))
  s.pop("wall_time_s")
  assert set(s.pop("time_split_s")) == {"sft", "validation", "evaluation", "e_step", "m_step"}
  if "best_checkpoint" in s:  # under each run's own folder
    s["best_checkpoint"] = s["best_checkpoint"].split(os.sep)[-2:]
  return s


def test_tiny_run_writes_everything(uninterrupted):
  run_dir, summary = uninterrupted
  for key in ("baseline_test_pass_at_1", "best_test_pass_at_1", "wall_time_s", "iterations"):
    assert key in summary
  assert len(summary["iterations"]) == 2
  it = summary["iterations"][0]
  for key in ("train_pass_at_1", "validation_pass_at_1", "test_pass_at_1", "train_test_gap",
              "sampled_pass_at_4", "kept_samples", "problems_solved", "transfer/arith/test_ood_pass_at_1"):
    assert key in it, key
  assert summary["baseline"]["test_pass_at_1"] > 0  # the SFT model learned something
  for name in ("report.md", "train_vs_test.png", "pass_at_k.png", "metrics.jsonl",
               "operative_config.gin", "iter_1/rollouts/batch_00000.npz", "iter_1/kept.jsonl"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  assert os.listdir(os.path.join(run_dir, "tensorboard"))
  with open(os.path.join(run_dir, "iter_1", "kept.jsonl")) as f:
    kept = [json.loads(line) for line in f]
  assert len(kept) == it["kept_samples"]
  per_problem = {}
  for k in kept:
    assert k["reward"] == 1.0
    # ids are the text's (decoded as ByteVocabulary does: a sampled byte sequence need not be UTF-8)
    assert bytes(t - 3 for t in k["completion_ids"]).decode("utf-8", errors="ignore") == k["completion"]
    per_problem.setdefault(k["id"], []).append(k["completion"])
  assert all(len(v) == len(set(v)) <= 2 for v in per_problem.values())  # distinct, <= max_per_problem
  assert it["seqio_task"] == "arith_restem_iter1"


def _kill_when(run_dir, ready, timeout=300):
  proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  t0 = time.time()
  try:
    while time.time() - t0 < timeout:
      if ready():
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
      if proc.poll() is not None:
        return False
      time.sleep(0.02)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return False


def test_killed_during_e_step_and_m_step_resumes_to_same_result(uninterrupted, tmp_path):
  _, want = uninterrupted
  run_dir = str(tmp_path / "run")
  batches = os.path.join(run_dir, "iter_1", "rollouts")
  kept = os.path.join(run_dir, "iter_1", "kept.jsonl")

  def in_e_step():
    return os.path.isdir(batches) and any(f.endswith(".npz") for f in os.listdir(batches)) \
        and not os.path.exists(kept)
  assert _kill_when(run_dir, in_e_step), "the run ended before the E-step could be interrupted"
  assert not os.path.exists(kept)
  ckpts = os.path.join(run_dir, "iter_1", "train", "checkpoints")

  def in_m_step():
    return os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)) and \
        not os.path.exists(os.path.join(run_dir, "iter_1", "eval.json"))
  assert _kill_when(run_dir, in_m_step), "the run ended before the M-step could be interrupted"
  got = _run(run_dir)
  assert _strip_times(got) == _strip_times(want)
  from restem_jax import rollouts
  files = sorted(f for f in os.listdir(batches) if f.endswith(".npz"))
  assert files == [f"batch_{b:05d}.npz" for b in range(len(files))]
  ids = np.concatenate([rollouts.load(os.path.join(batches, f)).problem_ids for f in files]).tolist()
  assert ids == [f"arith/pool/{i}" for i in range(192)]  # every problem once: none lost or duplicated


def test_evaluate_api_on_a_run_checkpoint(uninterrupted, monkeypatch):
  from restem_jax import evaluation, model
  run_dir, summary = uninterrupted
  monkeypatch.chdir(run_dir)  # a relative checkpoint path
  cfg = model.ModelConfig(vocab_size=259, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=128)
  df = evaluation.evaluate(os.path.join("iter_1", "train"), "arith", model=cfg, split="test", limit=24,
                           sc=SamplingConfig(num_samples=4, temperature=1.0, max_new_tokens=40), ks=(1, 4))
  assert len(df) == 24 and {"id", "greedy_correct", "pass@1", "pass@4", "completion"} <= set(df.columns)
  s = df.attrs["summary"]
  assert s["greedy_pass@1"] == df["greedy_correct"].mean()
  assert s["pass@4"] >= s["pass@1"]


def test_a_runs_values_and_table_read_back(uninterrupted):
  """main.run_values: the model, task and config the run file gave the run; report.frame:
  report.md's table, numbers."""
  from restem_jax import main, report
  run_dir, summary = uninterrupted
  v = main.run_values(run_dir)
  assert (v["model"].num_layers, v["model"].mlp_dim, v["model"].vocab_size) == (2, 128, 259)
  assert v["task"].name == "arith" and len(v["task"].load("test")) == 64  # the tiny file's ArithConfig.sizes
  assert v["config"].num_iterations == 2 and v["config"].eval_sampling.num_samples == 4
  df = report.frame(summary)
  assert list(df.index) == ["SFT (human data)", "ReST^EM iter 1", "ReST^EM iter 2"]
  assert df.loc["ReST^EM iter 2", "test pass@1"] == round(100 * summary["iterations"][1]["test_pass_at_1"], 1)
  assert df.loc["ReST^EM iter 1", "kept"] == summary["iterations"][0]["kept_samples"]
  with open(os.path.join(run_dir, "report.md")) as f:
    assert " | ".join(["model"] + list(df.columns)) in f.read()


def test_the_best_model_by_validation_may_be_the_start(tmp_path):
  """The starting policy competes on validation: iterations with the better test score but
  a lower validation score are not reported as a gain; a tie goes to the iteration."""
  import types
  from restem_jax import report
  row = lambda name, it, val, test: dict(name=name, iteration=it, train_pass_at_1=0.1,  # noqa: E731
                                         validation_pass_at_1=val, test_pass_at_1=test, train_test_gap=0.0)
  cfg = types.SimpleNamespace(task="arith", pass_k=(), hf_model_dir="")
  rows = [dict(row("SFT (human data)", 0, 0.175, 0.20), start=True), row("ReST^EM iter 1", 1, 0.15, 0.278),
          row("ReST^EM iter 2", 2, 0.17, 0.25)]
  s = report.write(str(tmp_path), rows, cfg, wall_time_s=1.0)
  assert (s["best_iteration"], s["improvement_points"], s["best_checkpoint"]) == (
      0, 0.0, os.path.join(str(tmp_path), "sft", "train"))
  assert "no iteration validated as high as SFT (human data)" in (tmp_path / "report.md").read_text()
  rows[2]["validation_pass_at_1"] = 0.175  # a tie with the start
  s = report.write(str(tmp_path), rows, cfg, wall_time_s=1.0)
  assert s["best_iteration"] == 2 and abs(s["improvement_points"] - 5.0) < 1e-9


@pytest.mark.parametrize("name", sorted(f[:-4] for f in os.listdir(os.path.join(ROOT, "gin")) if f.endswith(".gin")))
def test_gin_files_parse(name):
  import gin
  from restem_jax import main
  gin.clear_config()
  main.register_configurables()
  gin.add_config_file_search_path(ROOT)
  # every run file's required macros (their headers list them)
  gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", name + ".gin")],
                                      ["RUN_DIR = '/tmp/x'", "OUT = '/tmp/x'", "POLICY = '/tmp/p'"])
  fn = gin.query_parameter("execute.fn")
  assert fn.selector in ("restem_main", "eval_main", "reward_main", "best_of_n_main")
  gin.clear_config()


def test_main_rejects_unknown_flags():
  r = subprocess.run([sys.executable, "-m", "restem_jax.main", f"--gin_file={TINY}", "--bogus=1"],
                     cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert r.returncode != 0 and "unrecognised argument '--bogus=1'" in r.stderr


def test_paths_made_absolute_and_uris_untouched(tmp_path, monkeypatch):
  from restem_jax.files import absolute
  monkeypatch.chdir(tmp_path)
  assert absolute("runs/a") == str(tmp_path / "runs" / "a")
  assert absolute("gs://bucket/runs/a") == "gs://bucket/runs/a"
  assert absolute("") == ""


NO_TF = """
import sys
for name in ("tensorflow", "seqio", "tensorflow_datasets"):
  sys.modules[name] = None  # as if not installed: import fails, importlib.util.find_spec gives None
sys.path.insert(0, sys.argv[1])
import tasks
from restem_jax import restem, model, training, sampling
from tasks import arith
sizes = (("human", 64), ("pool", 32), ("validation", 16), ("test", 16), ("test_ood", 8))
task = tasks.get("arith", options=arith.ArithConfig(sizes=sizes))
cfg = restem.RestemConfig(num_iterations=1, sampling=sampling.SamplingConfig(num_samples=2, temperature=1.0,
                          max_new_tokens=24), eval_sampling=sampling.SamplingConfig(num_samples=2,
                          temperature=1.0, max_new_tokens=24), pass_k=(1, 2), sample_batch_size=16,
                          max_len=48, train_eval_size=16, workers=1, include_human_data=True)
tc = training.TrainConfig(total_steps=8, warmup_steps=1, batch_size=8, eval_every=8, checkpoint_every=8)
s = restem.run(sys.argv[2], cfg, model.ModelConfig(d_model=32, num_layers=1, mlp_dim=64), tc, tc,
               task=task, transfer=[(task, "test_ood")])
assert sys.modules["tensorflow"] is None and sys.modules["seqio"] is None
print("iterations", len(s["iterations"]), "seqio_task", s["iterations"][0]["seqio_task"])
"""


def test_loop_runs_without_tensorflow(tmp_path):
  """The accelerator image has jax but no TensorFlow/seqio: model, sampler, trainer and loop run there."""
  r = subprocess.run([sys.executable, "-c", NO_TF, ROOT, str(tmp_path / "run")], env=_env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "iterations 1 seqio_task None" in r.stdout


FROM_BASE = """
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])
import tasks
from restem_jax import restem, model, training, sampling
from tasks import arith
sizes = (("human", 64), ("pool", 32), ("validation", 16), ("test", 16), ("test_ood", 8))
task = tasks.get("arith", options=arith.ArithConfig(sizes=sizes))
sample_task = dataclasses.replace(task, prompt="Q: {problem}=")  # the E-step's own prompt
sc = sampling.SamplingConfig(num_samples=4, temperature=1.0, max_new_tokens=24)
cfg = restem.RestemConfig(num_iterations=2, sampling=sc, eval_sampling=sc, pass_k=(1, 2), sample_batch_size=16,
                          max_len=48, train_eval_size=16, workers=1, base_checkpoint=sys.argv[3],
                          human_split="human", start_from="base", sample_prompt_iterations=1, patience=2)
tc = training.TrainConfig(total_steps=6, warmup_steps=1, batch_size=8, eval_every=6, checkpoint_every=6)
m = model.ModelConfig(vocab_size=259, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=128)
s = restem.run(sys.argv[2], cfg, m, tc, tc, task=task, transfer=[(task, "test_ood", 4)], sample_task=sample_task)
print("SUMMARY", json.dumps(s))
"""


def test_restem_from_the_base_beside_sft_with_a_sampling_prompt(uninterrupted, tmp_path):
  """A given model as the base, evaluated as a row; SFT on human data as a comparison
  row; ReST^EM from the base, sampling with one prompt and training on another in
  iteration 1, and with the training prompt in iteration 2 (sample_prompt_iterations)."""
  tiny_dir, _ = uninterrupted
  run_dir = tmp_path / "run"
  r = subprocess.run([sys.executable, "-c", FROM_BASE, ROOT, str(run_dir), os.path.join(tiny_dir, "sft", "train")],
                     env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  s = json.loads(r.stdout.split("SUMMARY ", 1)[1])
  assert s["baseline"]["name"] == "base" and s["baseline"]["start"]
  assert s["base_test_pass_at_1"] == s["baseline_test_pass_at_1"] == s["base"]["test_pass_at_1"]
  assert s["sft_test_pass_at_1"] == s["sft"]["test_pass_at_1"] and s["sft"]["name"] == "SFT (human data)"
  assert s["improvement_over_base_points"] == pytest.approx(100 * (s["best_test_pass_at_1"] - s["base_test_pass_at_1"]))
  assert set(s["time_split_s"]) == {"evaluation", "sft", "validation", "e_step", "m_step"}
  t = s["time_split_s"]  # the tiny model's validation and E-step can round to 0.0 s
  assert min(t.values()) >= 0 and t["evaluation"] > 0 and sum(t.values()) <= s["wall_time_s"] + 0.5, t
  assert "| base |" in (run_dir / "report.md").read_text() and "| SFT (human data) |" in (run_dir / "report.md").read_text()
  # sampled with "Q: 3+4=", trained on "3+4=": kept.jsonl and the M-step data hold the training prompt
  from restem_jax import rollouts, vocab
  v = vocab.ByteVocabulary()
  sampled = rollouts.load(str(run_dir / "iter_1" / "rollouts" / "batch_00000.npz"))
  assert all(v.decode(sampled.prompt(i)).startswith("Q: ") for i in range(sampled.num_problems))
  kept = [json.loads(line) for line in (run_dir / "iter_1" / "kept.jsonl").read_text().splitlines()]
  assert kept, "no sample was kept: the test cannot check the training prompt"
  for k in kept:
    assert not k["prompt"].startswith("Q: ") and k["prompt_ids"] == v.encode(k["prompt"])
  assert len(s["iterations"]) == 2
  second = rollouts.load(str(run_dir / "iter_2" / "rollouts" / "batch_00000.npz"))
  assert [v.decode(second.prompt(i)) for i in range(second.num_problems)] == \
      [v.decode(sampled.prompt(i))[len("Q: "):] for i in range(sampled.num_problems)]


def test_start_from_is_checked():
  from restem_jax import restem
  with pytest.raises(ValueError, match="start_from"):
    restem.RestemConfig(start_from="scratch")


def test_runlog_times_each_kind_of_work_across_restarts(tmp_path, monkeypatch):
  from restem_jax import runlog
  clock = [1000.0]
  monkeypatch.setattr(runlog.time, "time", lambda: clock[0])
  log = runlog.RunLog(str(tmp_path))
  with log.timed("m_step"):
    clock[0] += 10
    with log.timed("validation"):  # inside the M-step: counts only as validation
      clock[0] += 3
    clock[0] += 2
  with log.timed("evaluation"):
    clock[0] += 5
  assert log.seconds() == {"m_step": 12.0, "validation": 3.0, "evaluation": 5.0}
  log.mark("evaluated")
  log.close()
  again = runlog.RunLog(str(tmp_path))  # a restarted run keeps counting
  with again.timed("m_step"):
    clock[0] += 1
  assert again.seconds() == {"m_step": 13.0, "validation": 3.0, "evaluation": 5.0}
  assert again.wall_time() == pytest.approx(20.0 + 1.0)
  with again.timed("m_step"):  # killed inside a block, with no mark since: its logged rows keep the time
    clock[0] += 4
    again("m_step", {"loss": 1.0}, step=1)
    clock[0] += 100  # lost: after the last row
  third = runlog.RunLog(str(tmp_path))
  assert third.wall_time() == pytest.approx(20.0 + 1.0 + 4.0)
  assert third.seconds()["m_step"] == 13.0 + 4.0


def test_step_filter_drops_right_answers_with_a_wrong_step():
  """`require_correct_steps`: a right answer reached through a wrong step is not kept."""
  import tasks
  from restem_jax import restem, rollouts, vocab
  v = vocab.ByteVocabulary()
  # the last: right arithmetic and the right answer, but not the problem's first operation
  texts = [["3+4=7;7*2=14\n#### 14", "3+4=8;8*2=14\n#### 14", "3+4=7;7*2=15\n#### 15", "#### 14",
            "4+3=7;7*2=14\n#### 14"]]
  ids = [[v.encode(t) for t in row] for row in texts]
  width = max(len(t) for row in ids for t in row)
  tokens = np.array([[t + [0] * (width - len(t)) for t in row] for row in ids], np.int32)
  r = rollouts.Rollouts(np.array(["p0"]), np.array([v.encode("3+4*2=")], np.int32), np.array([6], np.int32),
                        tokens, np.array([[len(t) for t in ids[0]]], np.int32), np.zeros(tokens.shape, np.float32),
                        np.array([[1.0, 1.0, 0.0, 1.0, 1.0]], np.float32), np.full((1, 5), "passed"),
                        np.array([["14", "14", "15", "14", "14"]]))
  problems = [{"id": "p0", "problem": "3+4*2"}]
  got, stats = restem.step_filter(r, tasks.get("arith"), v, problems)
  assert got.rewards.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]  # 3+4=8 is wrong; no steps at all is not a solution
  assert stats == {"step_filter_dropped": 3, "step_filter_dropped_fraction_of_correct": 3 / 4}
  with pytest.raises(ValueError, match="has no step_checker"):
    restem.step_filter(r, tasks.get("gsm8k"), v, problems)


def test_decoding_limits_shorter_than_the_reference_solutions_are_warned(caplog):
  """A split decoded with max_new_tokens shorter than its solutions can only score 0:
  the run says so, naming the setting; the pool has no solutions of its own, so the
  human split's stand for them."""
  import tasks
  from restem_jax import restem, vocab
  task = tasks.get("arith")
  human, pool = task.load("human"), task.load("pool")
  v = vocab.ByteVocabulary()
  longest = max(len(v.encode(r["solution"])) + 1 for r in human[:200])
  with caplog.at_level("WARNING"):
    out = restem.check_decode_lengths(v, [("RestemConfig.sampling.max_new_tokens", pool, 12)], human)
  assert len(out) == 1 and "RestemConfig.sampling.max_new_tokens = 12" in out[0] and out[0] in caplog.text
  assert restem.check_decode_lengths(v, [("x", pool, longest)], human) == []
  assert restem.check_decode_lengths(v, [("x", pool, 12)]) == []  # no solutions to measure: silent
