"""Shared fixtures: the real sample files, a smoke demo dataset and a smoke-trained bundle."""
import os
import subprocess
import sys
from pathlib import Path

# Busy-waiting OpenMP threads slow LightGBM/torch ~100x when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT.parent / "shared" / "cmi-sample"

import notebook as nb  # noqa: E402


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "train_sample.csv").exists():
        pytest.skip(f"{SAMPLE} not present")
    return SAMPLE


def smoke_config(tmp: Path, **overrides) -> "nb.Config":
    cfg = nb.parse_config(["--profile", "smoke", "--demo", "--data-dir", str(tmp / "demo"),
                           "--out-dir", str(tmp / "out"), "--lgbm-threads", "1"], environ={})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One smoke training run shared by the inference tests: (config, report)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = smoke_config(tmp)
    report = nb.train(cfg)
    return cfg, report


def run_script(*args, cwd, env_extra=None, timeout=600, python=None):
    """notebook.py as a user runs it: a subprocess in `cwd` (outside any scoring rerun)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env_extra or {})}
    env.pop("KAGGLE_IS_COMPETITION_RERUN", None)
    return subprocess.run([python or sys.executable, str(ROOT / "notebook.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def install_standin_gateway(data: Path) -> None:
    """The stand-in kaggle_evaluation package (tests/standin, whose docstring lists what it reproduces
    of the real one), placed beside the data as the competition download ships it."""
    (data / "kaggle_evaluation").mkdir(parents=True, exist_ok=True)
    (data / "kaggle_evaluation" / "__init__.py").write_text("")
    (data / "kaggle_evaluation" / "cmi_inference_server.py").write_text(
        (ROOT / "tests" / "standin" / "cmi_inference_server.py").read_text())
