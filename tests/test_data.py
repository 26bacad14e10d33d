"""Loading, validation and the demo dataset's schema: on the made sample folder (conftest), and on the
real competition sample when CMITEST_SAMPLE_DIR names it."""
import csv
import shutil

import numpy as np
import polars as pl
import pytest

import notebook as nb
from conftest import sequence_ids, smoke_config


def test_real_sample_files_load_as_float32(sample_dir):
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    assert train.columns == nb.TRAIN_COLS
    assert all(train.schema[c] == pl.Float32 for c in nb.SENSOR_COLS)
    assert train.height == pl.read_csv(sample_dir / "train_sample.csv", columns=["row_id"]).height
    demo = nb.load_demographics(sample_dir / "train_demographics.csv")
    assert demo.height == pl.read_csv(sample_dir / "train_demographics.csv").height
    assert set(train["subject"]) <= set(demo["subject"])
    nb.validate_train(train, demo, sample_dir / "train_sample.csv")
    test = nb.load_sensor_csv(sample_dir / "test.csv", nb.TEST_COLS)
    assert all(test.schema[c] == pl.Float32 for c in nb.SENSOR_COLS)
    assert test["sequence_id"].unique(maintain_order=True).to_list() == sequence_ids(sample_dir / "test.csv")


def test_the_schema_constants_are_the_real_files_headers(real_sample_dir):
    """The column lists the notebook (and its demo generator, and the made fixture) rely on are the
    competition's own, in order."""
    for name, cols in [("train_sample.csv", nb.TRAIN_COLS), ("test.csv", nb.TEST_COLS),
                       ("train_demographics.csv", nb.DEMO_COLS), ("test_demographics.csv", nb.DEMO_COLS)]:
        assert pl.read_csv(real_sample_dir / name, n_rows=0).columns == cols, name


def _write_train(tmp_path, sample_dir, edit):
    rows = list(csv.reader(open(sample_dir / "train_sample.csv")))
    rows = edit(rows)
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    shutil.copy(sample_dir / "train_demographics.csv", tmp_path / "train_demographics.csv")
    return path


def test_missing_column_names_file_and_column(tmp_path, sample_dir):
    _write_train(tmp_path, sample_dir, lambda r: [x[:9] + x[10:] for x in r])  # drop acc_x
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
    first = pl.read_csv(tmp_path / "train.csv", columns=["subject"], n_rows=1)["subject"][0]
    demo.filter(pl.col("subject") != first).write_csv(tmp_path / "train_demographics.csv")
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


def test_demo_dataset_follows_the_competition_schema(tmp_path):
    cfg = smoke_config(tmp_path)
    d = nb.generate_demo_dataset(tmp_path / "demo", cfg)
    for name, cols in [("train.csv", nb.TRAIN_COLS), ("test.csv", nb.TEST_COLS),
                       ("train_demographics.csv", nb.DEMO_COLS), ("test_demographics.csv", nb.DEMO_COLS)]:
        assert pl.read_csv(d / name, n_rows=0).columns == cols, name
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
    plain = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    assert frame.columns[0] == "row_id" and frame.equals(plain)


def test_demo_sequences_follow_the_real_phase_structure(tmp_path):
    """Start (still or relaxing), move, a pause at the target, then the gesture at the end; lengths
    in the real range; upside-down wearers among the training subjects as in the real data."""
    cfg = smoke_config(tmp_path, demo_train_subjects=12, demo_test_subjects=1, demo_pairs_per_subject=6)
    d = nb.generate_demo_dataset(tmp_path / "demo", cfg)
    train = pl.read_csv(d / "train.csv", infer_schema_length=None)
    for _, seq in train.group_by("sequence_id"):
        behav = seq.sort("sequence_counter")["behavior"].to_list()
        runs = [b for i, b in enumerate(behav) if i == 0 or b != behav[i - 1]]
        assert runs[1:] == ["Hand at target location", "Performs gesture"] and runs[0] in nb.START_BEHAVIORS, runs
    lengths = train.group_by("sequence_id").len()["len"]
    assert 20 <= lengths.min() and lengths.max() <= 700 and 45 <= lengths.median() <= 90
    stamp = nb.json.loads((d / "demo_config.json").read_text())
    assert len(stamp["upside_down_subjects"]) == nb.demo_upside_down_count(12) == 1
    assert set(stamp["upside_down_subjects"]) <= set(train["subject"])


