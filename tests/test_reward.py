"""Reward models: step labels on tokens, first-negative cut-off, no leakage, score
reductions, best-of-N against brute force, the PRM800K readers, a tiny run."""
import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from conftest import assert_close
from restem_jax import best_of_n, gguf, model, reward, vocab
from restem_jax.reward import NEGATIVE, POSITIVE
from tasks import prm800k

BYTES = vocab.ByteVocabulary()
# one pytest-xdist worker for the module: its runs share one trained policy and one PRM run
pytestmark = pytest.mark.xdist_group("reward")


@pytest.fixture(scope="module")
def bpe():
  return vocab.HFTokenizerVocabulary(gguf.smollm2_path())


def test_arith_step_labels_land_on_each_steps_last_token():
  task = tasks.get("arith")
  text = "3+3=6;6*8=47;47+4=51\n#### 51"
  comp = BYTES.encode(text)
  spans = reward.step_spans(text, task.step_separator)
  assert [text[a:b] for a, b in spans] == ["3+3=6", "6*8=47", "47+4=51", "#### 51"]
  labels = [reward.RATING_TO_CLASS[x] for x in task.step_labels(text, spans, False, {"problem": "3+3*8+4"})]
  assert labels == [POSITIVE, NEGATIVE, POSITIVE, NEGATIVE]  # 47+4=51 is right arithmetic, and the next step
  # a step is right only as the problem's next operation: 3*8=24 is arithmetic, not this problem's
  other = "3*8=24;24+3=27;27+4=31\n#### 31"
  other_spans = reward.step_spans(other, task.step_separator)
  assert task.step_labels(other, other_spans, False, {"problem": "3+3*8+4"}) == [-1, -1, 1, -1]  # each step judged from the one before
  assert task.step_labels(other, other_spans, False, {"problem": "3*8+3+4"}) == [1, 1, 1, -1]
  too_many = "3+3=6;6*8=48;48+4=52;52+1=53\n#### 53"
  assert task.step_labels(too_many, reward.step_spans(too_many, task.step_separator), False,
                          {"problem": "3+3*8+4"}) == [1, 1, 1, -1, -1]
  ex = reward.prm_example([9, 9], comp, reward.char_ends(BYTES, comp), spans, labels)
  # trained through the first wrong step only, and on its last character ("7" of 47)
  assert ex.labels == (POSITIVE, NEGATIVE)
  assert [text[p] for p in ex.positions] == ["6", "7"] and ex.positions == (4, 11)


def test_bpe_label_lands_on_a_token_merged_across_the_separator(bpe):
  steps = ["f(2)=3)", "g(3)=4", "so h=7"]
  ex = reward.from_steps(bpe.encode("Q"), steps, [1, -1, 1], bpe, separator=";")
  text = ";".join(steps)
  ids, offsets = bpe.encode_with_offsets(text)
  assert list(ex.completion) == ids
  first = offsets[ex.positions[0]]
  # the tokenizer merges ")" and ";" into one token: the label sits on it
  assert text[first[0]:first[1]] == ");" and first[0] <= len(steps[0]) - 1 < first[1]
  second = offsets[ex.positions[1]]
  assert second[0] <= len("f(2)=3);g(3)=4") - 1 < second[1]
  assert ex.labels == (POSITIVE, NEGATIVE)  # cut after the first negative step


def test_bpe_sampled_ids_map_through_decoded_offsets(bpe):
  text = "We get 12.\nSo 12+3=15.\n#### 15"
  ids = bpe.encode(text)
  spans = reward.step_spans(text)
  ex = reward.prm_example([1], ids, reward.char_ends(bpe, ids), spans, [POSITIVE] * 3)
  for (a, b), p in zip(spans, ex.positions):
    assert bpe.decode(ids[:p + 1]).endswith(text[b - 1]) and len(bpe.decode(ids[:p + 1])) == b


