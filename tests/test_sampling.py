"""KV-cache decoding, greedy, top-k / top-p, sampling frequencies, EOS handling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import assert_close
from restem_jax import model, partitioning, sampling
from restem_jax.sampling import SamplingConfig as SC

CFG = model.ModelConfig(vocab_size=61, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        mlp_dim=128, init_std=0.3)
# Two float32 forward passes of CFG along different paths (cache vs full sequence, another
# batch shape or sharding) differ by rounding only: ~20 sequential reductions of length <= 128,
# each ~sqrt(128) eps of its scale, so 256 eps of the largest value.  A wrong mask or an
# off-by-one position moves these values by 1e-2 of their scale or more.
FORWARD_ULPS = 256


forward = jax.jit(lambda p, t: model.apply(CFG, p, t)[0])
step = jax.jit(lambda p, t, pos, m, c, i: model.apply(CFG, p, t, positions_BxL=pos, kv_mask_BxS=m,
                                                     cache=c, cache_index=i))


@pytest.fixture(scope="module")
def params():
  return nn.unbox(model.init_params(CFG, jax.random.key(0)))


def test_kv_cache_matches_full_forward(params):
  """Prefill of left-padded prompts of different lengths + token-by-token decode."""
  rng = np.random.RandomState(0)
  lens = [3, 9, 6]
  seqs = [list(rng.randint(3, 61, n + 5)) for n in lens]
  p, t = 16, 5
  toks, mask = sampling.left_pad([s[:n] for s, n in zip(seqs, lens)], p, 3, 0)
  kv_mask = np.concatenate([mask, np.zeros((3, t), np.int32)], 1).astype(bool)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  cache = model.init_cache(CFG, 3, p + t)
  logits, cache = step(params, jnp.asarray(toks), pos, kv_mask, cache, 0)
  fulls = [forward(params, jnp.asarray([s]))[0] for s in seqs]
  for i, n in enumerate(lens):
    assert_close(logits[i, p - n:], fulls[i][:n], FORWARD_ULPS)
  for t_ in range(t):
    kv_mask[:, p + t_] = True
    tok = np.array([[s[n + t_]] for s, n in zip(seqs, lens)])
    out, cache = step(params, jnp.asarray(tok), np.array(lens)[:, None] + t_, kv_mask, cache, p + t_)
    for i, n in enumerate(lens):
      assert_close(out[i, 0], fulls[i][n + t_], FORWARD_ULPS)


@pytest.mark.parametrize("refill", [False, True])
def test_temperature_zero_is_greedy(params, refill):
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  # 70 new tokens: three decode segments (cache widths 32, 64, 70), three rows per shared
  # prompt; with refill, a ring of 16 + 70 slots that every row goes round.
  assert sampling.decode_segments(70) == [32, 64, 70]
  out = sampling.sample(CFG, params, prompts, SC(num_samples=3, max_new_tokens=70, temperature=0.0,
                                                 refill=refill), eos_id=-1, rng=3, batch_size=2)
  for i, pr in enumerate(prompts):
    seq = list(pr) + [0] * 70
    for j in range(len(pr), len(seq)):  # causal: later filler tokens do not matter
      seq[j] = int(jnp.argmax(forward(params, jnp.asarray([seq]))[0, j - 1]))
    for j in range(3):
      assert list(out.tokens[i, j]) == seq[len(pr):]


def test_top_k_and_top_p_stay_in_allowed_set():
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(64, 61) * 3, jnp.float32)
  keys = jax.random.split(jax.random.key(0), 50)
  probs = np.asarray(jax.nn.softmax(logits))
  topk = np.argsort(-np.asarray(logits), -1)[:, :5]
  order = np.argsort(-probs, -1)
  sorted_p = np.take_along_axis(probs, order, -1)
  nucleus = [set(order[r, :np.searchsorted(np.cumsum(sorted_p[r]), 0.6) + 1]) for r in range(64)]
  draw_k = jax.jit(jax.vmap(lambda k: sampling.sample_token(logits, k, 1.0, top_k=5)))
  draw_p = jax.jit(jax.vmap(lambda k: sampling.sample_token(logits, k, 1.0, top_p=0.6)))
  for a, b in zip(np.asarray(draw_k(keys)), np.asarray(draw_p(keys))):
    assert all(a[r] in topk[r] for r in range(64))
    assert all(b[r] in nucleus[r] for r in range(64))


def _draws(logits, temperature, key, n=20000, **kw):
  """n draws: one key each (vmapped), and n rows of one batch draw, given as 2n rows
  in reverse with every other row taken (the decode loop's shrunk batches)."""
  one = jax.jit(jax.vmap(lambda k: sampling.sample_token(logits, k, temperature, **kw)[0]))(
      jax.random.split(jax.random.key(key), n))
  rows = jnp.arange(2 * n - 1, 0, -2)
  batch = sampling.sample_token(jnp.repeat(logits, n, 0), jax.random.key(key + 1), temperature,
                                rows=(rows, 2 * n), **kw)
  return np.asarray(one), np.asarray(batch)


@pytest.mark.parametrize("path", [0, 1])
def test_sampling_frequencies_match_softmax(path):
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
  temperature = 0.7
  draws = _draws(logits, temperature, 42)[path]
  counts = np.bincount(np.asarray(draws), minlength=6)
  expected = np.asarray(jax.nn.softmax(logits[0] / temperature)) * 20000
  assert stats.chisquare(counts, expected).pvalue > 0.001


@pytest.mark.parametrize("refill", [False, True])
def test_eos_stops_and_pads(params, refill):
  # Force EOS: the greedy first token of each prompt is used as the EOS id.
  prompts = [[5, 6, 7], [20, 21]]
  sc = SC(max_new_tokens=6, refill=refill)
  greedy = sampling.sample(CFG, params, prompts, sc, eos_id=-1, batch_size=2)
  eos = int(greedy.tokens[0, 0, 2])
  out = sampling.sample(CFG, params, prompts, sc, eos_id=eos, batch_size=2)
  for i in range(2):
    toks, n = out.tokens[i, 0], out.lengths[i, 0]
    ref = list(greedy.tokens[i, 0])
    stop = ref.index(eos) + 1 if eos in ref else 6
    assert n == stop
    assert list(toks[:n]) == ref[:n]
    assert (toks[n:] == 0).all() and (out.logprobs[i, 0, n:] == 0).all()
  assert out.completions(0, eos)[0] == list(greedy.tokens[0, 0, :2])


def test_sorted_batches_and_grouped_prefill_match_one_prompt_at_a_time(params):
  """Prompts of mixed lengths (buckets 16, 64 and 128) come back in the given order, and
  prefilling in groups of similar length (each at its own bucket) changes nothing."""
  rng = np.random.RandomState(1)
  lens = [3, 70, 5, 20, 40, 2, 9, 33]
  prompts = [list(rng.randint(3, 61, n)) for n in lens]
  sc = SC(num_samples=2, max_new_tokens=6, temperature=0.0, refill=False)
  grouped = sampling.sample(CFG, params, prompts, sc, eos_id=-1, batch_size=4, prefill_groups=2)
  whole = sampling.sample(CFG, params, prompts, sc, eos_id=-1, batch_size=8, prefill_groups=1)
  for i, pr in enumerate(prompts):
    alone = sampling.sample(CFG, params, [pr], sc, eos_id=-1, batch_size=1)
    np.testing.assert_array_equal(grouped.tokens[i], alone.tokens[0])
    np.testing.assert_array_equal(whole.tokens[i], alone.tokens[0])
    assert_close(grouped.logprobs[i], alone.logprobs[0], FORWARD_ULPS)
  with pytest.raises(ValueError, match="prompt 1 has 70 tokens, more than max_prompt_len=64"):
    sampling.sample(CFG, params, prompts, sc, eos_id=-1, max_prompt_len=64)


@pytest.mark.parametrize("refill", [False, True])
def test_sampling_on_mesh_matches_single_device(params, refill):
  mesh = partitioning.make_mesh((2, 2, 2))
  shardings = partitioning.logical_shardings(
      jax.eval_shape(lambda r: model.init_params(CFG, r), jax.random.key(0)), mesh)
  sharded = jax.device_put(params, shardings)
  prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
  # (with refill, a pool of as many rows as the data axes: its schedule, and with it
  # the random stream, would depend on the devices once the pool shrinks)
  sc = SC(num_samples=2 if refill else 4, max_new_tokens=8 if refill else 24, temperature=0.8, top_k=10,
          refill=refill)
  kw = dict(eos_id=9, rng=7, batch_size=4 if not refill else 2)
  a = sampling.sample(CFG, params, prompts, sc, **kw)
  with jax.set_mesh(mesh):
    b = sampling.sample(CFG, sharded, prompts, sc, mesh=mesh, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert_close(a.logprobs, b.logprobs, FORWARD_ULPS)
  if not refill:  # rows ended early, and the batch shrank on the mesh (by 4 rows: the data axes)
    assert b.computed < 16 * b.lengths.max() and b.lengths.min() < b.lengths.max()


@pytest.mark.parametrize("path", [0, 1])
def test_top_k_frequencies_match_renormalised_softmax(path):
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
  draws = _draws(logits, 1.0, 7, top_k=3)[path]
  counts = np.bincount(np.asarray(draws), minlength=6)
  assert counts[[2, 3, 4]].sum() == 0
  kept = np.array([0, 1, 5])
  p = np.exp(np.asarray(logits[0], np.float64)[kept]); p /= p.sum()
  assert stats.chisquare(counts[kept], p * 20000).pvalue > 0.001


def test_sampling_config_rejects_bad_values():
  for bad in (dict(num_samples=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
              dict(max_new_tokens=0)):
    with pytest.raises(ValueError, match="SamplingConfig"):
      SC(**bad)


@pytest.mark.parametrize("path", [0, 1])
def test_top_k_with_top_p_frequencies_match_filtered_softmax(path):
  # The fast path (draw among the k best) against the full-vocabulary filter.
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5, 1.4, -0.3]])
  temperature, top_k, top_p = 0.8, 5, 0.7
  draws = _draws(logits, temperature, 3, top_k=top_k, top_p=top_p)[path]
  counts = np.bincount(np.asarray(draws), minlength=8)
  p = np.asarray(jax.nn.softmax(sampling.filter_logits(logits, temperature, top_k, top_p)))[0]
  assert set(np.nonzero(counts)[0]) == set(np.nonzero(p)[0]) and 1 < (p > 0).sum() < top_k
  kept = p > 0
  assert stats.chisquare(counts[kept], p[kept] * 20000).pvalue > 0.001


