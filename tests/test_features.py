"""Feature physics on hand-built sequences, and batch == single-sequence consistency."""
import numpy as np
import polars as pl
import pytest

import notebook as nb
from conftest import full_sensor_sequence

FS = 10.0


def make_sequence(acc, rot, thm=None, tof=None, seq="SEQ_000001", subject="SUBJ_000001"):
    n = len(acc)
    cols = {"row_id": [f"{seq}_{i:06d}" for i in range(n)], "sequence_id": seq,
            "sequence_counter": np.arange(n), "subject": subject}
    for j, c in enumerate(nb.ACC_COLS):
        cols[c] = np.asarray(acc, dtype=np.float32)[:, j]
    for j, c in enumerate(nb.ROT_COLS):
        cols[c] = np.asarray(rot, dtype=np.float32)[:, j]
    thm = np.full((n, 5), np.nan) if thm is None else thm
    tof = np.full((n, 320), np.nan) if tof is None else tof
    for j, c in enumerate(nb.THM_COLS):
        cols[c] = thm[:, j].astype(np.float32)
    frame = pl.DataFrame(cols)
    return pl.concat([frame, pl.DataFrame(tof.astype(np.float32), schema=nb.TOF_COLS, orient="row")],
                     how="horizontal")


def demographics(subject="SUBJ_000001", handedness=1):
    return pl.DataFrame({"subject": [subject], "adult_child": [1], "age": [30], "sex": [1],
                         "handedness": [handedness], "height_cm": [170.0],
                         "shoulder_to_wrist_cm": [52], "elbow_to_wrist_cm": [25.0]})


def random_quats(rng, n):
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def test_gravity_removal_at_rest_in_any_orientation():
    rng = np.random.default_rng(0)
    q = random_quats(rng, 50)
    acc = nb.quat_rotate(nb.quat_conjugate(q), np.broadcast_to([0, 0, nb.GRAVITY], (50, 3)))
    seq_ids = np.array(["a"] * 50)
    # each row its own sequence: a device at rest in 50 orientations
    ch = nb.imu_channels(acc, q, np.array([f"s{i}" for i in range(50)]), FS)
    assert np.abs(ch["lin_mag"]).max() < 1e-4
    assert np.abs(np.stack([ch["lin_x"], ch["lin_y"], ch["lin_z"]])).max() < 1e-4
    del seq_ids


def test_angular_velocity_of_a_constant_rate_rotation():
    rate = 1.3  # rad/s about an oblique axis
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    t = np.arange(40) / FS
    q = np.column_stack([np.cos(rate * t / 2), np.sin(rate * t / 2)[:, None] * axis])
    q = np.where(q[:, :1] < 0, -q, q)  # stored with w >= 0: sign flips included
    acc = nb.quat_rotate(nb.quat_conjugate(q), np.broadcast_to([0, 0, nb.GRAVITY], (40, 3)))
    ch = nb.imu_channels(acc, q, np.array(["s"] * 40), FS)
    assert ch["ang_vel_mag"][1:] == pytest.approx(np.full(39, rate), rel=1e-3)
    w = np.stack([ch["ang_vel_x"], ch["ang_vel_y"], ch["ang_vel_z"]], axis=1)[1:]
    assert w == pytest.approx(np.tile(axis * rate, (39, 1)), abs=1e-3)


def test_sign_flips_do_not_create_spikes():
    rng = np.random.default_rng(1)
    q = nb.quat_from_euler(np.linspace(0, 0.5, 30), np.linspace(0, 0.2, 30), np.zeros(30))
    flipped = q * rng.choice([-1.0, 1.0], size=(30, 1))
    a = nb.imu_channels(np.zeros((30, 3)), q, np.array(["s"] * 30), FS)
    b = nb.imu_channels(np.zeros((30, 3)), flipped, np.array(["s"] * 30), FS)
    assert b["ang_vel_mag"].max() < 0.5
    assert b["ang_vel_mag"] == pytest.approx(a["ang_vel_mag"], abs=1e-4)


def test_missing_quaternions_are_interpolated_or_identity():
    q = nb.quat_from_euler(np.linspace(0, 1, 10), np.zeros(10), np.zeros(10))
    q[3:5] = np.nan
    filled, missing = nb.clean_quaternions(q, np.array(["s"] * 10))
    assert np.isfinite(filled).all() and missing.tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert np.linalg.norm(filled, axis=1) == pytest.approx(np.ones(10))
    none, flag = nb.clean_quaternions(np.full((5, 4), np.nan), np.array(["s"] * 5))
    assert (none == [1, 0, 0, 0]).all() and flag.all()