def test_packed_inputs_carry_no_labels():
  comp = BYTES.encode("1+1=2;2+2=5\n#### 5")
  spans = reward.step_spans(BYTES.decode(comp), r"[;\n]+")
  ends = reward.char_ends(BYTES, comp)
  a = reward.pack([reward.prm_example([7, 8], comp, ends, spans, [POSITIVE, NEGATIVE, NEGATIVE])], 40)
  b = reward.pack([reward.prm_example([7, 8], comp, ends, spans, [POSITIVE, POSITIVE, POSITIVE])], 40)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert list(a["tokens"][0, :2 + len(comp)]) == [7, 8] + comp and not a["tokens"][0, 2 + len(comp):].any()
  assert a["label_mask"].sum() == 2 and b["label_mask"].sum() == 3
  np.testing.assert_array_equal(np.nonzero(a["label_mask"][0])[0], 2 + np.array([4, 10]))


def test_orm_labels_every_completion_token():
  ex = reward.orm_example([5, 6], [10, 11, 12], correct=False)
  batch = reward.pack([ex], 8)
  assert list(np.nonzero(batch["label_mask"][0])[0]) == [2, 3, 4]
  assert (batch["labels"][0, 2:5] == NEGATIVE).all()


def test_score_reductions():
  probs = np.array([[0.1, 0.1, 0.8], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
  assert reward.reduce_steps(probs) == pytest.approx(0.9 * 0.8 * 0.4)
  assert reward.reduce_steps(probs, neutral_is_correct=False) == pytest.approx(0.8 * 0.5 * 0.3)
  assert reward.reduce_steps(probs, "min") == pytest.approx(0.4)
  assert reward.first_wrong_step(probs) == 2 and reward.first_wrong_step(probs[:2]) == -1
  with pytest.raises(ValueError, match="reduction"):
    reward.reduce_steps(probs, "mean")


def test_reward_model_head_and_loss_shapes():
  cfg = model.ModelConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64)
  params = nn.unbox(reward.init_params(cfg, jax.random.key(0)))
  assert params["head"]["kernel"].shape == (32, 3)
  batch = reward.pack([reward.orm_example([5, 6], [10, 11], True)], 8)
  total, weight, aux = reward.loss(cfg)(params, jax.tree.map(jnp.asarray, batch))
  assert weight == 2 and total > 0 and 0 <= aux["accuracy"] <= 2
  # the logits at a position do not depend on later tokens (a causal reward model)
  t = jnp.asarray(batch["tokens"])
  a = reward.apply(cfg, params, t)
  b = reward.apply(cfg, params, t.at[0, 5].set(99))
  # one compiled program and one batch shape: a later token enters earlier positions only
  # through attention weights that the causal mask makes exactly 0, so a few eps at most
  assert_close(a[0, :5], b[0, :5], 4)


def test_packed_reward_model_losses_equal_unpacked():
  """ORM labels on every completion token and PRM labels on steps' last tokens (cut
  after the first negative): the same loss sums and gradients packed several to a row."""
  from restem_jax import training
  cfg = model.ModelConfig(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64)
  params = nn.unbox(reward.init_params(cfg, jax.random.key(0)))
  rng = np.random.RandomState(0)
  examples = []
  for i in range(10):
    prompt = list(rng.randint(3, 250, rng.randint(2, 6)))
    comp = list(rng.randint(3, 250, rng.randint(3, 16)))
    if i % 2:
      examples.append(reward.orm_example(prompt, comp, bool(i % 4 == 1)))
    else:
      ends = sorted(rng.choice(np.arange(1, len(comp) + 1), 3, replace=False))
      spans = [(0, int(e)) for e in ends]
      examples.append(reward.prm_example(prompt, comp, list(range(1, len(comp) + 1)), spans,
                                         list(rng.choice([NEGATIVE, 1, POSITIVE], 3))))
  data = reward.pack(examples, 24)
  packed = training.pack_rows(data)
  assert len(packed["tokens"]) < len(data["tokens"])
  fn = reward.loss(cfg)
  sums = jax.jit(lambda p, b: fn(p, b)[:2])
  grad = jax.jit(jax.grad(lambda p, b: fn(p, b)[0]))
  # float32, the same per-position terms summed in another order with other numbers of
  # exactly-masked keys (see test_training.test_packed_loss_and_gradients_equal_unpacked)
  assert_close(sums(params, packed), sums(params, data), 64)
  assert float(sums(params, data)[1]) == data["label_mask"].sum()
  jax.tree.map(lambda a, b: assert_close(a, b, 64), grad(params, packed), grad(params, data))


def test_scores_in_length_buckets_equal_full_width_rows():
  """`scores` runs rows sorted by length, each chunk cut to its longest row: the
  same class probabilities as every row at max_len (a causal model)."""
  cfg = model.ModelConfig(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64)
  params = nn.unbox(reward.init_params(cfg, jax.random.key(1)))
  rng = np.random.RandomState(1)
  examples = []
  for i in range(40):
    prompt, comp = list(rng.randint(3, 250, rng.randint(2, 8))), list(rng.randint(3, 250, rng.randint(1, 60)))
    spans = [(0, int(e)) for e in sorted(rng.choice(np.arange(1, len(comp) + 1), min(3, len(comp)), replace=False))]
    examples.append(reward.prm_example(prompt, comp, list(range(1, len(comp) + 1)), spans, None))
  max_len = 48  # some rows are cut
  s, per = reward.scores(cfg, params, examples, "prm", max_len=max_len, batch_size=8)
  tokens, where = reward.positions_batch(examples, max_len)
  full = np.asarray(jax.nn.softmax(reward.apply(cfg, params, jnp.asarray(tokens)), -1))
  for r, ex in enumerate(examples):
    want = full[r, where[r]]
    assert per[r].shape == want.shape
    # float32 probabilities of one model at other batch shapes (XLA may pick other kernels)
    assert_close(per[r], want, 64)
    assert_close(s[r], reward.reduce_steps(want), 64 * max(1, len(want)))


def _brute_force(correct, answers, scores, n):
  """Independent reference: every subset, explicit tie handling."""
  m = len(correct)
  acc = {"pass@N": [], "majority": [], "RM": [], "RM-weighted": []}
  for sub in itertools.combinations(range(m), n):
    acc["pass@N"].append(any(correct[i] for i in sub))
    for name, w in (("majority", [1.0] * m), ("RM-weighted", scores)):
      tot = {}
      for i in sub:
        if answers[i] is not None:
          tot[answers[i]] = tot.get(answers[i], 0) + w[i]
      if not tot:
        acc[name].append(0.0)
        continue
      top = [a for a, t in tot.items() if abs(t - max(tot.values())) < 1e-9]
      acc[name].append(np.mean([any(correct[i] for i in sub if answers[i] == a) for a in top]))
    best = max(scores[i] for i in sub)
    acc["RM"].append(np.mean([correct[i] for i in sub if scores[i] == best]))
  return {k: 100 * np.mean(v) for k, v in acc.items()}


def test_best_of_n_matches_brute_force_and_subsampling_converges():
  rng = np.random.default_rng(0)
  p, m = 5, 7
  answers = [[rng.choice(["1", "2", "3", None]) for _ in range(m)] for _ in range(p)]
  correct = np.array([[a == "1" for a in row] for row in answers])
  scores = np.round(rng.random((p, m)), 1)  # rounding makes ties
  exact = best_of_n.table(correct, answers, {"RM": scores}, ns=[1, 2, 3, 7], num_subsets=10**6)
  for n in (1, 2, 3, 7):
    ref = {k: np.mean([_brute_force(correct[i], answers[i], scores[i], n)[k] for i in range(p)])
           for k in ("pass@N", "majority", "RM", "RM-weighted")}
    for k, v in ref.items():
      assert exact.loc[n, k] == pytest.approx(v), (n, k)
  sampled = best_of_n.table(correct, answers, {"RM": scores}, ns=[3], num_subsets=4000, seed=1)
  for k in ("pass@N", "majority", "RM", "RM-weighted"):
    assert sampled.loc[3, k] == pytest.approx(exact.loc[3, k], abs=2.5)
  with pytest.raises(ValueError, match="larger than the pool"):
    best_of_n.table(correct, answers, {}, ns=[8])


def test_prm800k_readers_on_the_shared_files():
  test = prm800k.read("test")
  assert len(test) == 5449 and len({r["problem"] for r in test}) == 101
  # the candidate's own rating is the last one; its prefix takes its rows' ratings
  last = [r["ratings"][-1] for r in test]
  assert (last.count(1), last.count(0), last.count(-1)) == (2245 + 257, 867, 1970)  # human steps -> +1
  second = next(r for r in test if len(r["steps"]) == 2)
  first_row = next(r for r in test if r["problem"] == second["problem"] and len(r["steps"]) == 1
                   and r["steps"][0] == second["steps"][0])
  assert second["ratings"][0] == first_row["ratings"][0]
  assert any(r["steps"][-1].count("# Answer") == 1 for r in test)
  raw = prm800k.read("raw_train")
  assert len(raw) == 11 and all(len(r["steps"]) == len(r["ratings"]) > 0 for r in raw)
  assert {r["finish_reason"] for r in raw} == {"solution", "found_error"}
  found_error = [r for r in raw if r["finish_reason"] == "found_error"]
  assert all(r["ratings"][-1] == -1 for r in found_error)


def test_prm800k_bad_rating_names_file_and_line(tmp_path):
  folder = tmp_path / "prm800k"
  folder.mkdir()
  row = dict(instruction="q", responses=[], next_response="s", answer=None, is_human_response=False,
             is_solution=False, is_preferred_response=True, rating=1)
  with gzip.open(folder / prm800k.FILES["test"], "wt") as f:
    f.write(json.dumps(row) + "\n" + json.dumps(dict(row, rating=5)) + "\n")
  with pytest.raises(ValueError, match=r"phase1_test_stepwise.jsonl.gz:2: field 'rating'"):
    prm800k.read("test", str(tmp_path))


def test_prm800k_examples_tokenize_with_offsets(bpe):
  rec = prm800k.read("test")[1]
  ex = reward.from_steps(bpe.encode(rec["problem"]), rec["steps"], rec["ratings"], bpe)
  text = "\n".join(rec["steps"])
  ids, offsets = bpe.encode_with_offsets(text)
  ends = np.cumsum([len(s) + 1 for s in rec["steps"]]) - 1
  for p, e, s in zip(ex.positions, ends, rec["steps"]):
    a, b = offsets[p]
    assert a < e - (len(s) - len(s.rstrip())) <= b


def test_prm800k_subset_draws_problems_and_rows_at_random():
  from restem_jax import reward_data
  task = tasks.get("math")
  recs = prm800k.read("test")
  by_problem = {}
  for r in recs:
    by_problem.setdefault(r["problem"], []).append(r)
  picked = reward_data.prm800k_examples(task, BYTES, "test", 7, 2, seed=3)
  assert len(picked) == 14  # 7 problems, 2 solutions each (every test problem has more)
  again = reward_data.prm800k_examples(task, BYTES, "test", 7, 2, seed=3)
  assert [e.completion for e in picked] == [e.completion for e in again]
  other = reward_data.prm800k_examples(task, BYTES, "test", 7, 2, seed=4)
  assert [e.completion for e in picked] != [e.completion for e in other]
  # the problems are not simply the first 7 of the file
  first = reward_data.prm800k_examples(task, BYTES, "test", 0, 0)[:sum(len(v) for v in list(by_problem.values())[:7])]
  assert {e.prompt for e in picked} != {e.prompt for e in first}
  assert len({e.prompt for e in picked}) == 7


def test_first_wrong_step_metric_skips_truncated_solutions():
  from restem_jax import reward_metrics
  ex = [reward.Labelled((1,), (2, 3, 4), (0, 1, 2), (POSITIVE, POSITIVE, NEGATIVE)),
        reward.Labelled((1,), (2, 3), (0, 1), (POSITIVE, NEGATIVE))]
  probs = lambda *neg: np.array([[n, 0.0, 1 - n] for n in neg])  # noqa: E731  [NEG, NEU, POS]
  # the first solution's negative step fell past max_len: only 2 of its 3 positions scored
  m = reward_metrics.step_metrics([probs(0.1, 0.2), probs(0.1, 0.9)], ex)
  assert m["solutions"] == 1 and m["truncated_solutions"] == 1
  assert m["first_wrong_step_accuracy"] == 100.0 and m["always_none_baseline"] == 0.0
  assert m["negative_step_auroc"] == 1.0  # the wrong step has the highest P(NEGATIVE)
  m = reward_metrics.step_metrics([probs(0.1, 0.2, 0.3), probs(0.5, 0.4)], ex)
  # wrong steps 0.3 and 0.4 against 0.1, 0.2, 0.5: 4 of the 6 pairs ranked right
  assert m["solutions"] == 2 and m["negative_step_auroc"] == pytest.approx(4 / 6)


TINY = ["ArithConfig.sizes = (('human', 200), ('pool', 48), ('validation', 16), ('test', 24), ('test_ood', 8))",
        "SamplingConfig.num_samples = 4", "TrainConfig.total_steps = 60", "TrainConfig.warmup_steps = 5",
        "TrainConfig.eval_every = 30", "TrainConfig.checkpoint_every = 10", "TrainConfig.batch_size = 16",
        "TrainConfig.log_every = 10", "RewardConfig.sample_batch_size = 16"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY_SCRIPT = """
import sys
from restem_jax import model, partitioning, restem, training, vocab
import tasks
cfg = model.ModelConfig(vocab_size=259, d_model=64, num_layers=3, num_heads=4, num_kv_heads=4, mlp_dim=256)
data = restem.human_examples(tasks.get("arith"), "human", vocab.ByteVocabulary(), 64)
training.train(cfg, training.TrainConfig(total_steps=150, warmup_steps=10, batch_size=32, learning_rate=3e-3,
               checkpoint_every=150), data, sys.argv[1], partitioning.make_mesh())
"""


def _env():
  return dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)  # one CPU device, as a user's run


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
  """A policy SFT-trained for a few steps on arith's worked solutions (the gin files' architecture)."""
  workdir = str(tmp_path_factory.mktemp("policy") / "train")
  subprocess.run([sys.executable, "-c", POLICY_SCRIPT, workdir], cwd=ROOT, env=_env(), check=True,
                 timeout=600)
  return workdir


def _cmd(gin_file, run_dir, policy, *extra):
  return [sys.executable, "-m", "restem_jax.main", f"--gin_file={gin_file}", f"--gin.RUN_DIR='{run_dir}'",
          f"--gin.POLICY='{policy}'", *[f"--gin_bindings={b}" for b in TINY + list(extra)]]


def _run(*args):
  r = subprocess.run(_cmd(*args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(args[1], "summary.json")) as f:
    summary = json.load(f)
  summary.pop("wall_time_s")
  return summary


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory, tiny_policy):
  """The tiny PRM run, uninterrupted: (run_dir, summary)."""
  prm_dir = str(tmp_path_factory.mktemp("prm") / "prm")
  return prm_dir, _run("gin/train_prm.gin", prm_dir, tiny_policy)


def test_tiny_prm_orm_and_best_of_n(tmp_path, tiny_policy, prm_run):
  orm_dir, bon_dir = (str(tmp_path / n) for n in ("orm", "bon"))
  prm_dir, prm = prm_run
  assert prm["data"]["train_solutions"] == 48 * 4 and prm["data"]["train_negative_share"] > 0
  assert prm["test"]["solutions"] > 0 and 0 <= prm["test"]["first_wrong_step_accuracy"] <= 100
  # the policy samples behind its own prompt ("Q: 3+4="); the ORM reads "3+4=" + the sample
  orm = _run("gin/train_orm.gin", orm_dir, tiny_policy, "RewardConfig.active_samples = 6",
             "reward_main.sample_prompt = 'Q: {problem}='")
  assert orm["kind"] == "orm" and 0 <= orm["test"]["solution_accuracy"] <= 100
  from restem_jax import rollouts
  sampled = rollouts.load(os.path.join(orm_dir, "rollouts", "pool", "batch_00000.npz"))
  problem = tasks.get("arith").load("pool")[0]["problem"]
  assert BYTES.decode(sampled.prompt(0)) == f"Q: {problem}="
  al = orm["active_learning"]
  assert al["pool_samples"] == 48 * 6 and 0 < al["selected"] <= 48 * 2
  for name in ("convincing_wrong", "random"):
    assert 0 <= al[name]["test"]["solution_accuracy"] <= 100
  summary = _run("gin/best_of_n.gin", bon_dir, tiny_policy, f"ORM='{orm_dir}/train'",
                 f"PRM='{prm_dir}/train'", "pool/SamplingConfig.num_samples = 8", "filter/RestemConfig.pass_k = (1,)",
                 "mstep/TrainConfig.total_steps = 20", "filter/RestemConfig.mstep_epochs = 0.0",
                 "filter/RestemConfig.sample_batch_size = 16", "best_of_n_main.sample_prompt = 'Q: {problem}='")
  pool = rollouts.load(os.path.join(bon_dir, "rollouts", "test", "batch_00000.npz"))
  assert BYTES.decode(pool.prompt(0)).startswith("Q: ")
  # the PRM's first wrong step located on every pool sample (exact labels) or answered "none"
  fws = summary["first_wrong_step"]
  assert 0 < fws["solutions"] + fws["truncated_solutions"] <= 24 * 8 and 0 <= fws["first_wrong_step_accuracy"] <= 100
  kept = []  # the PRM may drop every sample of its arm: the two arms together
  for arm in ("without", "with"):
    with open(os.path.join(bon_dir, f"restem_{arm}_prm_filter", "iter_1", "kept.jsonl")) as f:
      kept += [json.loads(line) for line in f]
  assert kept and all(BYTES.decode(k["prompt_ids"]) == k["prompt"] and not k["prompt"].startswith("Q:")
                      for k in kept)
  table = summary["best_of_n"]
  assert table["N"] == [1, 2, 4, 8] and summary["pool"] == 8 and summary["problems"] == 24
  methods = ("majority", "orm", "prm", "orm_weighted", "prm_weighted")
  for i in range(4):  # nothing beats pass@N; at N = 1 every method is the same
    assert all(table[k][i] <= table["pass_at_n"][i] + 1e-9 for k in methods)
  assert len({table[k][0] for k in methods + ("pass_at_n",)}) == 1
  assert os.path.getsize(os.path.join(bon_dir, "best_of_n.png")) > 10_000
  assert set(summary["reward_models"]) == {"ORM", "PRM"}
  pf = summary["prm_filter"]
  assert pf["with"]["kept_samples"] + pf["with"]["prm_dropped"] >= pf["without"]["kept_samples"] - 1e-9
  assert pf["without"]["prm_dropped"] == 0 and pf["with"]["test_pass_at_1_before"] == pf["without"]["test_pass_at_1_before"]
  # a second start of a finished run redoes nothing and reports the same
  assert _run("gin/train_prm.gin", prm_dir, tiny_policy) == prm


def test_prm_run_killed_during_training_resumes_to_the_same_result(tmp_path, tiny_policy, prm_run):
  ref = prm_run[1]
  run_dir = str(tmp_path / "killed")
  proc = subprocess.Popen(_cmd("gin/train_prm.gin", run_dir, tiny_policy), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = os.path.join(run_dir, "train", "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(run_dir, "summary.json")), "killed too late to test resume"
  assert _run("gin/train_prm.gin", run_dir, tiny_policy) == ref


def _rollouts(texts_per_problem, rewards):
  from restem_jax import rollouts
  rows = [[BYTES.encode(t) for t in ts] for ts in texts_per_problem]
  width = max(len(t) for ts in rows for t in ts)
  toks = np.zeros((len(rows), len(rows[0]), width), np.int32)
  lengths = np.zeros(toks.shape[:2], np.int32)
  for i, ts in enumerate(rows):
    for j, t in enumerate(ts):
      toks[i, j, :len(t)], lengths[i, j] = t, len(t)
  prompts = np.array([BYTES.encode("1+2*3=")] * len(rows), np.int32)
  return rollouts.Rollouts(
      problem_ids=np.array([f"p{i}" for i in range(len(rows))]), prompt_tokens=prompts,
      prompt_lengths=np.full(len(rows), prompts.shape[1], np.int32), tokens=toks, lengths=lengths,
      logprobs=np.zeros(toks.shape, np.float32), rewards=np.asarray(rewards, np.float32),
      statuses=np.full(lengths.shape, "ok"), answers=np.full(lengths.shape, "9"))


@pytest.mark.parametrize("bias, dropped", [((0.0, 0.0, 8.0), 0), ((8.0, 0.0, 0.0), 3)])
def test_prm_filter_drops_correct_samples_the_prm_scores_low(bias, dropped):
  from restem_jax import restem
  cfg = model.ModelConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64)
  params = nn.unbox(reward.init_params(cfg, jax.random.key(0)))
  params["head"] = {"kernel": jnp.zeros((32, 3)), "bias": jnp.asarray(bias)}
  r = _rollouts([["1+2=3;3*3=9\n#### 9", "1+2=4;4*3=9\n#### 9"], ["1+2=3;3*3=9\n#### 9", "x\n#### 8"]],
                [[1.0, 1.0], [1.0, 0.0]])
  out, stats = restem.prm_filter(r, cfg, params, tasks.get("arith"), BYTES, 0.5, 64)
  assert stats["prm_dropped"] == dropped and int((out.rewards > 0).sum()) == 3 - dropped
  assert out.rewards[1, 1] == 0 and (out.tokens == r.tokens).all()


def test_convincing_wrong_answers_are_the_top_scored_wrong_ones():
  scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.2, 0.3, 0.4, 0.5]])
  correct = np.array([[True, False, False, False], [True, True, True, True]])
  mask = reward.convincing_wrong(scores, correct, 2)
  np.testing.assert_array_equal(mask, [[False, True, True, False], [False] * 4])