@pytest.mark.parametrize("refill", [False, True])
def test_sampled_logprobs_match_full_forward(params, refill):
  """Rows that share a prompt diverge: each row's log-probs equal a fresh forward pass."""
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]
  out = sampling.sample(CFG, params, prompts, SC(num_samples=3, max_new_tokens=40, temperature=1.0,
                                                 refill=refill), eos_id=-1, rng=5, batch_size=4)
  for i, pr in enumerate(prompts):
    assert len({tuple(r) for r in out.tokens[i]}) == 3  # the samples differ
    for j in range(3):
      seq = list(pr) + [int(x) for x in out.tokens[i, j]]
      lp = jax.nn.log_softmax(forward(params, jnp.asarray([seq]))[0])
      want = [float(lp[len(pr) + k - 1, seq[len(pr) + k]]) for k in range(40)]
      assert_close(out.logprobs[i, j], want, FORWARD_ULPS)


def test_logsumexp_matches_jax_with_masked_entries():
  x = np.random.RandomState(0).randn(6, 5000).astype(np.float32) * 4
  x[2] = -np.inf  # a fully masked row stays -inf
  x[3, :4000] = -np.inf
  got, want = np.asarray(sampling.logsumexp(jnp.asarray(x))), np.asarray(jax.nn.logsumexp(x, -1))
  assert got[2] == -np.inf
  # the log of a sum of 5000 positive terms: an absolute error of about the sum's relative
  # rounding error, sqrt(5000) eps typically; 4x that.  Dropping the mask moves row 3 by 1.6.
  np.testing.assert_allclose(np.delete(got, 2), np.delete(want, 2), rtol=0,
                             atol=4 * np.sqrt(5000) * np.finfo(np.float32).eps)


