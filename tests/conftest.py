"""Shared fixtures: competition-schema sample files (made here, or the real ones when named), a smoke
demo dataset and a smoke-trained bundle.

Nothing here reads outside the repository unless a test-suite variable asks for it. The suite's own
variables start with CMITEST_, never CMI_ (that prefix is the notebook's configuration):
- CMITEST_SAMPLE_DIR: a folder holding the real competition sample (train_sample.csv, the first rows
  of the competition's train.csv, and train_demographics.csv, test.csv, test_demographics.csv). The
  tests that take `sample_dir` then run on it as well as on the made fixture, and those that take
  `real_sample_dir` run at all. `.ci/run` sets it.
- CMITEST_KAGGLE_PYTHON: the Python of Kaggle's image (tests/test_kaggle_image.py).
"""
import os
import subprocess
import sys
from pathlib import Path

# Busy-waiting OpenMP threads slow LightGBM/torch ~100x when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import notebook as nb  # noqa: E402

SAMPLE_ENV = "CMITEST_SAMPLE_DIR"
SAMPLE_FILES = ("train_sample.csv", "train_demographics.csv", "test.csv", "test_demographics.csv")
HOW_TO_ENABLE_REAL = (f"the real competition sample is not given: set {SAMPLE_ENV}=/path/to/folder holding "
                      f"{', '.join(SAMPLE_FILES)} (train_sample.csv = the first 1,000 rows of the competition's "
                      f"train.csv) to run this test; .ci/run sets it to ../shared/cmi-sample")


def given_real_sample() -> Path | None:
    """The folder CMITEST_SAMPLE_DIR names, or None. Named but incomplete is an error, not a skip."""
    value = os.environ.get(SAMPLE_ENV)
    if not value:
        return None
    folder = Path(value).resolve()
    missing = [f for f in SAMPLE_FILES if not (folder / f).is_file()]
    if missing:
        pytest.fail(f"{SAMPLE_ENV}={value}: {folder} lacks {missing}. Fix: point it at the folder with the "
                    f"real sample files, or unset it to run on the made fixture only")
    return folder


def _sample_config(seed: int) -> "nb.Config":
    return nb.parse_config(["--profile", "smoke", "--seed", str(seed), "--demo-train-subjects", "20",
                            "--demo-test-subjects", "3", "--demo-pairs-per-subject", "2"], environ={})


def make_sample_folder(out: Path) -> Path:
    """A folder shaped like the real competition sample, made by the notebook's own demo generator, with
    the real files' quirks arranged so that every test meets them:
    - train_sample.csv: the head of a train.csv sorted by sequence_id (15 sequences of several subjects,
      the last cut short), among them a left-handed subject's sequence, rows whose four rotation
      cells are empty and a sequence with no rotation at all; ToF -1 (no response) throughout;
    - test.csv: IMU-only sequences first (every thm/tof cell empty), so that a reader inferring types
      from the first 100 rows, as the gateway does, gets String-typed all-null columns; a left-handed
      test subject;
    - demographics as the real files: every training subject, one row per test subject."""
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(50):  # the first seed whose draw has left-handed subjects in train and in test
        data = nb.generate_demo_dataset(out / f"demo_seed{seed}", _sample_config(seed))
        train_demo = pl.read_csv(data / "train_demographics.csv")
        test_demo = pl.read_csv(data / "test_demographics.csv")
        if (train_demo["handedness"] == 0).any() and (test_demo["handedness"] == 0).any():
            break
    else:
        raise AssertionError("no demo draw with left-handed subjects in train and test")
    train = nb.load_sensor_csv(data / "train.csv", nb.TRAIN_COLS).sort("sequence_id", "sequence_counter")
    ids = train["sequence_id"].unique(maintain_order=True).to_list()
    left = set(train_demo.filter(pl.col("handedness") == 0)["subject"])
    left_seq = train.filter(pl.col("subject").is_in(left))["sequence_id"][0]
    chosen = sorted(ids[:14] if left_seq in ids[:14] else [*ids[:13], left_seq])
    last = next(i for i in ids if i not in chosen)
    rows = pl.concat([train.filter(pl.col("sequence_id").is_in(chosen)),
                      train.filter(pl.col("sequence_id") == last).head(20)])  # the last sequence cut short
    no_rot, gap = chosen[1], chosen[2]
    rot_empty = (pl.col("sequence_id") == no_rot) | ((pl.col("sequence_id") == gap)
                                                     & pl.col("sequence_counter").is_between(3, 5))
    rows = rows.with_columns([pl.when(rot_empty).then(None).otherwise(pl.col(c)).alias(c) for c in nb.ROT_COLS])
    rows.write_csv(out / "train_sample.csv")
    (out / "train_demographics.csv").write_bytes((data / "train_demographics.csv").read_bytes())

    test = nb.load_sensor_csv(data / "test.csv", nb.TEST_COLS)
    empty = test.group_by("sequence_id").agg(pl.col("thm_1").is_null().all().alias("imu_only"), pl.len())
    order = empty.sort(["imu_only", "len", "sequence_id"], descending=[True, True, False])["sequence_id"]
    test = test.join(pl.DataFrame({"sequence_id": order, "rank": np.arange(order.len())}), on="sequence_id")
    test = test.sort("rank", "sequence_counter").drop("rank")
    assert test.head(100)["thm_1"].is_null().all() and not test["thm_1"].is_null().all()
    test.write_csv(out / "test.csv")
    (out / "test_demographics.csv").write_bytes((data / "test_demographics.csv").read_bytes())
    return out


