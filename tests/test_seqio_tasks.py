"""The tasks as seqio Tasks: datasets, the kept set as the M-step sees it, verifier metrics."""
import dataclasses
import json

import numpy as np
import pytest
from conftest import make_bpe_vocab

seqio = pytest.importorskip("seqio")  # the accelerator image has no TensorFlow; CI has it

import tasks  # noqa: E402
from restem_jax import restem, rollouts  # noqa: E402
from tasks import seqio_tasks  # noqa: E402
from test_rollouts import _fake  # noqa: E402


def test_task_dataset_is_tokenized_prompts_and_solutions():
  rec = tasks.get("arith").load("human")[0]
  task = seqio.get_mixture_or_task("arith")
  seqio.test_utils.assert_dataset(
      task.get_dataset(split="human", sequence_length={"inputs": 16, "targets": 48}, shuffle=False).take(1),
      {"inputs_pretokenized": rec["prompt"].encode(), "inputs": [b + 3 for b in rec["prompt"].encode()],
       "targets_pretokenized": rec["solution"].encode(), "targets": [b + 3 for b in rec["solution"].encode()] + [1],
       "answer": rec["answer"].encode(), "id": rec["id"].encode()})


def test_kept_set_task_yields_exactly_the_m_step_examples(tmp_path):
  vocab = make_bpe_vocab(tmp_path)
  problems = [dict(id="p0", prompt="the answer is"), dict(id="p1", prompt="1+2=")]
  comps = [[vocab.encode(" 42"), [45, 46, 47], vocab.encode(" 42")], [[50], vocab.encode("3"), [51, 52]]]
  r = _fake(np.array([[1, 1, 1], [0, 1, 1]]), comps)
  prompt_tokens, prompt_lengths = rollouts._pad_rows([vocab.encode(p["prompt"]) for p in problems])
  r = dataclasses.replace(r, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths)
  task = tasks.Task("toy", ("train",), lambda *a: [], verifier=None)
  mask, stats = restem.keep(r, task, problems, vocab, max_per_problem=10, path=str(tmp_path / "kept.jsonl"))
  assert stats["kept_samples"] == 4  # the duplicate " 42" is dropped
  want = rollouts.examples(r, mask, vocab.eos_id, max_len=16)
  seqio_tasks.register_kept("toy_kept", str(tmp_path / "kept.jsonl"), vocab)
  ds = seqio.get_mixture_or_task("toy_kept").get_dataset(
      split="train", sequence_length={"inputs": 8, "targets": 8}, shuffle=False)
  got = list(seqio.PrefixLMFeatureConverter(pack=False)(ds, {"inputs": 8, "targets": 8}).as_numpy_iterator())
  assert len(got) == len(want["tokens"])
  for ex, toks, mask_row in zip(got, want["tokens"], want["loss_mask"]):
    np.testing.assert_array_equal(ex["decoder_target_tokens"], toks)
    np.testing.assert_array_equal(ex["decoder_loss_weights"], mask_row)
  with open(tmp_path / "kept.jsonl") as f:
    assert json.loads(f.readline())["completion"] == " 42"


def test_evaluator_scores_predictions_with_the_verifier():
  rows = tasks.get("arith").load("test")[:12]

  def evaluate(predictions):
    evaluator = seqio.Evaluator("arith", feature_converter=seqio.PrefixLMFeatureConverter(pack=False),
                                eval_split="test", num_examples=12,
                                sequence_length={"inputs": 32, "targets": 32})

    def predict_fn(ds):  # decoded predictions come padded to one length, as from t5x
      ids = [[b + 3 for b in p.encode()] + [1] for p in predictions]
      return [(i, t + [0] * (32 - len(t))) for i, t in enumerate(ids)]
    metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn)
    return metrics.result()["arith"]["accuracy"]

  right = [f"#### {r['answer']}" for r in rows]
  assert evaluate(right) == 100.0
  assert evaluate(right[:6] + [f"#### {int(r['answer']) + 1}" for r in rows[6:]]) == 50.0


def test_register_run_registers_a_runs_kept_sets(tmp_path):
  """A run's kept sets from another process: the names in its log, the rows of its kept.jsonl."""
  for i in (1, 2):
    (tmp_path / f"iter_{i}").mkdir()
    rows = [dict(id=f"arith/pool/{j}", prompt="1+2=", completion="#### 3", prompt_ids=[52, 46, 53, 64],
                 completion_ids=[38, 38, 38, 38, 35, 54][:6 - j], reward=1.0) for j in range(i + 1)]
    (tmp_path / f"iter_{i}" / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  log = [{"stage": "sft", "time": 1.0}, {"stage": "iter_1", "kept_samples": 2, "seqio_task": "arith_restem_iter1"},
         {"stage": "iter_2", "kept_samples": 3, "seqio_task": "arith_restem_iter2"}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
  assert seqio_tasks.register_run(str(tmp_path)) == ["arith_restem_iter1", "arith_restem_iter2"]
  ds = seqio.get_mixture_or_task("arith_restem_iter2").get_dataset(
      split="train", sequence_length={"inputs": 8, "targets": 8}, shuffle=False)
  got = [ex["targets"].tolist() for ex in ds.as_numpy_iterator()]
  assert got == [[38, 38, 38, 38, 35, 54, 1], [38, 38, 38, 38, 35, 1], [38, 38, 38, 38, 1]]