@pytest.mark.parametrize("refill", [False, True])
@pytest.mark.parametrize("new", [1, 2])
def test_shortest_decodes_are_greedy(params, new, refill):
  """Token 0 comes from the prefill, token j from the j-th forward pass."""
  prompts = [[5, 6, 7], [9, 10]]
  out = sampling.sample(CFG, params, prompts, SC(max_new_tokens=new, refill=refill), eos_id=-1,
                        batch_size=2)
  for i, pr in enumerate(prompts):
    seq = list(pr)
    for _ in range(new):
      seq.append(int(jnp.argmax(forward(params, jnp.asarray([seq]))[0, -1])))
    assert list(out.tokens[i, 0]) == seq[len(pr):] and out.lengths[i, 0] == new


@pytest.mark.parametrize("batch_size", [2, 6])
def test_refilled_and_shrunk_rows_match_full_forwards_and_waste_fewer_slots(params, batch_size):
  """6 prompts x 3 samples, rows ending at EOS at different steps, three ways: fixed
  batches of `batch_size` prompts that shrink as rows finish (the default), the same
  without shrinking, and continuous batching through a pool of as many rows, each
  finished row taking the next waiting sample.  Each sample's tokens are a valid
  continuation (log-probs equal a full forward pass of prompt + sample, EOS only last,
  padding after); shrinking changes no token; shrinking and refilling compute fewer
  wasted slots than fixed batches."""
  rng = np.random.RandomState(4)
  prompts = [list(rng.randint(3, 61, n)) for n in (3, 12, 5, 20, 7, 2)]
  eos, new = 9, 40  # more new slots than the prompts' 32: rows of their own fit the memory budget
  runs = {}
  for refill, shrink in ((False, False), (False, True), (True, False)):
    sc = SC(num_samples=3, max_new_tokens=new, temperature=1.0, refill=refill, shrink=shrink)
    runs[refill, shrink] = out = sampling.sample(CFG, params, prompts, sc, eos_id=eos, rng=11,
                                                 batch_size=batch_size)
    for i, pr in enumerate(prompts):
      for j in range(3):
        n = int(out.lengths[i, j])
        toks = [int(x) for x in out.tokens[i, j, :n]]
        assert 1 <= n <= new and eos not in toks[:-1] and (n == new or toks[-1] == eos)
        assert not out.tokens[i, j, n:].any() and not out.logprobs[i, j, n:].any()
        lp = jax.nn.log_softmax(forward(params, jnp.asarray([list(pr) + toks]))[0])
        assert_close(out.logprobs[i, j, :n], [float(lp[len(pr) + k - 1, toks[k]]) for k in range(n)],
                     FORWARD_ULPS, err_msg=f"refill={refill}, shrink={shrink}, prompt {i}, sample {j}")
  fixed, shrunk, pool = runs[False, False], runs[False, True], runs[True, False]
  assert len(set(fixed.lengths.ravel().tolist())) > 3  # rows really end at different steps
  # the batch shrank (by eighths of its rows, rounded up), token for token the same samples
  np.testing.assert_array_equal(shrunk.tokens, fixed.tokens)
  np.testing.assert_array_equal(shrunk.lengths, fixed.lengths)
  assert_close(shrunk.logprobs, fixed.logprobs, FORWARD_ULPS)
  for out in (shrunk, pool):
    assert fixed.computed > out.computed >= out.lengths.sum()
  order = np.argsort([len(p) for p in prompts], kind="stable")  # batches of similar length
  assert fixed.computed == batch_size * 3 * sum(  # rows x (longest row) per batch
      fixed.lengths[order[i:i + batch_size]].max() for i in range(0, 6, batch_size))


