"""notebooks/restem_jax.ipynb runs headless, start to end, on a small configuration: the
tiny run, its report, two checkpoints compared, best-of-N, SmolLM2 on GSM8K."""
import json
import os

import pytest

pm = pytest.importorskip("papermill")  # in the test extras; the accelerator image lacks it
import nbformat  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "restem_jax.ipynb")
pytestmark = pytest.mark.xdist_group("notebook")  # its kernel is a process of its own


def _outputs(cell) -> str:
  text = []
  for o in cell.get("outputs", []):
    text.append(o.get("text", "") if o["output_type"] == "stream" else o.get("data", {}).get("text/plain", ""))
  return "\n".join(text)


def test_the_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert "parameters" in code[0].metadata.get("tags", [])  # papermill's parameters cell


def test_the_notebook_runs_headless(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as in a user's kernel
  run_dir, out = tmp_path / "run", tmp_path / "executed.ipynb"
  pm.execute_notebook(NOTEBOOK, str(out), cwd=os.path.join(ROOT, "notebooks"), progress_bar=False,
                      parameters=dict(RUN_DIR=str(run_dir), BEST_OF_N_DIR=str(tmp_path / "no_such_run"),
                                      EVAL_LIMIT=32, BEST_OF_N_PROBLEMS=16, GSM8K_PROBLEMS=2,
                                      GSM8K_MAX_NEW_TOKENS=48))
  nb = nbformat.read(str(out), as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
  summary = json.loads((run_dir / "summary.json").read_text())  # the tiny run was made
  report = next(c for c in code if "report.frame" in c.source)
  pngs = [o for o in report.outputs if "image/png" in o.get("data", {})]
  assert len(pngs) == 2  # train_vs_test.png and pass_at_k.png, inline
  table = next(o for o in report.outputs if "text/html" in o.get("data", {}))["data"]["text/plain"]
  for row in ["SFT (human data)"] + [r["name"] for r in summary["iterations"]]:
    assert row in table
  looked = _outputs(next(c for c in code if "evaluation.evaluate(ckpt" in c.source))
  assert "greedy_pass@1" in looked and "go from wrong to right" in looked
  verdict = _outputs(next(c for c in code if "verify_batch" in c.source))
  assert "verdict:    Result(" in verdict and "steps right: [" in verdict
  bon = (run_dir / "best_of_n" / "best_of_n.csv").read_text().splitlines()
  assert bon[0] == "N,pass@N,majority" and [int(line.split(",")[0]) for line in bon[1:]] == [1, 2, 4, 8, 16]
  pass_at_n = [float(line.split(",")[1]) for line in bon[1:]]
  assert pass_at_n == sorted(pass_at_n)
  real = _outputs(next(c for c in code if "gguf.smollm2_path()" in c.source))
  assert "<|im_start|>user" in real and "gsm8k/test/1" in real and "greedy_pass@1" in real