def test_turning_the_device_upside_down_keeps_the_world_frame():
    """Worn upside down, the device reports acc x/y negated and its orientation composed with the
    same turn: the acceleration seen in the world frame is unchanged; turning twice is the identity."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (20, len(nb.SENSOR_COLS))).astype(np.float64)
    q = rng.normal(0, 1, (20, 4))
    x[:, 3:7] = q / np.linalg.norm(q, axis=1, keepdims=True)
    turned = nb.turn_upside_down(x)
    np.testing.assert_allclose(turned[:, :2], -x[:, :2])
    np.testing.assert_allclose(nb.quat_rotate(turned[:, 3:7], turned[:, :3]), nb.quat_rotate(x[:, 3:7], x[:, :3]),
                               atol=1e-12)
    grid = turned[:, 12:].reshape(20, 5, 8, 8)
    np.testing.assert_allclose(grid, np.rot90(x[:, 12:].reshape(20, 5, 8, 8), 2, axes=(2, 3)))
    back = nb.turn_upside_down(turned)
    np.testing.assert_allclose(np.abs(np.einsum("ij,ij->i", back[:, 3:7], x[:, 3:7])), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.delete(back, range(3, 7), axis=1), np.delete(x, range(3, 7), axis=1))


def test_a_long_wait_never_pushes_the_gesture_out_of_a_demo_sequence():
    """Real sequences are at most 700 rows and end with the gesture: the slowest subjects' long
    still starts (up to 450 steps / tempo) must give way, not truncate the gesture or overflow."""
    rng = np.random.default_rng(0)
    for _ in range(3000):
        n_start, n_move, n_pause, n_gest = nb._demo_timeline(rng, nb.START_BEHAVIORS[1], 0.6, False)
        assert n_start >= 0 and n_gest >= 14 and n_start + n_move + n_pause + n_gest <= 700


def _digests(folder):
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_demo_data_never_overwrites_a_folder_of_competition_files(tmp_path, sample_dir):
    from conftest import run_script
    data = tmp_path / "data"
    data.mkdir()
    for name in ("test.csv", "test_demographics.csv", "train_demographics.csv"):
        shutil.copy(sample_dir / name, data / name)
    before = _digests(data)
    res = run_script("--demo", "--data-dir", str(data), "--profile", "smoke", cwd=tmp_path, timeout=300)
    assert res.returncode != 0 and "DataError:" in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    assert str(data) in res.stderr and "Fix:" in res.stderr and "test.csv" in res.stderr
    assert _digests(data) == before, "the real files must be left byte for byte"
    # A folder the generator wrote itself (it marks it) is its own to rewrite.
    cfg = smoke_config(tmp_path / "own")
    nb.resolve_data_dir(cfg)
    cfg.seed += 1
    assert nb.resolve_data_dir(cfg) == nb.Path(cfg.data_dir) and nb.is_demo_folder(nb.Path(cfg.data_dir))


def test_inference_without_test_files_stops_naming_the_folder_and_what_it_needs(tmp_path, sample_dir):
    from conftest import run_script
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    shutil.copy(sample_dir / "test.csv", only_test / "test.csv")
    for args, missing in ((["--data-dir", str(only_test)], "['test_demographics.csv']"),
                          ([], "['test.csv', 'test_demographics.csv']")):
        res = run_script("--stage", "infer", *args, cwd=tmp_path, timeout=300)
        assert res.returncode != 0 and f"missing {missing}" in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
        assert "Fix: pass --data-dir" in res.stderr and "predict:" not in res.stdout
    assert not (tmp_path / "demo_data").exists(), "an inference-only run never generates data"


def test_the_demo_goes_beside_the_out_folder_and_never_into_kaggles_output(tmp_path, monkeypatch):
    cfg = nb.parse_config(["--out-dir", str(tmp_path / "runs" / "out")], environ={})
    assert cfg.demo and cfg.data_dir == str(tmp_path / "runs" / "demo_data")
    assert nb.feature_cache_dir(cfg) == tmp_path / "runs" / "out" / "cache"
    monkeypatch.setattr(nb, "on_kaggle", lambda: True)
    monkeypatch.setattr(nb, "KAGGLE_DATA_DIR", tmp_path / "no-competition-attached")
    on_kaggle = nb.parse_config([], environ={})
    assert on_kaggle.out_dir == "/kaggle/working" and on_kaggle.profile == "full"
    for path in (on_kaggle.data_dir, str(nb.feature_cache_dir(on_kaggle))):
        assert not path.startswith("/kaggle/working") and path.startswith(nb.tempfile.gettempdir()), path


def test_a_sequence_of_two_subjects_or_with_a_broken_counter_stops_training(tmp_path, sample_dir):
    """Half a sequence mirrored as another subject's hand, or rows counted twice, would train silently."""
    def two_subjects(rows):
        rows[3][rows[0].index("subject")] = "SUBJ_999999"
        return rows

    def empty_counter(rows):
        rows[3][rows[0].index("sequence_counter")] = ""
        return rows

    def counter_gap(rows):
        return rows[:3] + rows[4:]  # the first sequence loses its row 3: 0, 1, 2, 4, ...
    for edit, message in ((two_subjects, r"sequence '.*' has rows of several values in column 'subject'.*Fix:"),
                          (empty_counter, r"column 'sequence_counter' has 1 empty cells.*Fix:"),
                          (counter_gap, r"'sequence_counter' does not run 0..n-1 in sequence .*Fix:")):
        path = _write_train(tmp_path, sample_dir, edit)
        with pytest.raises(nb.DataError, match=message) as err:
            nb.load_training_data(tmp_path)
        assert str(path) in str(err.value)


def test_demographics_out_of_range_stop_training_and_are_repaired_when_serving(tmp_path, sample_dir):
    _write_train(tmp_path, sample_dir, lambda r: r)
    demo = pl.read_csv(tmp_path / "train_demographics.csv")
    demo.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(2).otherwise(pl.col("handedness")).alias("handedness"))\
        .write_csv(tmp_path / "train_demographics.csv")
    with pytest.raises(nb.DataError, match=r"column 'handedness' holds '2' for subject .*0 or 1.*Fix:"):
        nb.load_training_data(tmp_path)
    bad = pl.DataFrame({"subject": ["S"], "age": [-5], "height_cm": [1e9], "handedness": ["left"], "sex": [0.5]})
    assert nb.demographic_problems(bad) == ["age", "sex", "handedness", "height_cm"]
    row = nb.clean_demographics(bad).row(0, named=True)  # every bad or absent cell gets its default
    assert all(row[c] == pytest.approx(v) for c, v in nb.DEFAULT_DEMOGRAPHICS.items())