@pytest.mark.parametrize("n", [29, 1, 3])
def test_welch_features_finite_for_short_sequences(n):
    rng = np.random.default_rng(n)
    q = random_quats(rng, 1).repeat(n, axis=0)
    acc = rng.normal(0, 1, (n, 3)) + [0, 0, 9.8]
    feats = nb.build_features(make_sequence(acc, q), demographics(), smoke_config_tmp())
    welch = feats.select(pl.col("^.*__welch_.*$")).to_numpy()
    assert welch.size and np.isfinite(welch).all()


def smoke_config_tmp():
    return nb.parse_config(["--profile", "smoke"], environ={})


def test_imu_only_sequence_gives_presence_zero_and_nan_modalities():
    rng = np.random.default_rng(2)
    q = random_quats(rng, 1).repeat(40, axis=0)
    feats = nb.build_features(make_sequence(rng.normal(0, 1, (40, 3)), q), demographics(), smoke_config_tmp())
    assert feats["mod_present_thm"][0] == 0 and feats["mod_present_tof"][0] == 0
    mod = [c for c in nb.modality_columns(feats.columns) if not c.startswith("mod_present_")]
    assert len(mod) > 100
    assert np.isnan(feats.select(mod).to_numpy().astype(float)).all()


def test_tof_minus_one_is_no_response_not_a_distance():
    n = 10
    tof = np.full((n, 320), -1.0)
    tof[:, :32] = 50.0  # half of sensor 1 sees something at 50
    thm = np.full((n, 5), 30.0)
    rng = np.random.default_rng(3)
    f = nb.build_features(make_sequence(rng.normal(0, 1, (n, 3)), random_quats(rng, n), thm, tof),
                          demographics(), smoke_config_tmp())
    assert f["tof_1_mean__mean"][0] == pytest.approx(50.0)
    assert f["tof_1_valid__mean"][0] == pytest.approx(0.5)
    assert f["tof_2_valid__mean"][0] == 0.0 and np.isnan(f["tof_2_mean__mean"][0])
    assert f["mod_present_tof"][0] == 1


def test_single_sequence_features_equal_its_batch_row(sample_dir):
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    demo = nb.load_demographics(sample_dir / "train_demographics.csv")
    cfg = smoke_config_tmp()
    batch = nb.build_features(train, demo, cfg)
    for sid in batch["sequence_id"].to_list()[:5]:
        one = nb.build_features(train.filter(pl.col("sequence_id") == sid), demo, cfg)
        a = batch.filter(pl.col("sequence_id") == sid).drop("sequence_id").to_numpy().astype(float)
        b = one.drop("sequence_id").to_numpy().astype(float)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_statistics_do_not_depend_on_the_channel_block_width(sample_dir, monkeypatch):
    """Big tables take 16 channels per block (memory), small ones all at once (speed): same numbers."""
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    demo = nb.load_demographics(sample_dir / "train_demographics.csv")
    cfg = smoke_config_tmp()
    wide = nb.build_features(train, demo, cfg)
    monkeypatch.setattr(nb, "STAT_BLOCK_CELLS", 1)
    narrow = nb.build_features(train, demo, cfg)
    assert wide.columns == narrow.columns
    np.testing.assert_array_equal(wide.drop("sequence_id").to_numpy(), narrow.drop("sequence_id").to_numpy())


def test_imu_only_is_judged_on_sanitised_cells(sample_dir):
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    one = train.filter(pl.col("sequence_id") == train["sequence_id"][0])
    assert not nb.is_imu_only(nb.sanitize_sequences(one).sensors)
    assert nb.is_imu_only(nb.sanitize_sequences(nb.blank_modalities(one)).sensors)
    texty = nb.blank_modalities(one).with_columns(pl.lit("inf").alias("thm_2"), pl.lit("n/a").alias("tof_1_v0"))
    assert nb.is_imu_only(nb.sanitize_sequences(texty).sensors)
    partial = nb.blank_modalities(one).with_columns(pl.lit(31.5).alias("thm_2"))
    assert not nb.is_imu_only(nb.sanitize_sequences(partial).sensors)


def test_feature_level_blanking_equals_the_raw_imu_only_path(sample_dir):
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    demo = nb.load_demographics(sample_dir / "train_demographics.csv")
    cfg = smoke_config_tmp()
    full = nb.build_features(train, demo, cfg)
    raw_blank = nb.build_features(nb.blank_modalities(train), demo, cfg)
    names = [c for c in full.columns if c != "sequence_id"]
    blanked = nb.blank_modality_values(full.select(names).to_numpy().astype(np.float32), names)
    np.testing.assert_allclose(blanked, raw_blank.select(names).to_numpy().astype(np.float32),
                               rtol=1e-6, atol=1e-6, equal_nan=True)


