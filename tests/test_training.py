"""Sharded training equals single-device, checkpoints resume exactly, the model learns."""
import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import assert_close
from restem_jax import checkpoints, examples, model, partitioning, sampling, training

CFG = model.ModelConfig(vocab_size=61, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        mlp_dim=128)
INIT = functools.partial(model.init_params, CFG)
NLL = training.nll_loss(CFG)


def make_data(n=16, length=20, seed=0, prompt=6):
  rng = np.random.RandomState(seed)
  toks = rng.randint(3, 61, (n, length)).astype(np.int32)
  toks[:, -1] = 1
  mask = np.zeros((n, length), np.int32)
  mask[:, prompt:] = 1
  return dict(tokens=toks, loss_mask=mask, weight=np.ones(n, np.float32))


def test_sharded_step_equals_single_device():
  tc = training.TrainConfig(batch_size=8, grad_accum=2, warmup_steps=1, total_steps=10)
  batch = training.batch_for_step(make_data(), 0, 8, 0)
  results = []
  for shape in [(1, 1, 1), (2, 2, 2)]:
    mesh = partitioning.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    with jax.set_mesh(mesh):
      state, shardings = training.create_state(INIT, tc, mesh)
      ev = training.jit_eval_step(NLL, mesh, shardings.params)
      loss = np.asarray(ev(state.params, batch))
      state, metrics = training.jit_train_step(NLL, tc, mesh, shardings)(state, batch)
      results.append((loss, jax.device_get(state.params), jax.device_get(metrics), state))
  (l1, p1, m1, _), (l8, p8, m8, s8) = results
  # float32 losses and gradients of a 2-layer model summed in another order over 8 shards:
  # ~20 sequential reductions of <= 128 terms (sqrt(128) eps each) plus the cross-shard sums.
  assert_close(l8, l1, 256)
  assert_close(m8["loss"], m1["loss"], 256)
  assert_close(m8["grad_norm"], m1["grad_norm"], 256)
  assert m1["learning_rate"] == 0.0  # step 0 of the warm-up: the update is exactly zero,
  jax.tree.map(np.testing.assert_array_equal, p1, p8)  # so the parameters stay bit-identical
  q = s8.params["layer_0"]["attn"]["q_proj"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (32, 2, 16)
  mu = s8.opt_state[1][0].mu["layer_0"]["mlp"]["up_proj"]
  assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_zero_reward_gives_no_gradient():
  tc = training.TrainConfig(batch_size=8, warmup_steps=0)  # a full learning rate at step 0
  mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  data = make_data(8)
  state, sh = training.create_state(INIT, tc, mesh)
  step = training.jit_train_step(NLL, tc, mesh, sh)
  half = dict(data, weight=np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32))
  changed = dict(half, tokens=half["tokens"].copy())
  changed["tokens"][4:] = np.random.RandomState(9).randint(3, 61, changed["tokens"][4:].shape)
  p0 = jax.device_get(state.params)
  s_a, m_a = step(training.create_state(INIT, tc, mesh, params=p0)[0], half)
  s_b, m_b = step(training.create_state(INIT, tc, mesh, params=p0)[0], changed)
  # One compiled program on inputs that differ only in rows of reward 0: their terms are
  # exactly 0 (0 * finite), so the sums are bit-identical; any leak would show.
  np.testing.assert_array_equal(m_a["grad_norm"], m_b["grad_norm"])
  jax.tree.map(np.testing.assert_array_equal, s_a.params, s_b.params)
  assert m_a["learning_rate"] > 0 and not np.array_equal(s_a.params["embed"], p0["embed"])
  only4 = {k: v[:4] for k, v in half.items()}
  ev = training.jit_eval_step(NLL, mesh, sh.params)
  a = np.asarray(ev(p0, half))
  # 8 rows jitted vs 4 rows eagerly: another batch shape, another summation order (see above)
  assert_close(a, np.asarray(training.eval_step(p0, only4, loss_fn=NLL, rules=())), 256)


def test_checkpoint_roundtrip_and_identical_next_step(tmp_path):
  tc = training.TrainConfig(batch_size=8, warmup_steps=2, total_steps=20)
  mesh = partitioning.make_mesh((2, 2, 2))
  data = make_data()
  with jax.set_mesh(mesh):
    state, sh = training.create_state(INIT, tc, mesh)
    step = training.jit_train_step(NLL, tc, mesh, sh)
    for i in range(3):
      state, _ = step(state, training.batch_for_step(data, i, 8, 0))
    mngr = checkpoints.manager(str(tmp_path / "ckpt"))
    checkpoints.save(mngr, 3, training.state_items(state))
    fresh, _ = training.create_state(INIT, tc, mesh, rng=jax.random.key(5))
    restored = training.state_from_items(checkpoints.restore(mngr, 3, training.state_items(fresh)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(state), jax.device_get(restored))
    assert restored.params["embed"].sharding == state.params["embed"].sharding
    batch = training.batch_for_step(data, 3, 8, 0)
    want = jax.device_get(step(jax.tree.map(lambda x: x.copy(), state), batch)[0].params)
    got = jax.device_get(step(restored, batch)[0].params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), want, got)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
    import numpy as np, jax
    from restem_jax import partitioning, training
    from tests.test_training import CFG, make_data
    tc = training.TrainConfig(batch_size=8, warmup_steps=2, total_steps=12, checkpoint_every=4, log_every=1)
    kill_at = int(sys.argv[2])
    def log(m):
      if "loss" in m and m["step"] == kill_at:
        os._exit(9)  # killed between steps, after step kill_at
    params, _, state = training.train(CFG, tc, make_data(), sys.argv[1], partitioning.make_mesh((2, 2, 2)), log=log)
    np.save(os.path.join(sys.argv[1], "final.npy"), np.asarray(state.params["embed"]))