def test_monte_carlo_step_labels_agree_with_exact_ones_on_arith(tmp_path, tiny_policy):
  """Math-Shepherd labels (completions from each step's prefix) against arith's exact labels."""
  summary = _run("gin/train_prm.gin", str(tmp_path / "mc"), tiny_policy, "RewardConfig.labels = 'mc'",
                 "RewardConfig.mc_rollouts = 4", "TrainConfig.total_steps = 20")
  agree = summary["data"]["mc_agreement_with_exact"]
  assert set(agree) == {"train"} and summary["data"]["train_labels"] > 0
  assert all(v > 60 for v in agree.values()), agree
  # the labels are kept in the run directory and read back when the run is started again
  [cache] = (tmp_path / "mc" / "rollouts").glob("mc_labels_*.json")  # the train split's only
  saved = json.loads(cache.read_text())
  assert {v for _, labels in saved for v in labels} == {reward.NEGATIVE, reward.POSITIVE}
  cache.write_text(json.dumps([[pos, [reward.POSITIVE] * len(labels)] for pos, labels in saved]))
  again = _run("gin/train_prm.gin", str(tmp_path / "mc"), tiny_policy, "RewardConfig.labels = 'mc'",
               "RewardConfig.mc_rollouts = 4", "TrainConfig.total_steps = 20")
  assert again["data"]["mc_agreement_with_exact"]["train"] != agree["train"]  # read, not relabelled


