"""notebook.ipynb runs top to bottom in a Jupyter kernel (smoke profile, configured by CMI_* env),
with its plots inline, under the pinned stack and under Kaggle's mid-2025 one (matplotlib 3.7,
where pyplot's show() in the cell that first imports pyplot shows nothing under ipykernel 7)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from test_kaggle_image import KAGGLE_PYTHON

EXECUTE = """
import json, sys, matplotlib, nbclient, nbformat
book = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(book, timeout=900, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[2]}}).execute()
outputs = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])]
print("RESULT " + json.dumps({"matplotlib": matplotlib.__version__,
                              "text": "".join(o.get("text", "") for o in outputs),
                              "images": sum("image/png" in o.get("data", {}) for o in outputs)}))
"""


@pytest.mark.parametrize("stack", ["pinned", "kaggle-mid-2025"])
def test_notebook_executes_top_to_bottom_with_inline_plots(stack, tmp_path):
    python = sys.executable if stack == "pinned" else KAGGLE_PYTHON
    if stack != "pinned" and not KAGGLE_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{KAGGLE_PYTHON} missing: install requirements-kaggle.txt (the README's test command does)")
        pytest.skip(f"{KAGGLE_PYTHON} missing: python3 -m venv .venv-kaggle && .venv-kaggle/bin/pip install -r "
                    f"requirements-kaggle.txt (the README's test command does it), or set CMITEST_KAGGLE_PYTHON")
    env = {**os.environ, "CMI_PROFILE": "smoke", "CMI_DEMO": "1", "CMI_DATA_DIR": str(tmp_path / "demo"),
           "CMI_OUT_DIR": str(tmp_path / "out"), "CMI_LGBM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("KAGGLE_IS_COMPETITION_RERUN", None)
    # The kernel is the interpreter that runs nbclient (ipykernel's own kernel spec).
    res = subprocess.run([str(python), "-c", EXECUTE, str(ROOT / "notebook.ipynb"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(res.stdout.split("RESULT ", 1)[1])
    if stack != "pinned":
        assert result["matplotlib"].startswith("3.7.")
    text = result["text"]
    assert "expected LB" in text and "gateway: builtin" in text and "submission:" in text
    assert result["images"] >= 4, "plots should appear inline when run as a notebook"
    assert (tmp_path / "out" / "submission.parquet").exists()