""")


def test_killed_run_resumes_from_last_checkpoint(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / "run.py"
  script.write_text(KILL_SCRIPT.format(root=root))
  run = lambda d, k: subprocess.run([sys.executable, str(script), str(d), str(k)], cwd=root,
                                    capture_output=True, text=True)
  r = run(tmp_path / "a", 6)
  assert r.returncode == 9, r.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["4"]
  r = run(tmp_path / "a", -1)
  assert r.returncode == 0, r.stderr[-2000:]
  r = run(tmp_path / "b", -1)
  assert r.returncode == 0, r.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / "a" / "final.npy"), np.load(tmp_path / "b" / "final.npy"))


def test_learns_memorised_answers_and_only_rewarded_ones(tmp_path):
  data = make_data(16, 18, seed=3)
  data["weight"][8:] = 0.0
  tc = training.TrainConfig(batch_size=16, warmup_steps=10, total_steps=250, learning_rate=3e-3,
                            eval_every=1000, checkpoint_every=1000)
  history = []
  params, _, _ = training.train(CFG, tc, data, str(tmp_path), partitioning.make_mesh(),
                                log=history.append)
  assert history[-1]["loss"] < 0.05
  out = sampling.sample(CFG, params, [list(t[:6]) for t in data["tokens"]],
                        sampling.SamplingConfig(max_new_tokens=12), eos_id=1, batch_size=16)
  match = (out.tokens[:, 0, :12] == data["tokens"][:, 6:]).all(1)
  assert match[:8].all(), match
  assert not match[8:].any(), match


def test_keeps_best_step_by_validation_with_orbax_best_fn(tmp_path):
  """Scores 0.3, 0.9, 0.5 at steps 4, 8, 12: step 8 is returned and kept beside the latest."""
  tc = training.TrainConfig(batch_size=8, warmup_steps=1, total_steps=12, eval_every=4,
                            checkpoint_every=2, keep_checkpoints=1)
  scores = iter([0.3, 0.9, 0.5])
  seen = []

  def validate(params):
    seen.append(np.asarray(params["embed"]).copy())
    return next(scores)
  params, score, state = training.train(CFG, tc, make_data(), str(tmp_path), partitioning.make_mesh(),
                                        validate=validate)
  assert score == 0.9 and int(state.step) == 12
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "8"]
  np.testing.assert_array_equal(np.asarray(params["embed"]), seen[1])
  assert not np.array_equal(np.asarray(state.params["embed"]), seen[1])


def test_train_takes_any_loss_and_init(tmp_path):
  """A scalar head on mean token embeddings regresses the reward: the reward-model pattern."""
  def init_fn(rng):
    return {"lm": model.init_params(CFG, rng),
            "head": nn.LogicallyPartitioned(jnp.zeros((CFG.d_model,)), ("embed",))}

  def loss_fn(params, batch):
    x_BxD = params["lm"]["embed"][batch["tokens"]].mean(1)
    err_B = x_BxD @ params["head"] - batch["weight"]
    return jnp.sum(err_B ** 2), jnp.float32(err_B.shape[0]), {"abs_err": jnp.sum(jnp.abs(err_B))}

  data = make_data(16)
  data["weight"] = (np.arange(16) % 2).astype(np.float32)
  tc = training.TrainConfig(batch_size=8, warmup_steps=5, total_steps=150, learning_rate=1e-2,
                            checkpoint_every=1000, log_every=10)
  history = []
  params, _, state = training.train(CFG, tc, data, str(tmp_path), partitioning.make_mesh((2, 2, 2)),
                                    loss_fn=loss_fn, init_fn=init_fn, log=history.append)
  assert set(params) == {"lm", "head"} and "abs_err" in history[-1]
  # a loss that does not read packed batches gets its examples one per row
  assert training.prepare(data, tc, loss_fn) is data and tc.pack
  assert history[0]["loss"] > 0.2 and history[-1]["loss"] < 0.05, (history[0], history[-1])
  assert state.params["head"].sharding.spec == jax.sharding.PartitionSpec("fsdp")


def _variable_examples(n=12, width=32, seed=3):
  """Examples of different lengths (prompt 2..7, completion 1..14 tokens, + EOS) and rewards."""
  rng = np.random.RandomState(seed)
  prompts = [list(rng.randint(3, 61, rng.randint(2, 8))) for _ in range(n)]
  comps = [list(rng.randint(3, 61, rng.randint(1, 15))) for _ in range(n)]
  rewards = rng.choice([0.0, 0.5, 1.0, 2.0], n)
  return examples.policy_examples(prompts, comps, rewards, 1, width)


def test_pack_rows_keeps_every_example_once_in_fewer_rows():
  data = _variable_examples()
  packed = training.pack_rows(data)
  lengths = training.example_lengths(data)
  assert len(packed["tokens"]) < len(data["tokens"]) and packed["tokens"].shape[1] == 32
  assert training.useful_fraction(packed) > training.useful_fraction(data)
  seen = []
  for r in range(len(packed["tokens"])):
    seg = packed["segment_ids"][r]
    real = np.count_nonzero(seg)
    assert (seg[:real] > 0).all() and not seg[real:].any()  # padding only at the end
    assert (np.diff(seg[:real]) >= 0).all() and seg[0] == 1
    for s in range(1, seg.max() + 1):
      at = np.nonzero(seg == s)[0]
      assert (np.diff(at) == 1).all()  # contiguous, positions restart at 0
      np.testing.assert_array_equal(packed["positions"][r, at], np.arange(len(at)))
      seen.append((tuple(packed["tokens"][r, at]), tuple(packed["loss_mask"][r, at]),
                   float(packed["weight"][r, at[0]])))
      assert (packed["weight"][r, at] == packed["weight"][r, at[0]]).all()
  want = [(tuple(data["tokens"][i, :n]), tuple(data["loss_mask"][i, :n]), float(data["weight"][i]))
          for i, n in enumerate(lengths)]
  assert sorted(seen) == sorted(want)


def test_packed_loss_and_gradients_equal_unpacked():
  """Per example and in total: the same loss sums, weights and gradients packed or not."""
  data = _variable_examples()
  packed = training.pack_rows(data)
  params = nn.unbox(INIT(jax.random.key(1)))
  grad = jax.jit(jax.grad(lambda p, b: NLL(p, b)[0]))
  sums = jax.jit(lambda p, b: NLL(p, b)[:2])
  lengths = training.example_lengths(data)
  # float32 forward and backward of a 2-layer model: the same per-token terms, padded
  # differently and summed in another order (<= 12 x 32 terms, ~sqrt(n) eps each) plus
  # attention softmaxes over other numbers of masked keys (exact zeros): 64 eps of the scale.
  for i in range(len(lengths)):  # one example at a time: the others carry reward 0
    one = dict(data, weight=np.where(np.arange(len(lengths)) == i, data["weight"], 0).astype(np.float32))
    p_one = dict(packed, weight=np.zeros_like(packed["weight"]))
    p_one["weight"][_segment_of(packed, data, i)] = data["weight"][i]
    assert_close(sums(params, p_one), sums(params, one), 64, err_msg=f"example {i}")
    if data["weight"][i] > 0:
      jax.tree.map(lambda a, b: assert_close(a, b, 64, err_msg=f"example {i}"),
                   grad(params, p_one), grad(params, one))
  total_p, total_u = sums(params, packed), sums(params, data)
  assert_close(total_p, total_u, 64)
  assert total_u[1] == float(np.sum(data["loss_mask"] * data["weight"][:, None]))
  jax.tree.map(lambda a, b: assert_close(a, b, 64), grad(params, packed), grad(params, data))


def _segment_of(packed, data, i):
  """Mask of packed positions holding example i (found by its tokens and mask)."""
  n = training.example_lengths(data)[i]
  want = np.stack([data["tokens"][i, :n], data["loss_mask"][i, :n]])
  for r, seg in enumerate(packed["segment_ids"]):
    for s in range(1, seg.max() + 1):
      at = np.nonzero(seg == s)[0]
      got = np.stack([packed["tokens"][r, at], packed["loss_mask"][r, at]])
      if got.shape == want.shape and (got == want).all():
        m = np.zeros(packed["segment_ids"].shape, bool)
        m[r, at] = True
        return m
  raise AssertionError(f"example {i} is not in the packed rows")


def test_train_packs_by_default_and_can_be_told_not_to(tmp_path):
  data = _variable_examples(24)
  mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  seen = {}
  for pack in (True, False):
    tc = training.TrainConfig(batch_size=4, total_steps=2, warmup_steps=1, pack=pack)
    rows = training.prepare(data, tc, NLL)
    seen[pack] = len(rows["tokens"])
    _, _, state = training.train(CFG, tc, data, str(tmp_path / str(pack)), mesh)
    assert int(state.step) == 2
  assert seen[False] == 24 and seen[True] < 24