def test_prm_on_prm800k_runs_end_to_end(tmp_path):
  """The PRM800K source: human step labels, train / validation / phase1_test, from scratch."""
  run_dir = str(tmp_path / "prm800k")
  cmd = [sys.executable, "-m", "restem_jax.main", "--gin_file=gin/train_prm.gin", f"--gin.RUN_DIR='{run_dir}'",
         "--gin.SOURCE='prm800k'", "--gin.TASK='math'", "--gin.RewardConfig.init='scratch'",
         "--gin.RewardConfig.train_limit=6", "--gin.RewardConfig.eval_limit=3",
         "--gin.RewardConfig.max_len=384", "--gin.TrainConfig.total_steps=6", "--gin.TrainConfig.eval_every=6",
         "--gin.TrainConfig.batch_size=8", "--gin.TrainConfig.warmup_steps=2"]
  r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  from restem_jax import reward_data
  test_rows = reward_data.prm800k_examples(tasks.get("math"), BYTES, "test", 3)  # 3 problems, all rows
  assert len({e.prompt for e in test_rows}) == 3
  assert summary["data"]["test_solutions"] == len(test_rows) and summary["data"]["train_labels"] > 0
  assert 0 < summary["data"]["train_negative_share"] < 1 and summary["test"]["solutions"] > 0