def test_mirroring_twice_is_identity_and_left_twin_matches(sample_dir):
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TEST_COLS)
    seq = train.filter(pl.col("sequence_id") == full_sensor_sequence(train))
    x = nb.raw_sensor_matrix(seq)
    np.testing.assert_array_equal(nb.mirror_sensors(nb.mirror_sensors(x)), x)
    assert not np.array_equal(nb.mirror_sensors(x), x)
    # A left-hand twin: the same motion mirrored, worn by a left-handed subject.
    twin = pl.concat([seq.drop(nb.SENSOR_COLS).with_columns(pl.lit("SUBJ_L").alias("subject")),
                      pl.from_numpy(nb.mirror_sensors(x), schema=nb.SENSOR_COLS, orient="row")],
                     how="horizontal")
    cfg = smoke_config_tmp()
    right = nb.build_features(seq.with_columns(pl.lit("SUBJ_R").alias("subject")),
                              demographics("SUBJ_R", 1), cfg).drop("handedness")
    left = nb.build_features(twin, demographics("SUBJ_L", 0), cfg).drop("handedness")
    np.testing.assert_allclose(right.drop("sequence_id").to_numpy().astype(float),
                               left.drop("sequence_id").to_numpy().astype(float), rtol=1e-4, atol=1e-4)


def test_feature_cache_reuses_and_never_serves_stale(tmp_path, sample_dir):
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    demo = nb.load_demographics(sample_dir / "train_demographics.csv")
    cfg = smoke_config_tmp()
    first = nb.cached_features(train, demo, cfg, tmp_path)
    again = nb.cached_features(train, demo, cfg, tmp_path)
    assert first.equals(again)
    sid = train["sequence_id"][0]
    changed = train.with_columns(pl.when(pl.col("sequence_id") == sid)
                                 .then(pl.col("acc_x") + 1.0).otherwise(pl.col("acc_x")).alias("acc_x"))
    stale = nb.cached_features(changed, demo, cfg, tmp_path)
    fresh = nb.build_features(changed, demo, cfg)
    as_array = lambda f: f.drop("sequence_id").to_numpy().astype(float)  # noqa: E731
    assert stale["sequence_id"].equals(fresh["sequence_id"])
    np.testing.assert_allclose(as_array(stale), as_array(fresh), rtol=1e-5, atol=1e-5)
    row = stale["sequence_id"].to_list().index(sid)
    assert stale["acc_x__mean"][row] == pytest.approx(first["acc_x__mean"][row] + 1.0, abs=1e-4)


def test_vectorised_welch_equals_scipy_per_sequence():
    from scipy.signal import welch
    rng = np.random.default_rng(5)
    lengths = [1, 3, 7, 8, 29, 59, 64, 255, 256, 700, 31]
    ids = np.concatenate([[f"s{i:02d}"] * n for i, n in enumerate(lengths)])
    x = rng.normal(size=(len(ids), 2))
    sg = nb.Segments.of(ids)
    got = {}
    for group, f, p in nb.welch_psd(x, sg, FS):
        for j, i in enumerate(group):
            got[i] = (f, p[j])
    for i, n in enumerate(lengths):
        seq = x[sg.starts[i]:sg.starts[i] + n]
        if n < 8:
            seq = np.vstack([seq - seq.mean(0), np.zeros((8 - n, 2))])
        f, p = welch(seq, fs=FS, nperseg=int(min(64, max(2, len(seq) // 4))), axis=0, detrend="constant")
        np.testing.assert_allclose(got[i][0], f)
        np.testing.assert_allclose(got[i][1], p, rtol=1e-9, atol=1e-12)


def test_segment_quantiles_match_numpy():
    rng = np.random.default_rng(6)
    ids = np.repeat(["a", "b", "c"], [5, 40, 1])
    x = rng.normal(size=(46, 2)) * 1000
    x[3, 0] = np.nan
    x[45, 1] = np.nan
    st = nb.segment_stats(x, nb.Segments.of(ids))
    for i, (a, b) in enumerate([(0, 5), (5, 45), (45, 46)]):
        for c in range(2):
            v = x[a:b, c][~np.isnan(x[a:b, c])]
            want = np.quantile(v, [0.1, 0.5, 0.9]) if len(v) else [np.nan] * 3
            got = [st["q10"][i, c], st["q50"][i, c], st["q90"][i, c]]
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-8)


def test_quat_rotate_equals_scipy_and_keeps_the_rows_scipy_refuses():
    """The hand-written rotation gives scipy's Rotation.apply on unit quaternions; a NaN or zero
    quaternion, which makes scipy refuse the whole batch, spoils only its own row here."""
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(0)
    q = rng.normal(size=(500, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    v = rng.normal(size=(500, 3))
    np.testing.assert_allclose(nb.quat_rotate(q, v), Rotation.from_quat(q, scalar_first=True).apply(v), atol=1e-12)
    bad = q.copy()
    bad[0], bad[1] = np.nan, 0.0
    with pytest.raises(ValueError):
        Rotation.from_quat(bad, scalar_first=True)
    out = nb.quat_rotate(bad, v)
    assert np.isnan(out[0]).all() and np.allclose(out[2:], nb.quat_rotate(q[2:], v[2:]))
