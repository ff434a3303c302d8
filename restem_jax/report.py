"""The end-of-run report: a table (terminal + Markdown), summary.json, PNG plots."""
from __future__ import annotations

import json
import os

from restem_jax import multihost

COLUMNS = [("train pass@1", "train_pass_at_1"), ("val pass@1", "validation_pass_at_1"),
           ("test pass@1", "test_pass_at_1"), ("gap", "train_test_gap")]


def _fmt(v):
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{100 * v:.1f}" if abs(v) <= 1.0 else f"{v:.0f}"
  return str(v)


def table(rows: list[dict], cfg) -> list[list[str]]:
  cols = list(COLUMNS)
  for k in cfg.pass_k:
    cols += [(f"pass@{k}", f"sampled_pass_at_{k}"), (f"maj@{k}", f"sampled_maj_at_{k}")]
  cols += [(key.split("/")[1] + "/" + key.split("/")[2].replace("_pass_at_1", ""), key)
           for key in rows[0] if key.startswith("transfer/")]
  cols += [("kept", "kept_samples"), ("solved", "problems_solved"), ("wrong-step kept", "kept_with_wrong_step")]
  cols = [(h, k) for h, k in cols if any(k in r for r in rows)]
  header = ["model"] + [h for h, _ in cols]
  return [header] + [[r["name"]] + [_fmt(r.get(k)) for _, k in cols] for r in rows]


def markdown(t: list[list[str]]) -> str:
  lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
  lines += ["| " + " | ".join(row) + " |" for row in t[1:]]
  return "\n".join(lines)


def plain(t: list[list[str]]) -> str:
  widths = [max(len(row[i]) for row in t) for i in range(len(t[0]))]
  return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
                   for row in t)


def plots(run_dir: str, rows: list[dict], cfg) -> list[str]:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  out = []
  its = [r["iteration"] for r in rows]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(its, [100 * r["train_pass_at_1"] for r in rows], "o-", label="train (pool) pass@1")
  ax.plot(its, [100 * r["test_pass_at_1"] for r in rows], "s-", label="test pass@1")
  ax.set_xlabel("ReST^EM iteration (0 = SFT on human data)")
  ax.set_ylabel("accuracy (%)")
  ax.set_xticks(its)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out.append(os.path.join(run_dir, "train_vs_test.png"))
  fig.savefig(out[-1], dpi=120)
  plt.close(fig)
  ks = [k for k in cfg.pass_k if all(f"sampled_pass_at_{k}" in r for r in rows)]
  if ks:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
      ax.plot(ks, [100 * r[f"sampled_pass_at_{k}"] for k in ks], "o-", label=r["name"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("test pass@k (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(os.path.join(run_dir, "pass_at_k.png"))
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
  return out


def write(run_dir: str, rows: list[dict], cfg, wall_time_s: float) -> dict:
  iters = [r for r in rows if r["iteration"] > 0]
  best = max(iters, key=lambda r: (r["validation_pass_at_1"], -r["iteration"])) if iters else rows[0]
  summary = dict(
      task=cfg.task,
      baseline_test_pass_at_1=rows[0]["test_pass_at_1"],
      best_iteration=best["iteration"],
      best_test_pass_at_1=best["test_pass_at_1"],
      max_test_pass_at_1=max(r["test_pass_at_1"] for r in rows),
      improvement_points=100 * (best["test_pass_at_1"] - rows[0]["test_pass_at_1"]),
      wall_time_s=round(wall_time_s, 1),
      baseline=rows[0],
      iterations=iters)
  t = table(rows, cfg)
  if not multihost.is_writer():  # process 0 writes the report
    return summary
  md = (f"# ReST^EM on `{cfg.task}`\n\n{markdown(t)}\n\nAccuracies in %. Best iteration by "
        f"validation: {best['iteration']} (test pass@1 {100 * best['test_pass_at_1']:.1f} vs "
        f"baseline {100 * rows[0]['test_pass_at_1']:.1f}). Wall time {wall_time_s:.0f} s.\n")
  pngs = plots(run_dir, rows, cfg)
  md += "".join(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in pngs)
  with open(os.path.join(run_dir, "report.md"), "w") as f:
    f.write(md)
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print("\n" + plain(t))
  print(f"\nbest iteration (by validation): {best['iteration']}; test pass@1 "
        f"{100 * rows[0]['test_pass_at_1']:.1f} -> {100 * best['test_pass_at_1']:.1f} "
        f"({summary['improvement_points']:+.1f} points); wall time {wall_time_s:.0f} s")
  print(f"report: {os.path.join(run_dir, 'report.md')}")
  return summary