def test_prm_filter_arms_start_from_the_reward_models_samples_only_when_the_same(tmp_path):
  from restem_jax import best_of_n_study, restem, reward_run
  from restem_jax.sampling import SamplingConfig
  src = tmp_path / "rm_rollouts" / "pool"
  src.mkdir(parents=True)
  for b in range(3):
    (src / f"batch_{b:05d}.npz").write_bytes(bytes([b]) * 10)
  sc = SamplingConfig(num_samples=8, temperature=0.7, top_k=40, max_new_tokens=48)
  rc = reward_run.RewardConfig(train_split="pool", train_limit=75, sampling=sc, sample_batch_size=25)
  same = restem.RestemConfig(train_split="pool", train_limit=75, sampling=sc, sample_batch_size=25)
  dst = tmp_path / "with" / "iter_1" / "rollouts"
  best_of_n_study.share_samples(str(src), rc, same, str(dst))
  assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
  assert (dst / "batch_00002.npz").read_bytes() == bytes([2]) * 10
  import dataclasses
  for other in (dataclasses.replace(same, train_limit=50), dataclasses.replace(same, sample_batch_size=32),
                dataclasses.replace(same, sampling=dataclasses.replace(sc, temperature=1.0))):
    dst = tmp_path / "other" / "rollouts"
    best_of_n_study.share_samples(str(src), rc, other, str(dst))
    assert not dst.exists()  # another E-step: sampled by the run itself


