"""The end-of-run report: a table (terminal + Markdown), summary.json, PNG plots."""
from __future__ import annotations

import os

from restem_jax import files, multihost

COLUMNS = [("train pass@1", "train_pass_at_1"), ("val pass@1", "validation_pass_at_1"),
           ("test pass@1", "test_pass_at_1"), ("gap", "train_test_gap")]


def sampled_key(metric: str) -> str:
  """The row key of a metric of temperature samples: "pass@4" -> "sampled_pass_at_4"
  (evaluation writes rows under these keys, the table and plots read them)."""
  return "sampled_" + metric.replace("@", "_at_")


def _fmt(v):
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{100 * v:.1f}" if abs(v) <= 1.0 else f"{v:.0f}"
  return str(v)


def table(rows: list[dict], pass_k) -> list[list[str]]:
  cols = list(COLUMNS)
  for k in pass_k:
    cols += [(f"pass@{k}", sampled_key(f"pass@{k}")), (f"maj@{k}", sampled_key(f"maj@{k}"))]
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


def rows_of(summary: dict) -> list[dict]:
  """A run's rows from its summary.json: its starting rows (base, SFT), then its iterations."""
  starts = [summary[k] for k in ("base", "sft") if k in summary] or [summary["baseline"]]
  return starts + summary["iterations"]


def frame(summary: dict):
  """The report's table (report.md's columns) as a pandas DataFrame, one row per model,
  accuracies in %."""
  import pandas as pd
  rows = rows_of(summary)
  ks = sorted({int(k.rsplit("_", 1)[1]) for r in rows for k in r if k.startswith(sampled_key("pass@"))})
  t = table(rows, ks)
  return pd.DataFrame(t[1:], columns=t[0]).set_index("model").apply(pd.to_numeric, errors="coerce")  # "-": NaN


def _start(rows: list[dict]) -> dict:
  """The row ReST^EM started from (marked `start`; the last row before iteration 1)."""
  return next((r for r in rows if r.get("start")), [r for r in rows if r["iteration"] == 0][-1])


def plots(run_dir: str, rows: list[dict], cfg) -> list[str]:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  out = []
  chain = [_start(rows)] + [r for r in rows if r["iteration"] > 0]
  its = [r["iteration"] for r in chain]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(its, [100 * r["train_pass_at_1"] for r in chain], "o-", label="train (pool) pass@1")
  ax.plot(its, [100 * r["test_pass_at_1"] for r in chain], "s-", label="test pass@1")
  for r in rows:  # the other starting points (base, SFT) as levels
    if r["iteration"] == 0 and r is not chain[0]:
      ax.axhline(100 * r["test_pass_at_1"], ls="--", lw=1, color="gray")
      ax.annotate(f"{r['name']}: test", (its[-1], 100 * r["test_pass_at_1"]), fontsize=7,
                  ha="right", va="bottom", color="gray")
  ax.set_xlabel(f"ReST^EM iteration (0 = {chain[0]['name']})")
  ax.set_ylabel("accuracy (%)")
  ax.set_xticks(its)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out.append(os.path.join(run_dir, "train_vs_test.png"))
  fig.savefig(out[-1], dpi=120)
  plt.close(fig)
  ks = [k for k in cfg.pass_k if all(sampled_key(f"pass@{k}") in r for r in rows)]
  if ks:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
      ax.plot(ks, [100 * r[sampled_key(f"pass@{k}")] for k in ks], "o-", label=r["name"])
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


def write(run_dir: str, rows: list[dict], cfg, wall_time_s: float, seconds: dict | None = None) -> dict:
  """The report of `rows` (the base and/or SFT rows at iteration 0, then ReST^EM's
  iterations): report.md, summary.json, plots.  `seconds`: time per kind of work."""
  iters = [r for r in rows if r["iteration"] > 0]
  start = _start(rows)
  # the best by validation among the start and the iterations: the start only when no
  # iteration validates as high; a tie between iterations goes to the earlier
  best = max([start] + iters, key=lambda r: (r.get("validation_pass_at_1", -1.0), r is not start,
                                              -r["iteration"]))
  named = {r["name"]: r for r in rows if r["iteration"] == 0}
  summary = dict(
      task=cfg.task,
      baseline_test_pass_at_1=start["test_pass_at_1"],  # where ReST^EM started
      best_iteration=best["iteration"],
      best_test_pass_at_1=best["test_pass_at_1"],
      max_test_pass_at_1=max(r["test_pass_at_1"] for r in rows),
      improvement_points=100 * (best["test_pass_at_1"] - start["test_pass_at_1"]),
      wall_time_s=round(wall_time_s, 1))
  if "base" in named:
    summary["base_test_pass_at_1"] = named["base"]["test_pass_at_1"]
    summary["improvement_over_base_points"] = 100 * (best["test_pass_at_1"] - named["base"]["test_pass_at_1"])
  if "SFT (human data)" in named:
    summary["sft_test_pass_at_1"] = named["SFT (human data)"]["test_pass_at_1"]
  if seconds:
    summary["time_split_s"] = dict(seconds)
  stage = (f"iter_{best['iteration']}" if best["iteration"] > 0 and not best.get("m_step_skipped") else
           "sft" if best.get("name", "").startswith("SFT") else "")
  if stage:
    summary["best_checkpoint"] = os.path.join(run_dir, stage, "train")
  base = getattr(cfg, "hf_model_dir", "")
  if base and stage:
    summary["export_command"] = (f"python -m restem_jax.export --checkpoint {summary['best_checkpoint']} "
                                 f"--base {base} --out {os.path.join(run_dir, 'export')}")
  summary.update(baseline=start, iterations=iters)
  for key, name in (("base", "base"), ("sft", "SFT (human data)")):  # every starting row
    if name in named:
      summary[key] = named[name]
  t = table(rows, cfg.pass_k)
  if not multihost.is_writer():  # process 0 writes the report
    return summary
  split = ""
  if seconds:
    split = " Time: " + ", ".join(f"{k.replace('_', '-')} {v:.0f} s" for k, v in seconds.items()) + "."
  chosen = f"best iteration (by validation): {best['iteration']}"
  if best is start:
    chosen += (f", the start: no iteration validated as high as {start['name']}" if iters else
               ", the start: no ReST^EM iteration ran")
  md = (f"# ReST^EM on `{cfg.task}`\n\n{markdown(t)}\n\nAccuracies in %. ReST^EM started from "
        f"{start['name']}; {chosen} (test pass@1 {100 * best['test_pass_at_1']:.1f} vs "
        f"{100 * start['test_pass_at_1']:.1f}). Wall time {wall_time_s:.0f} s.{split}\n")
  if "best_checkpoint" in summary:
    md += f"\nBest checkpoint: `{summary['best_checkpoint']}`.\n"
  if "export_command" in summary:
    md += f"Export it as a Hugging Face folder:\n\n```bash\n{summary['export_command']}\n```\n"
  pngs = plots(run_dir, rows, cfg)
  md += "".join(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in pngs)
  with files.atomic(os.path.join(run_dir, "report.md")) as f:
    f.write(md)
  files.write_json(os.path.join(run_dir, "summary.json"), summary)
  print("\n" + plain(t))
  print(f"\n{chosen}; test pass@1 {100 * start['test_pass_at_1']:.1f} ({start['name']}) -> "
        f"{100 * best['test_pass_at_1']:.1f} ({summary['improvement_points']:+.1f} points); "
        f"wall time {wall_time_s:.0f} s{split}")
  print(f"report: {os.path.join(run_dir, 'report.md')}")
  return summary
