"""Upside-down wearers: found per subject in training and, one call at a time, at inference; their
rows turned back before every model. The data is constructed so the answer is known: a subject of
the demo data (worn normally) is turned with turn_upside_down, the same function the demo generator
uses for its upside-down wearers."""
import dataclasses

import numpy as np
import polars as pl

import notebook as nb
from conftest import smoke_config


def turn_subject(frame: pl.DataFrame, subject: str) -> pl.DataFrame:
    """The raw rows as they would be recorded had `subject` worn the device upside down."""
    x = frame.select(nb.SENSOR_COLS).to_numpy().astype(np.float32)
    rows = (frame["subject"] == subject).to_numpy()
    x[rows] = nb.turn_upside_down(x[rows])
    turned = pl.from_numpy(x, schema=nb.SENSOR_COLS, orient="row").with_columns(pl.selectors.float().fill_nan(None))
    return pl.concat([frame.drop(nb.SENSOR_COLS), turned], how="horizontal").select(frame.columns)


def test_an_upside_down_training_subject_is_found_and_turned_back_exactly(tmp_path):
    cfg = smoke_config(tmp_path)
    ds = nb.load_training_data(nb.resolve_data_dir(cfg))
    demo = ds.train_demographics
    subjects = sorted(ds.train["subject"].unique())
    # A left-handed wearer too, when there is one: mirroring and turning must compose.
    left = demo.filter(pl.col("handedness") == 0)["subject"].to_list()
    victim = left[0] if left else subjects[0]
    turned = turn_subject(ds.train, victim)
    as_worn = nb.prepare_sequences(turned, demo)
    labels = nb.sequence_labels(ds.train)
    check = nb.UpsideDownCheck.fit(as_worn, dict(zip(labels["sequence_id"], labels["orientation"])))
    assert check.flagged(as_worn) == [victim]
    assert check.flagged(nb.prepare_sequences(ds.train, demo)) == []
    fixed = nb.prepare_sequences(turned, nb.mark_upside_down(demo, [victim]))
    original = nb.prepare_sequences(ds.train, demo)
    np.testing.assert_array_equal(fixed.sensors, original.sensors)
    # The whole training path sees the corrected rows: the flag reaches the feature cache key too.
    td = nb.prepare_training_data(dataclasses.replace(ds, train=turned), cfg, tmp_path / "out")
    assert td.dataset.train_demographics.filter(pl.col(nb.UPSIDE_DOWN))["subject"].to_list() == [victim]
    plain = nb.prepare_training_data(ds, cfg, tmp_path / "out")
    imu = [c for c in plain.views["full"].columns if c.startswith(("acc_", "grav_", "lin_", "ang_vel_"))]
    # Equal up to float rounding (a quaternion turned twice comes back as -q, the same rotation).
    np.testing.assert_allclose(td.views["full"].select(imu).to_numpy(), plain.views["full"].select(imu).to_numpy(),
                               rtol=1e-4, atol=1e-4)
    off = nb.prepare_training_data(dataclasses.replace(ds, train=turned), dataclasses.replace(cfg, upside_down_fix=False),
                                   tmp_path / "out")
    gap = np.nanmax(np.abs(off.views["full"].select(imu).to_numpy() - plain.views["full"].select(imu).to_numpy()))
    assert gap > 1.0, "without the fix the upside-down wearer's features should differ"


