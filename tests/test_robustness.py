"""predict() never fails: 200+ generated bad inputs, and a bad test file through the gateway."""
import time

import numpy as np
import polars as pl

import notebook as nb
from conftest import two_sequences

N_FUZZ = 210


def mutate(rng: np.random.Generator, seq: pl.DataFrame, demo: pl.DataFrame):
    """One bad (sequence, demographics) pair; the mutation kinds a real gateway or file can bring."""
    kind = int(rng.integers(0, 14))
    s, d = seq, demo
    if kind == 0:  # numeric columns as text, some unparsable
        cols = list(rng.choice(nb.SENSOR_COLS, 40, replace=False))
        s = s.with_columns([pl.col(c).cast(pl.String) for c in cols])
        s = s.with_columns(pl.when(pl.int_range(pl.len()) % 7 == 0).then(pl.lit("abc")).otherwise(pl.col(cols[0])).alias(cols[0]))
    elif kind == 1:  # NaN / inf anywhere
        x = s.select(nb.SENSOR_COLS).to_numpy().astype(np.float64)
        x[rng.random(x.shape) < 0.2] = np.nan
        x[rng.random(x.shape) < 0.05] = np.inf
        x[rng.random(x.shape) < 0.05] = -np.inf
        s = pl.concat([s.drop(nb.SENSOR_COLS), pl.from_numpy(x, schema=nb.SENSOR_COLS, orient="row")], how="horizontal")
    elif kind == 2:
        s = s.head(0)
    elif kind == 3:
        s = s.head(1)
    elif kind == 4:  # 5,000 rows
        s = pl.concat([s] * (5000 // s.height + 1)).head(5000).with_columns(
            pl.int_range(pl.len()).alias("sequence_counter"))
    elif kind == 5:  # a whole modality missing
        drop = {0: nb.THM_COLS, 1: nb.TOF_COLS, 2: nb.ROT_COLS, 3: nb.ACC_COLS}[int(rng.integers(0, 4))]
        s = s.drop(drop)
    elif kind == 6:  # shuffled column order and extra columns
        cols = list(s.columns)
        rng.shuffle(cols)
        s = s.select(cols).with_columns(pl.lit("x").alias("extra_text"), pl.lit(1.5).alias("extra_num"))
    elif kind == 7:  # all thm/tof empty and String-typed, as the gateway may infer
        s = s.with_columns([pl.lit(None, dtype=pl.String).alias(c) for c in nb.THM_COLS + nb.TOF_COLS])
    elif kind == 8:  # unknown subject, demographics of someone else or nulls
        s = s.with_columns(pl.lit("SUBJ_999999").alias("subject"))
        d = d.with_columns([pl.lit(None).alias(c) for c in ("age", "handedness", "height_cm")])
    elif kind == 9:  # demographics empty, or missing columns, or wrong types
        d = [d.head(0), d.select("subject"), d.with_columns(pl.col("age").cast(pl.String) + "y"), None][int(rng.integers(0, 4))]
    elif kind == 10:  # all-NaN quaternions, or quaternions of zero length
        s = s.with_columns([pl.lit(None, dtype=pl.Float64).alias(c) for c in nb.ROT_COLS]) if rng.random() < 0.5 \
            else s.with_columns([pl.lit(0.0).alias(c) for c in nb.ROT_COLS])
    elif kind == 11:  # counters missing, repeated or reversed
        s = [s.drop("sequence_counter"), s.with_columns(pl.lit(3).alias("sequence_counter")),
             s.reverse()][int(rng.integers(0, 3))]
    elif kind == 12:  # random dtypes per column
        for c in rng.choice(nb.SENSOR_COLS, 20, replace=False):
            dt = [pl.Int32, pl.Float64, pl.String, pl.Int64][int(rng.integers(0, 4))]
            s = s.with_columns(pl.col(c).cast(dt, strict=False))
    else:  # extreme values
        s = s.with_columns([(pl.col(c) * 1e30) for c in nb.ACC_COLS])
    return s, d


def test_fuzz_predict_always_returns_a_valid_str(trained, made_sample_dir):
    """On the made sample (IMU-only sequences first, a left-handed subject), mutated 210 ways."""
    cfg, _ = trained
    runtime = nb.set_runtime(cfg)
    test = pl.read_csv(made_sample_dir / "test.csv", infer_schema_length=100)
    demo = pl.read_csv(made_sample_dir / "test_demographics.csv")
    rng = np.random.default_rng(123)
    seqs = [test.filter(pl.col("sequence_id") == s) for s in two_sequences(test)]
    worst = 0.0
    for i in range(N_FUZZ):
        seq = seqs[i % 2]
        s, d = mutate(rng, seq, demo.filter(pl.col("subject") == seq["subject"][0]))
        t0 = time.perf_counter()
        out = nb.predict(s, d)
        worst = max(worst, time.perf_counter() - t0)
        assert type(out) is str and out in nb.GESTURES, (i, out)
    assert worst < 20.0, f"slowest call took {worst:.1f}s"
    assert runtime.stats.calls == N_FUZZ
    assert runtime.stats.problems, "the bad inputs should have been noticed and counted"
    assert "problems:" in runtime.summary()


def test_bad_test_file_through_the_gateway(trained, sample_dir, tmp_path):
    cfg, _ = trained
    nb.set_runtime(cfg)
    test = pl.read_csv(sample_dir / "test.csv", infer_schema_length=None)
    first, second = two_sequences(test)
    one_row = test.head(1).with_columns(pl.lit("SEQ_777777").alias("sequence_id"),
                                        pl.lit("SEQ_777777_000000").alias("row_id"))
    blank = test.filter(pl.col("sequence_id") == second).with_columns(
        [pl.lit(None, dtype=pl.Float64).alias(c) for c in nb.THM_COLS + nb.TOF_COLS + nb.ROT_COLS])
    bad = pl.concat([test.filter(pl.col("sequence_id") == first), blank, one_row])
    bad = bad.with_columns(pl.col("acc_x").cast(pl.String))
    bad = bad.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("oops")).otherwise(pl.col("acc_x")).alias("acc_x"))
    bad.write_csv(tmp_path / "test.csv")
    pl.read_csv(sample_dir / "test_demographics.csv").head(1).write_csv(tmp_path / "test_demographics.csv")
    sub = nb.run_builtin_gateway(tmp_path / "test.csv", tmp_path / "test_demographics.csv",
                                 tmp_path / "submission.parquet", seed=0)
    assert sorted(sub["sequence_id"]) == sorted([first, second, "SEQ_777777"])
    assert set(sub["gesture"]) <= set(nb.GESTURES)


def test_incompatible_bundle_is_refused_with_a_clear_message(trained, tmp_path):
    import json
    import shutil
    cfg, _ = trained
    bundle = tmp_path / "bundle"
    shutil.copytree(nb.Path(cfg.out_dir) / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    # One member expecting features this code does not make: that member is left out, the rest serve.
    manifest["members"]["lgbm"]["feature_names"][0] = "a_feature_this_code_does_not_make"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    assert runtime.error is None and "lgbm" not in runtime.bundle.models and set(runtime.bundle.models) == {"torch", "torch_imu", "keras", "keras_imu"}
    assert "feature" in runtime.bundle.left_out["lgbm"] and str(bundle) in runtime.bundle.left_out["lgbm"]
    # What the whole bundle depends on (class order) stops it whole, naming the file.
    manifest["members"]["lgbm"]["feature_names"][0] = "seq_len"
    manifest["class_names"] = list(reversed(nb.GESTURES))
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    assert runtime.error and "class order" in runtime.error and str(bundle) in runtime.error
