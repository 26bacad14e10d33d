"""notebook.ipynb as a Kaggler runs it: in a Jupyter kernel, configured only through its own settings
cell. A training run (smoke profile) trains and serves with its plots inline, under the pinned stack and
under Kaggle's mid-2025 one (matplotlib 3.7, where pyplot's show() in the cell that first imports pyplot
shows nothing under ipykernel 7). On the pinned stack a second run, with the inference-only settings,
then serves the first run's bundle without training."""
import json
import os
import subprocess
import sys

import polars as pl
import pytest

from conftest import ROOT
from test_kaggle_image import KAGGLE_PYTHON

EXECUTE = """
import json, sys, matplotlib, nbclient, nbformat
book = nbformat.read(sys.argv[1], as_version=4)
settings = [c for c in book.cells if "settings" in c.get("metadata", {}).get("tags", [])]
assert len(settings) == 1, "exactly one settings cell"
settings[0].source = sys.argv[3]
nbclient.NotebookClient(book, timeout=900, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[2]}}).execute()
outputs = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])]
print("RESULT " + json.dumps({"matplotlib": matplotlib.__version__,
                              "text": "".join(o.get("text", "") for o in outputs),
                              "images": sum("image/png" in o.get("data", {}) for o in outputs)}))
"""


def execute(python, tmp_path, settings: dict[str, str]) -> dict:
    """Run notebook.ipynb with its settings cell replaced by `%env` lines, nothing else configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMI_")}
    env.pop("KAGGLE_IS_COMPETITION_RERUN", None)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    cell = "\n".join(f"%env {k}={v}" for k, v in settings.items())
    # The kernel is the interpreter that runs nbclient (ipykernel's own kernel spec).
    res = subprocess.run([str(python), "-c", EXECUTE, str(ROOT / "notebook.ipynb"), str(tmp_path), cell], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.split("RESULT ", 1)[1])


@pytest.mark.parametrize("stack", ["pinned", "kaggle-mid-2025"])
def test_the_notebook_trains_then_serves_inference_only_from_its_settings_cell(stack, tmp_path):
    python = sys.executable if stack == "pinned" else KAGGLE_PYTHON
    if stack != "pinned" and not KAGGLE_PYTHON.exists():
        message = (f"{KAGGLE_PYTHON} missing: python3 -m venv .venv-kaggle && .venv-kaggle/bin/pip install -r "
                   f"requirements-kaggle.txt (the README's test command does it), or set CMITEST_KAGGLE_PYTHON")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    train_out = tmp_path / "train" / "working"
    result = execute(python, tmp_path, {"CMI_PROFILE": "smoke", "CMI_OUT_DIR": str(train_out),
                                        "CMI_LGBM_THREADS": "1"})
    if stack != "pinned":
        assert result["matplotlib"].startswith("3.7.")
    text = result["text"]
    assert "config: profile=smoke" in text and "(demo)" in text
    assert "expected LB" in text and "gateway: builtin" in text and "submission:" in text
    assert text.count("run summary:") == 1, "one run summary, at the end"
    assert result["images"] >= 4, "plots should appear inline when run as a notebook"
    assert (train_out / "submission.parquet").exists()
    demo = train_out.parent / "demo_data"
    assert (demo / "test.csv").exists(), "the demo data goes beside the out folder"

    if stack != "pinned":
        return  # the inference-only journey runs the same cells; once is enough for CI's time
    infer_out = tmp_path / "infer" / "working"
    result = execute(python, tmp_path, {"CMI_STAGE": "infer", "CMI_MODEL_PATH": str(train_out / "bundle"),
                                        "CMI_DATA_DIR": str(demo), "CMI_OUT_DIR": str(infer_out)})
    text = result["text"]
    assert f"serving the bundle {train_out / 'bundle'}: trained with profile=smoke" in text
    assert "fold 0:" not in text and "training: done" not in text, "nothing trains in an inference-only run"
    assert "fallback: 0 calls" in text and "problems: none" in text
    served = pl.read_parquet(infer_out / "submission.parquet")
    assert served.height == pl.read_csv(demo / "test.csv")["sequence_id"].n_unique()