def test_predict_turns_an_upside_down_test_subject_back_once_the_evidence_is_decisive(trained, tmp_path):
    cfg, _ = trained
    data = nb.resolve_data_dir(cfg)
    test = nb.load_sensor_csv(data / "test.csv", nb.TEST_COLS)
    demo = pl.read_csv(data / "test_demographics.csv")
    subject = sorted(test["subject"].unique())[0]
    rows = test.filter(pl.col("subject") == subject)
    serve = dataclasses.replace(cfg, subject_assignment=False)
    normal, upside = nb.Runtime(serve), nb.Runtime(serve)
    ids = rows["sequence_id"].unique(maintain_order=True).to_list()
    turned_rows = turn_subject(rows, subject)
    same, unturned = [], []
    for i, sid in enumerate(ids):
        d = demo.filter(pl.col("subject") == subject)
        before = upside.stats.turned
        a = normal.predict(rows.filter(pl.col("sequence_id") == sid), d)
        b = upside.predict(turned_rows.filter(pl.col("sequence_id") == sid), d)
        if upside.stats.turned > before:
            same.append(a == b)
        else:
            unturned.append(i)
    # No single call decides (UpsideDownCheck.CAP < DECISIVE): the first few calls are served as worn,
    # then every call is turned back. A normal wearer is never turned.
    assert normal.stats.turned == 0
    first = nb.UpsideDownCheck.DECISIVE / nb.UpsideDownCheck.CAP
    assert unturned and unturned == list(range(len(unturned))) and first <= len(unturned) <= 12, unturned
    assert same and all(same), "a call turned back must be answered as the call worn normally"
    assert normal.stats.fallbacks == upside.stats.fallbacks == 0
    assert "turned back (upside down)" in upside.summary()


def test_one_sequence_never_decides_and_a_lying_subject_is_not_turned():
    """Lying on the back moves gravity on x as far as a device worn upside down does (FACTS.md, gravity
    by posture); the check weighs the whole (x, y, z) direction, and one sequence is worth at most CAP."""
    check = nb.UpsideDownCheck(
        means=[[-0.08, 0.93, -0.35], [0.61, 0.75, 0.04], [-0.78, -0.14, -0.47], [0.01, 0.10, -0.81]],
        covariances=[(0.02 * np.eye(3)).tolist()] * 4, weights=[0.25] * 4)
    assert check.is_valid()
    def prepared(g):  # a subject's sequences, each ten rows of the given mean gravity
        n = len(g)
        x = np.zeros((10 * n, len(nb.SENSOR_COLS)), np.float32)
        x[:, :3] = np.repeat(np.asarray(g, np.float32) * nb.GRAVITY, 10, axis=0)
        meta = pl.DataFrame({"sequence_id": np.repeat([f"SEQ_{i:06d}" for i in range(n)], 10),
                             "subject": ["SUBJ_A"] * (10 * n)})
        return nb.Sequences(meta, x)
    seated = [-0.08, 0.93, -0.35]
    upside_seated = [0.08, -0.93, -0.35]
    _, e = check.evidence(prepared([upside_seated]))
    assert e[0] == nb.UpsideDownCheck.CAP and not nb.UpsideDownCheck.decide(e)
    _, e = check.evidence(prepared([[-0.78, -0.14, -0.47]] * 30 + [seated] * 10))
    assert not nb.UpsideDownCheck.decide(e) and e.sum() < 0
    _, e = check.evidence(prepared([upside_seated] * 5))
    assert nb.UpsideDownCheck.decide(e)


def test_no_subject_of_the_real_sample_is_flagged(real_sample_dir):
    """The 14 subjects of the real train_sample.csv and the 2 of the real test.csv are none of the two known
    upside-down wearers (SUBJ_019262, SUBJ_045235); four of them lie down, which the (x, y) check this
    replaced took for upside down."""
    train = nb.load_sensor_csv(real_sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    demo = pl.read_csv(real_sample_dir / "train_demographics.csv")
    labels = nb.sequence_labels(train)
    as_worn = nb.prepare_sequences(train, demo)
    check = nb.UpsideDownCheck.fit(as_worn, dict(zip(labels["sequence_id"], labels["orientation"])))
    assert check.is_valid()
    assert check.flagged(as_worn) == []
    lying = labels.filter(pl.col("orientation").str.starts_with("Lie"))["subject"].to_list()
    assert {"SUBJ_040282", "SUBJ_040733", "SUBJ_059330", "SUBJ_063346"} <= set(lying)
    test = nb.load_sensor_csv(real_sample_dir / "test.csv", nb.TEST_COLS)
    subjects, e = check.evidence(nb.prepare_sequences(test, pl.read_csv(real_sample_dir / "test_demographics.csv")))
    assert len(e) == 2 and not any(nb.UpsideDownCheck.decide(e[subjects == s]) for s in set(subjects))
