"""The "train anywhere, upload the bundle" use: a bundle trained with requirements.txt serves under
Kaggle's image versions (mid-2025: Keras 3.8, TF 2.18, torch 2.6, LightGBM 4.5, polars 1.21,
numpy 1.26), and the pipeline runs there end to end. The README's test command installs that set
(requirements-kaggle.txt) into .venv-kaggle; CMITEST_KAGGLE_PYTHON points elsewhere if wanted."""
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

import notebook as nb
from conftest import ROOT, run_script

KAGGLE_PYTHON = Path(os.environ.get("CMITEST_KAGGLE_PYTHON", ROOT / ".venv-kaggle" / "bin" / "python"))


@pytest.fixture(scope="module")
def kaggle_python() -> Path:
    if not KAGGLE_PYTHON.exists():
        message = (f"{KAGGLE_PYTHON} not found. Fix: python3 -m venv .venv-kaggle && "
                   f".venv-kaggle/bin/pip install -r requirements-kaggle.txt (the README's test command does it), "
                   f"or set CMITEST_KAGGLE_PYTHON to the Python of such an environment")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return KAGGLE_PYTHON


def test_the_environment_holds_kaggles_versions(kaggle_python):
    code = "import keras, lightgbm, torch, polars, numpy; print(keras.__version__, lightgbm.__version__, " \
           "torch.__version__.split('+')[0], polars.__version__, numpy.__version__)"
    res = subprocess.run([str(kaggle_python), "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["3.8.0", "4.5.0", "2.6.0", "1.21.0", "1.26.4"]


def test_bundle_trained_here_serves_under_kaggles_versions(trained, kaggle_python, tmp_path):
    cfg, _ = trained
    data = tmp_path / "data"
    data.mkdir()
    for name in ("test.csv", "test_demographics.csv"):
        shutil.copy(Path(cfg.data_dir) / name, data / name)
    subs = {}
    for label, python in (("here", None), ("kaggle", kaggle_python)):
        res = run_script("--stage", "infer", "--model-path", str(Path(cfg.out_dir) / "bundle"), "--data-dir",
                         str(data), "--out-dir", str(tmp_path / label), "--subject-assignment", "false",
                         "--upside-down-fix", "false", cwd=tmp_path, python=python)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "serving lgbm, torch, torch_sqz, keras" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
        assert "fallback: 0 calls" in res.stdout and "problems: none" in res.stdout
        subs[label] = pl.read_parquet(tmp_path / label / "submission.parquet").sort("sequence_id")
    assert subs["here"].equals(subs["kaggle"])


def test_smoke_pipeline_runs_under_kaggles_versions(kaggle_python, tmp_path):
    res = run_script("--profile", "smoke", "--lgbm-threads", "1", cwd=tmp_path, python=kaggle_python)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "serving lgbm, torch, torch_sqz, keras" in res.stdout and "problems: none" in res.stdout
    sub = pl.read_parquet(tmp_path / "working" / "submission.parquet")
    assert set(sub["gesture"]) <= set(nb.GESTURES) and sub.height > 0