@pytest.fixture(scope="session")
def made_sample_dir(tmp_path_factory) -> Path:
    return make_sample_folder(tmp_path_factory.mktemp("made_sample"))


@pytest.fixture(scope="session", params=["made", "real"])
def sample_dir(request) -> Path:
    """Competition-schema sample files: the made fixture always, the real sample when it is given."""
    if request.param == "made":
        return request.getfixturevalue("made_sample_dir")
    real = given_real_sample()
    if real is None:
        pytest.skip(HOW_TO_ENABLE_REAL)
    return real


@pytest.fixture(scope="session")
def real_sample_dir() -> Path:
    """The real competition sample only, for the tests whose point is the real files themselves."""
    real = given_real_sample()
    if real is None:
        pytest.skip(HOW_TO_ENABLE_REAL)
    return real


def smoke_config(tmp: Path, **overrides) -> "nb.Config":
    cfg = nb.parse_config(["--profile", "smoke", "--demo", "--data-dir", str(tmp / "demo"),
                           "--out-dir", str(tmp / "out"), "--lgbm-threads", "1"], environ={})
    fields = {f.name: f for f in nb.dataclasses.fields(nb.Config)}
    for k, v in overrides.items():  # as a flag would give it: a list field's text becomes its tuple
        setattr(cfg, k, nb.checked_value(fields[k], v, k))
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


def sequence_ids(csv: Path) -> list[str]:
    """The sequence ids of a competition CSV in file order."""
    return pl.read_csv(csv, columns=["sequence_id"])["sequence_id"].unique(maintain_order=True).to_list()


def full_sensor_sequence(frame: pl.DataFrame) -> str:
    """The first sequence id whose thermopiles and ToF are present (a test about what they carry)."""
    present = frame.group_by("sequence_id", maintain_order=True).agg(pl.col("thm_1").is_not_null().all().alias("ok"))
    return present.filter("ok")["sequence_id"][0]


def two_sequences(frame: pl.DataFrame) -> list[str]:
    """Two distinct sequence ids of a test frame: a full-sensor one, then the first other one (IMU-only
    in the made fixture, full-sensor in the real sample)."""
    full = full_sensor_sequence(frame)
    return [full, next(s for s in frame["sequence_id"].unique(maintain_order=True) if s != full)]


def _config_field(source: str, name: str):
    """The `name: type = ...` statement of the Config class in `source` (its AST node), and the source's
    line offsets, so an edit of the Config cell is made where the field is, whatever its doc text says."""
    import ast
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Config")
    node = next(n for n in cls.body if isinstance(n, ast.AnnAssign) and n.target.id == name)
    starts = np.cumsum([0] + [len(line) for line in source.splitlines(keepends=True)])
    return node, lambda line, col: int(starts[line - 1]) + col


def default_edited(source: str, name: str, value: str) -> str:
    """The Config cell with field `name`'s default changed to `value` inside its _doc() call, as a user
    edits it (`_doc("...", 4, low=2)`)."""
    node, at = _config_field(source, name)
    call = node.value
    if len(call.args) > 1:  # a default is there: replace it
        start, end = at(call.args[1].lineno, call.args[1].col_offset), at(call.args[1].end_lineno, call.args[1].end_col_offset)
        return source[:start] + value + source[end:]
    end = at(call.args[0].end_lineno, call.args[0].end_col_offset)
    return source[:end] + f", {value}" + source[end:]


def plainly_edited(source: str, name: str, value: str) -> str:
    """The Config cell with field `name` rewritten as a plain `name: <type> = value`, its _doc() gone."""
    node, at = _config_field(source, name)
    start, end = at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)
    return source[:start] + f"{name}: {source[at(node.annotation.lineno, node.annotation.col_offset):at(node.annotation.end_lineno, node.annotation.end_col_offset)]} = {value}" + source[end:]