def test_a_partial_last_batch_computes_no_filler_rows(params):
  """5 prompts in batches of 4: the second call holds one prompt and 3 filler prompts.
  Their rows start done, so the shrinking batch drops them after token 0 (which the
  prefill computes for the whole batch), and the samples are token for token those
  of fixed batches."""
  rng = np.random.RandomState(2)
  prompts = [list(rng.randint(3, 61, n)) for n in (3, 6, 4, 5, 2)]
  runs = {shrink: sampling.sample(CFG, params, prompts, SC(num_samples=3, max_new_tokens=8, temperature=1.0,
                                                           shrink=shrink), eos_id=-1, rng=5, batch_size=4)
          for shrink in (False, True)}
  np.testing.assert_array_equal(runs[True].tokens, runs[False].tokens)
  assert (runs[True].lengths == 8).all()
  assert runs[False].computed == 2 * 12 * 8  # no EOS: both calls run every row to the cap
  assert runs[True].computed == 12 * 8 + 12 + 3 * 7  # the second: token 0 of 12 rows, then 3 rows


def test_shrink_plan_keeps_every_live_row_in_blocks_of_one_prompt_within_the_memory_budget():
  """4 prompts x 4 samples (one shared prefix row per prompt).  Prompt 0 is done, 1 has
  1 live row, 2 has 2, 3 has 4: 7 live rows fit in 8 rows, as blocks of 2 (each with its
  prompt's prefix row) or 8 single rows; the fewest rows win, then the largest block.
  When every layout that sheds rows would hold more cache slots than the budget, the
  batch stays as it is."""
  prompt_R = np.arange(16) // 4
  done_R = np.ones(16, bool)
  live = [5, 8, 10, 12, 13, 14, 15]
  done_R[live] = False
  keep, source = sampling.shrink_plan(done_R, prompt_R, 4, 4, quantum=2, data_parallel=1, new_tokens=10,
                                      prefix_len=4, budget=16 * 10 + 4 * 4)
  assert len(keep) == 8 and len(source) == 4  # blocks of 2
  assert sorted(r for r in keep if not done_R[r]) == live  # every live row once
  for i, r in enumerate(keep):  # a block reads its rows' prompt (prefix row = prompt here)
    assert done_R[r] or prompt_R[r] == source[i // 2]
  np.testing.assert_array_equal(source, [1, 2, 3, 3])
  # 3 live rows of each prompt: only single rows shed any (12 rows), at 12 x (10 + p) slots
  done_R = np.tile([False, False, False, True], 4)
  plan = dict(done_R=done_R, prompt_R=prompt_R, group=4, num_samples=4, quantum=2, data_parallel=1,
              new_tokens=10)
  keep, source = sampling.shrink_plan(**plan, prefix_len=4, budget=16 * 10 + 4 * 4)
  assert len(keep) == len(source) == 12 and not done_R[keep].any()
  assert sampling.shrink_plan(**plan, prefix_len=6, budget=16 * 10 + 4 * 6) is None
  # the rows and the prefix rows must split over the data-parallel devices
  assert sampling.shrink_plan(**dict(plan, data_parallel=8), prefix_len=4, budget=10 ** 6) is None
