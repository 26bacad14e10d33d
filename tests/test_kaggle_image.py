"""The "train anywhere, upload the bundle" use, under Kaggle's images: a bundle trained with
requirements.txt serves there with the same answers, and the pipeline runs there end to end.

Two images, since a Kaggle notebook may pin the environment it was created with:
- mid-2025, the competition's (Python 3.11; Keras 3.8, TF 2.18, torch 2.6, LightGBM 4.5, polars 1.21,
  numpy 1.26): requirements-kaggle.txt, which the README's test command installs into .venv-kaggle
  (CMITEST_KAGGLE_PYTHON points elsewhere);
- late-2026 (Python 3.12; Keras 3.13, TF 2.20, torch 2.11, LightGBM 4.6, polars 1.35, numpy 2.0):
  requirements-kaggle-2026.txt, installed here into .venv-kaggle-2026 with the first Python 3.12 found
  (CMITEST_KAGGLE_2026_PYTHON, python3.12 on the PATH, or pyenv's); skipped, saying so, where none is.
"""
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

import notebook as nb
from conftest import ROOT, run_script

KAGGLE_PYTHON = Path(os.environ.get("CMITEST_KAGGLE_PYTHON", ROOT / ".venv-kaggle" / "bin" / "python"))
LATE_2026 = ROOT / ".venv-kaggle-2026"
EXPECTED = {"mid-2025": ["3.8.0", "4.5.0", "2.6.0", "1.21.0", "1.26.4", "3.11"],
            "late-2026": ["3.13.2", "4.6.0", "2.11.0", "1.35.2", "2.0.2", "3.12"]}


def _python_312() -> str | None:
    """A Python 3.12 to build the late-2026 environment with."""
    found = [os.environ.get("CMITEST_KAGGLE_2026_PYTHON"), shutil.which("python3.12"),
             *sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]
    for python in filter(None, found):
        res = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                             capture_output=True, text=True, timeout=60)
        if res.stdout.strip() == "True":
            return python
    return None


def _late_2026_python() -> Path:
    """.venv-kaggle-2026, made from requirements-kaggle-2026.txt once (a marker file says it is complete)."""
    python, done = LATE_2026 / "bin" / "python", LATE_2026 / ".installed"
    wanted = (ROOT / "requirements-kaggle-2026.txt").read_text()
    if done.exists() and done.read_text() == wanted:
        return python
    base = _python_312()
    if base is None:
        pytest.skip("no Python 3.12 found (CMITEST_KAGGLE_2026_PYTHON, python3.12 on the PATH, ~/.pyenv/versions/3.12*): "
                    "install one (e.g. pyenv install 3.12) to test Kaggle's late-2026 image")
    subprocess.run([base, "-m", "venv", "--clear", str(LATE_2026)], check=True, timeout=300)
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements-kaggle-2026.txt")],
                         capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, "installing requirements-kaggle-2026.txt failed:\n" + res.stderr[-3000:]
    done.write_text(wanted)
    return python


@pytest.fixture(scope="module", params=["mid-2025", "late-2026"])
def kaggle_python(request) -> tuple[str, Path]:
    if request.param == "late-2026":
        return request.param, _late_2026_python()
    if not KAGGLE_PYTHON.exists():
        message = (f"{KAGGLE_PYTHON} not found. Fix: python3 -m venv .venv-kaggle && "
                   f".venv-kaggle/bin/pip install -r requirements-kaggle.txt (the README's test command does it), "
                   f"or set CMITEST_KAGGLE_PYTHON to the Python of such an environment")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return request.param, KAGGLE_PYTHON


def test_the_environment_holds_kaggles_versions(kaggle_python):
    image, python = kaggle_python
    code = ("import sys, keras, lightgbm, torch, polars, numpy; print(keras.__version__, lightgbm.__version__, "
            "torch.__version__.split('+')[0], polars.__version__, numpy.__version__, "
            "'%d.%d' % sys.version_info[:2])")
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-6:] == EXPECTED[image]


def test_bundle_trained_here_serves_under_kaggles_versions(trained, kaggle_python, tmp_path):
    cfg, _ = trained
    _, python = kaggle_python
    data = tmp_path / "data"
    data.mkdir()
    for name in ("test.csv", "test_demographics.csv", "demo_config.json"):
        shutil.copy(Path(cfg.data_dir) / name, data / name)
    subs = {}
    for label, interpreter in (("here", None), ("kaggle", python)):
        res = run_script("--stage", "infer", "--model-path", str(Path(cfg.out_dir) / "bundle"), "--data-dir",
                         str(data), "--out-dir", str(tmp_path / label), "--subject-assignment", "false",
                         "--upside-down-fix", "false", cwd=tmp_path, python=interpreter)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "serving lgbm, torch, torch_imu, keras, keras_imu" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
        assert "left out" not in res.stdout and "load-time proof" not in res.stderr  # the proof holds there
        assert "fallback: 0 calls" in res.stdout and "problems: none" in res.stdout
        subs[label] = pl.read_parquet(tmp_path / label / "submission.parquet").sort("sequence_id")
    assert subs["here"].equals(subs["kaggle"])


def test_smoke_pipeline_runs_under_kaggles_versions(kaggle_python, tmp_path):
    _, python = kaggle_python
    res = run_script("--profile", "smoke", "--lgbm-threads", "1", cwd=tmp_path, python=python)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "serving lgbm, torch, torch_imu, keras, keras_imu" in res.stdout and "problems: none" in res.stdout
    sub = pl.read_parquet(tmp_path / "working" / "submission.parquet")
    assert set(sub["gesture"]) <= set(nb.GESTURES) and sub.height > 0