def test_prm_filter_arms_refuse_an_sft_row():
  """The filter arms start from the policy: a human_split would re-train it first
  (restem.run's SFT row), with a TrainConfig nobody configured."""
  from restem_jax import best_of_n_study, restem
  with pytest.raises(ValueError, match="human_split"):
    best_of_n_study.run("/tmp/unused", "policy", "", "prm", None, None, None,
                        filter_restem=restem.RestemConfig(human_split="human"))


def test_perturbed_copies_are_right_samples_with_one_slip_labelled_by_the_checker():
  from restem_jax import reward_data
  task = tasks.get("arith")
  right = "1+2=3;3*3=9;9-4=5\n#### 5"
  r = _rollouts([[right, "1+2=3;3*3=8;8-4=4\n#### 4"]], [[1.0, 0.0]])
  recs = [{"id": "p0", "problem": "1+2*3-4"}]
  prm = reward_data.perturbed(r, BYTES, task, recs, "prm", 40, seed=0)
  assert len(prm) >= 35  # from the right sample only; a slip the checker calls right is dropped
  cut_points = set()
  for ex in prm:
    text = BYTES.decode(ex.completion)
    steps = text.split(";")
    k = len(steps) - 1
    # the right sample through step k, with only step k's result changed
    assert ";".join(steps[:k]) == ";".join(right.split(";")[:k]) and steps[k].split("=")[0] == right.split(";")[k].split("=")[0]
    assert steps[k] != right.split(";")[k].split("\n")[0] and int(steps[k].split("=")[1]) >= 0
    assert ex.labels == (POSITIVE,) * k + (NEGATIVE,) and text[ex.positions[-1]] == text[-1]
    cut_points.add(k)
  assert cut_points == {0, 1, 2}  # any calculation step, never the answer line
  orm = reward_data.perturbed(r, BYTES, task, recs, "orm", 40, seed=0)
  assert [ex.completion for ex in orm] == [ex.completion for ex in prm]
  assert all(set(ex.labels) == {NEGATIVE} and len(ex.labels) == len(ex.completion) for ex in orm)
  assert [ex.completion for ex in reward_data.perturbed(r, BYTES, task, recs, "prm", 40, seed=1)] != \
      [ex.completion for ex in prm]
  with pytest.raises(ValueError, match="no exact step labels"):
    reward_data.perturbed(r, BYTES, tasks.get("gsm8k"), recs, "prm", 1, seed=0)
  from restem_jax.reward_run import RewardConfig
  with pytest.raises(ValueError, match="RewardConfig.perturbed"):
    RewardConfig(perturbed=1, labels="mc")
