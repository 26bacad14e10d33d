"""Loading, validation and the demo dataset's schema, against the real sample files."""
import csv
import shutil

import numpy as np
import polars as pl
import pytest

import notebook as nb
from conftest import smoke_config


def test_real_sample_files_load_as_float32(sample_dir):
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    assert train.columns == nb.TRAIN_COLS
    assert all(train.schema[c] == pl.Float32 for c in nb.SENSOR_COLS)
    demo = nb.load_demographics(sample_dir / "train_demographics.csv")
    assert demo.height == 81
    nb.validate_train(train, demo, sample_dir / "train_sample.csv")
    test = nb.load_sensor_csv(sample_dir / "test.csv", nb.TEST_COLS)
    assert test["sequence_id"].n_unique() == 2


def _write_train(tmp_path, sample_dir, edit):
    rows = list(csv.reader(open(sample_dir / "train_sample.csv")))
    rows = edit(rows)
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    shutil.copy(sample_dir / "train_demographics.csv", tmp_path / "train_demographics.csv")
    return path


def test_missing_column_names_file_and_column(tmp_path, sample_dir):
    path = _write_train(tmp_path, sample_dir, lambda r: [x[:9] + x[10:] for x in r])  # drop acc_x
    with pytest.raises(nb.DataError, match=r"train.csv.*acc_x.*Fix"):
        nb.load_training_data(tmp_path)


def test_unknown_gesture_is_refused(tmp_path, sample_dir):
    def edit(rows):
        rows[5][8] = "Cheek - Pinch Skin"
        return rows
    _write_train(tmp_path, sample_dir, edit)
    with pytest.raises(nb.DataError, match=r"'gesture'.*Cheek - Pinch Skin"):
        nb.load_training_data(tmp_path)


def test_non_numeric_sensor_value_names_the_column(tmp_path, sample_dir):
    def edit(rows):
        rows[3][rows[0].index("thm_2")] = "hot"
        return rows
    _write_train(tmp_path, sample_dir, edit)
    with pytest.raises(nb.DataError, match=r"'thm_2'.*hot"):
        nb.load_training_data(tmp_path)


def test_duplicate_row_ids_and_counter_order(tmp_path, sample_dir):
    _write_train(tmp_path, sample_dir, lambda r: r + [r[10]])
    with pytest.raises(nb.DataError, match="row_id"):
        nb.load_training_data(tmp_path)

    def edit(rows):
        rows[4][0] = rows[4][0] + "x"
        rows[4][3] = rows[2][3]  # a repeated counter inside one sequence
        return rows
    _write_train(tmp_path, sample_dir, edit)
    with pytest.raises(nb.DataError, match="sequence_counter"):
        nb.load_training_data(tmp_path)


def test_subject_missing_from_demographics_warns_and_uses_defaults(tmp_path, sample_dir, caplog):
    _write_train(tmp_path, sample_dir, lambda r: r)
    demo = pl.read_csv(tmp_path / "train_demographics.csv")
    demo.filter(pl.col("subject") != "SUBJ_059520").write_csv(tmp_path / "train_demographics.csv")
    ds = nb.load_training_data(tmp_path)
    assert "missing from demographics" in caplog.text
    feats = nb.build_features(ds.train, ds.train_demographics, smoke_config(tmp_path))
    assert feats.height == ds.train["sequence_id"].n_unique()


def test_string_typed_all_null_columns_are_cast(sample_dir):
    test = pl.read_csv(sample_dir / "test.csv", infer_schema_length=100)
    test = test.with_columns([pl.lit(None, dtype=pl.String).alias(c) for c in nb.THM_COLS + nb.TOF_COLS[:70]])
    clean = nb.sanitize_sequences(test)
    assert clean.sensors.dtype == np.float32 and clean.sensors.shape == (test.height, len(nb.SENSOR_COLS))
    assert np.isnan(clean.block(nb.THM_COLS)).all()
    assert not np.isnan(clean.block(nb.ACC_COLS)).any()
    assert clean.meta.equals(clean.meta.sort("sequence_id", "sequence_counter"))


def test_demo_dataset_follows_the_competition_schema(tmp_path, sample_dir):
    cfg = smoke_config(tmp_path)
    d = nb.generate_demo_dataset(tmp_path / "demo", cfg)
    for name, real in [("train.csv", "train_sample.csv"), ("test.csv", "test.csv"),
                       ("train_demographics.csv", "train_demographics.csv"),
                       ("test_demographics.csv", "test_demographics.csv")]:
        assert nb.read_csv_header(d / name) == nb.read_csv_header(sample_dir / real), name
    train = pl.read_csv(d / "train.csv")
    test = pl.read_csv(d / "test.csv", infer_schema_length=None)
    assert set(train["gesture"].unique()) <= set(nb.GESTURES)
    assert train["row_id"].str.contains(r"^SEQ_\d{6}_\d{6}$").all()
    assert train["subject"].str.contains(r"^SUBJ_\d{6}$").all()
    assert set(train["phase"].unique()) == {"Transition", "Gesture"}
    rot = train.select(nb.ROT_COLS).drop_nulls()
    assert (rot["rot_w"] >= 0).all()
    tof = train.select(nb.TOF_COLS).to_numpy().ravel()
    tof = tof[~np.isnan(tof)]
    assert (tof == np.round(tof)).all() and tof.min() == -1 and tof.max() <= 249
    # the study design: no (orientation, gesture, behaviour) repeats within a subject
    starts = train.filter(pl.col("sequence_counter") == 0)
    assert starts.select("subject", "orientation", "gesture", "behavior").is_unique().all()
    allowed = set(nb.allowed_pairs())
    assert all(p in allowed for p in starts.select("orientation", "gesture").iter_rows())
    assert not set(train["subject"]) & set(test["subject"])
    # a share of test sequences is IMU-only: every thm/tof cell empty
    imu_only = test.group_by("sequence_id").agg(pl.col("thm_1").is_null().all().alias("e"))
    assert 0 < imu_only["e"].sum() < imu_only.height
    demo = pl.read_csv(d / "train_demographics.csv")
    assert demo["handedness"].is_in([0, 1]).all()


def test_study_design_has_51_pairs():
    assert len(nb.allowed_pairs()) == 51


def test_header_only_train_csv_stops_with_the_file_and_fix(tmp_path, sample_dir):
    header = (sample_dir / "train_sample.csv").read_text().splitlines()[0]
    (tmp_path / "train.csv").write_text(header + "\n")
    with pytest.raises(nb.DataError, match=r"train.csv: has a header but no data rows.*Fix:"):
        nb.load_sensor_csv(tmp_path / "train.csv", nb.TRAIN_COLS)


def test_train_csv_with_a_byte_order_mark_loads(tmp_path, sample_dir):
    """Excel saves UTF-8 with a BOM; its first column name must still read as row_id."""
    raw = (sample_dir / "train_sample.csv").read_bytes()
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbf" + raw)
    frame = nb.load_sensor_csv(tmp_path / "train.csv", nb.TRAIN_COLS)
    assert frame.columns[0] == "row_id" and frame.height == 1000
