"""Rollouts: token ids from the sampler to the trainer, stop strings, selection, files."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import make_bpe_vocab

from restem_jax import model, rollouts
from restem_jax.sampling import SamplingConfig
from restem_jax.verifiers import Result
from restem_jax.vocab import ByteVocabulary


def reward_all(problem, completion):  # a verifier: every completion is right
  return Result(1.0, "passed", answer=completion[:3])


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  return make_bpe_vocab(tmp_path_factory.mktemp("bpe"))


def test_trained_tokens_are_the_sampled_tokens_with_bpe(bpe):
  cfg = model.ModelConfig(vocab_size=bpe.vocab_size, d_model=32, num_layers=1, num_heads=2,
                          num_kv_heads=2, mlp_dim=64, init_std=0.5)
  params = nn.unbox(model.init_params(cfg, jax.random.key(1)))
  records = [dict(id=f"p{i}", prompt=p) for i, p in enumerate(["the answer is", "1+2=", "print("])]
  r = rollouts.sample(cfg, params, bpe, records, SamplingConfig(num_samples=4, temperature=1.0,
                                                                max_new_tokens=12), rng=3, batch_size=4)
  r = rollouts.verify(r, records, reward_all, bpe, workers=1)
  keep = rollouts.select(r, max_per_problem=4)
  data = rollouts.examples(r, keep, bpe.eos_id, max_len=32)
  rows = list(zip(*np.nonzero(keep)))
  assert len(rows) == len(data["tokens"]) > 0
  reencoded_differs = 0
  for (i, j), toks, mask in zip(rows, data["tokens"], data["loss_mask"]):
    sampled = r.tokens[i, j, :r.lengths[i, j]].tolist()
    assert toks[mask == 1].tolist() == sampled + [bpe.eos_id]  # what the policy produced, then EOS
    assert toks[:r.prompt_lengths[i]].tolist() == bpe.encode(records[i]["prompt"])
    reencoded_differs += bpe.encode(bpe.decode(sampled)) != sampled
  # the case the record exists for: text round trips would have changed the tokens
  assert reencoded_differs > 0
  # behind other prompts (sampled few-shot, trained zero-shot): the completions stay as sampled
  other = [dict(r, prompt="Q: " + r["prompt"]) for r in records]
  moved = rollouts.with_prompts(r, other, bpe)
  for i, rec in enumerate(other):
    assert moved.prompt(i) == bpe.encode(rec["prompt"])
    assert all(moved.completion(i, j) == r.completion(i, j) for j in range(r.num_samples))
  data = rollouts.examples(moved, keep, bpe.eos_id, max_len=32)
  assert data["tokens"][0][:moved.prompt_lengths[rows[0][0]]].tolist() == bpe.encode(other[rows[0][0]]["prompt"])
  with pytest.raises(ValueError, match="problem ids"):
    rollouts.with_prompts(r, other[::-1], bpe)


def test_stop_strings_cut_tokens_and_text(bpe):
  byte = ByteVocabulary()
  ids = byte.encode("x = 1\n```\nmore")
  n = rollouts.stop_length(byte, ids, "```")
  assert byte.decode(ids[:n]) == "x = 1\n```"
  assert rollouts.cut_at_stop(byte.decode(ids[:n]), "```") == "x = 1\n"
  assert rollouts.stop_length(byte, ids, ("\ndef ",)) == len(ids)
  ids = bpe.encode("print(1)\n```python\nprint(2)")  # BPE merges across the stop string
  n = rollouts.stop_length(bpe, ids, "```")
  assert "```" in bpe.decode(ids[:n]) and "```" not in bpe.decode(ids[:n - 1])


def _fake(rewards, completions):
  p, s = rewards.shape
  toks = np.zeros((p, s, 4), np.int32)
  lens = np.zeros((p, s), np.int32)
  for i in range(p):
    for j in range(s):
      toks[i, j, :len(completions[i][j])] = completions[i][j]
      lens[i, j] = len(completions[i][j])
  return rollouts.Rollouts(
      np.array([f"p{i}" for i in range(p)]), np.full((p, 2), 5, np.int32), np.full(p, 2, np.int32),
      toks, lens, np.zeros((p, s, 4), np.float32), rewards.astype(np.float32),
      np.where(rewards > 0, "passed", "wrong_answer"), np.full((p, s), "7"))


def test_select_keeps_distinct_rewarded_in_sample_order():
  rewards = np.array([[1, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
  comps = [[[4], [4], [5], [6], [7]], [[4], [5], [6], [7], [8]]]
  keep = rollouts.select(_fake(rewards, comps), max_per_problem=2)
  assert keep.tolist() == [[True, False, False, True, False], [False] * 5]


def test_select_shortest_keeps_the_shortest_distinct_rewarded():
  rewards = np.array([[1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]])
  comps = [[[4, 4, 4], [5, 5], [6], [5, 5], [7, 7], [8, 8, 8, 8]], [[4], [5, 6, 7], [6], [7], [8], [9]]]
  keep = rollouts.select_shortest(_fake(rewards, comps), max_per_problem=2)
  # [6] is shorter but unrewarded; [5, 5] twice is one sample; [7, 7] ties [5, 5] in length, comes later
  assert keep.tolist() == [[False, True, False, False, True, False], [False, True] + [False] * 4]
  one = rollouts.select_shortest(_fake(rewards, comps), max_per_problem=1)
  assert one.sum(1).tolist() == [1, 1] and one[0, 1]


def test_save_load_concat(tmp_path):
  a = _fake(np.array([[1, 0]]), [[[4, 5], [6]]])
  b = dataclasses_replace_prompt(_fake(np.array([[0, 1]]), [[[7], [8, 9, 10]]]))
  rollouts.save(a, str(tmp_path / "a.npz"))
  back = rollouts.load(str(tmp_path / "a.npz"))
  for f in ("problem_ids", "tokens", "lengths", "rewards", "statuses", "answers"):
    np.testing.assert_array_equal(getattr(back, f), getattr(a, f))
  both = rollouts.concat([back, b])
  assert both.num_problems == 2 and both.prompt_tokens.shape == (2, 3)
  assert both.prompt(1) == [5, 5, 5] and both.completion(1, 1) == [8, 9, 10]


def dataclasses_replace_prompt(r):
  import dataclasses
  return dataclasses.replace(r, prompt_tokens=np.full((1, 3), 5, np.int32), prompt_lengths=np.array([3]))
