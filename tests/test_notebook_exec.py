"""notebook.ipynb runs top to bottom in a Jupyter kernel (smoke profile, configured by CMI_* env)."""
import os

import pytest

from conftest import ROOT

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


def test_notebook_executes_top_to_bottom(tmp_path, monkeypatch):
    env = {"CMI_PROFILE": "smoke", "CMI_DEMO": "1", "CMI_DATA_DIR": str(tmp_path / "demo"),
           "CMI_OUT_DIR": str(tmp_path / "out"), "CMI_LGBM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    book = nbformat.read(ROOT / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "expected LB" in text and "gateway: builtin" in text and "submission:" in text
    images = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "plots should appear inline when run as a notebook"
    assert (tmp_path / "out" / "submission.parquet").exists()
