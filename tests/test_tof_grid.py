"""--tof-grid: the raw 8x8 ToF grids as net inputs (a per-frame 2D CNN in both frameworks), the
left-hand mirror that flips every grid, and a grid-reading bundle served through the very path the
CV views ran."""
import dataclasses

import numpy as np
import polars as pl
import pytest

import notebook as nb
from conftest import smoke_config

torch = pytest.importorskip("torch")


def pixel_col(sensor: int, row: int, col: int) -> int:
    return nb.SENSOR_COLS.index(f"tof_{sensor}_v{row * 8 + col}")


def test_a_left_hand_flips_every_grid_and_swaps_sensors_3_and_5():
    x = np.zeros((1, len(nb.SENSOR_COLS)), np.float32)
    x[0, pixel_col(1, 2, 0)] = 11.0  # row 2, leftmost column
    x[0, pixel_col(3, 0, 1)] = 33.0
    m = nb.mirror_sensors(x)
    assert m[0, pixel_col(1, 2, 7)] == 11.0 and m[0, pixel_col(1, 2, 0)] == 0.0
    assert m[0, pixel_col(5, 0, 6)] == 33.0 and m[0, pixel_col(3, 0, 1)] == 0.0
    rng = np.random.default_rng(0)
    y = rng.normal(size=(5, len(nb.SENSOR_COLS))).astype(np.float32)
    np.testing.assert_array_equal(nb.mirror_sensors(nb.mirror_sensors(y)), y)
    # A mirror and an upside-down turn commute (prepare_sequences undoes them in one order); the
    # quaternion up to its sign (q and -q are the same rotation).
    a, b = nb.turn_upside_down(nb.mirror_sensors(y)), nb.mirror_sensors(nb.turn_upside_down(y))
    q = slice(3, 7)
    np.testing.assert_allclose(np.delete(a, np.r_[q], axis=1), np.delete(b, np.r_[q], axis=1))
    np.testing.assert_allclose(a[:, q] * np.sign((a[:, q] * b[:, q]).sum(1, keepdims=True)), b[:, q], rtol=1e-6)


def test_grid_channels_are_the_canonical_pixels_and_blank_in_the_imu_only_view(tmp_path):
    cfg = smoke_config(tmp_path, tof_grid=True)
    ds = nb.load_training_data(nb.resolve_data_dir(cfg))
    demo = ds.train_demographics
    if not (demo["handedness"] == 0).any():  # no left hand in this draw: read the first subject as one
        first = demo["subject"][0]
        demo = demo.with_columns(pl.when(pl.col("subject") == first).then(0).otherwise(pl.col("handedness"))
                                 .alias("handedness"))
        ds = dataclasses.replace(ds, train_demographics=demo)
    left = ds.train_demographics.filter(pl.col("handedness") == 0)["subject"].to_list()
    rows = ds.train.filter(pl.col("subject") == left[0])
    prepared, channels = nb.derive(rows, ds.train_demographics, cfg)
    inputs = nb.net_inputs_from(prepared, channels, tof_grid=True)
    assert inputs.names[-len(nb.TOF_GRID_CHANNELS):] == nb.TOF_GRID_CHANNELS
    grid = np.vstack(inputs.arrays)[:, -len(nb.TOF_GRID_CHANNELS):]
    raw = prepared.block(nb.TOF_COLS)  # canonical (mirrored back) pixels
    np.testing.assert_array_equal(grid, np.where(raw < 0, nb.TOF_NO_RESPONSE, raw))
    assert (grid == nb.TOF_NO_RESPONSE).any() and np.isfinite(grid).any()
    # What the recording holds is the mirror image: sensor 5's columns reversed become sensor 3's.
    recorded = rows.select(nb.TOF_COLS).to_numpy().astype(np.float32)
    flipped = recorded.reshape(-1, 5, 8, 8)[:, [0, 1, 4, 3, 2], :, ::-1].reshape(len(recorded), 320)
    np.testing.assert_array_equal(np.nan_to_num(raw, nan=-9), np.nan_to_num(flipped, nan=-9))
    blank = nb.net_inputs_from(*nb.derive(nb.blank_modalities(rows), ds.train_demographics, cfg), tof_grid=True)
    assert np.isnan(np.vstack(blank.arrays)[:, -len(nb.TOF_GRID_CHANNELS):]).all()
    assert nb.net_inputs_from(prepared, channels).names == inputs.names[:-len(nb.TOF_GRID_CHANNELS)]


def grid_model(**kw):
    cfg = nb.parse_config(["--profile", "smoke", "--tof-grid", "true", "--net-variants", "all"], environ={})
    cfg = dataclasses.replace(cfg, **kw)
    torch.manual_seed(0)
    model = nb.build_torch_model(cfg, 10 + len(nb.TOF_GRID_CHANNELS))
    model.eval()
    return model


def test_torch_grid_encoder_reads_the_pixels_and_ignores_padding():
    model = grid_model()
    c = 10 + len(nb.TOF_GRID_CHANNELS)
    torch.manual_seed(1)
    seq, demo = torch.randn(1, 23, c), torch.randn(1, 7)
    with torch.no_grad():
        alone = model(seq, torch.tensor([23]), demo)
        padded = torch.randn(2, 60, c) * 100  # padding that would show if it leaked
        padded[0, :23] = seq[0]
        batch = model(padded, torch.tensor([23, 60]), torch.cat([demo, demo]))
        moved = seq.clone()
        moved[0, :, -len(nb.TOF_GRID_CHANNELS):] = torch.roll(moved[0, :, -len(nb.TOF_GRID_CHANNELS):], 9, dims=1)
        other = model(moved, torch.tensor([23]), demo)
    torch.testing.assert_close(batch["y18"][:1], alone["y18"], rtol=1e-4, atol=1e-5)
    assert (other["y18"] - alone["y18"]).abs().max() > 1e-4, "the grid pixels do not reach the output"
    with torch.autocast("cpu", dtype=torch.float16):  # the path Kaggle's GPU runs
        half = model(seq, torch.tensor([23]), demo)
    assert torch.isfinite(half["y18"]).all()


def test_an_imu_only_variant_reads_no_grid():
    cfg = nb.parse_config(["--profile", "smoke", "--tof-grid", "true", "--net-variants", "imu"], environ={})
    assert nb.tof_grid_pixels(cfg) == 0
    assert nb.tof_grid_pixels(dataclasses.replace(cfg, net_variants=("all",))) == len(nb.TOF_GRID_CHANNELS)


@pytest.fixture(scope="module")
def grid_trained(tmp_path_factory):
    """A smoke run whose nets read the grids (both frameworks), served afterwards. IMU-only variants
    train beside them, so the bundle holds members with and without a grid encoder."""
    tmp = tmp_path_factory.mktemp("grid")
    cfg = smoke_config(tmp, tof_grid=True, models="torch,keras", net_variants="all,imu")
    report = nb.train(cfg)
    return cfg, report


@pytest.mark.parametrize("family", ["torch", "keras"])
def test_grid_nets_serve_what_both_cv_views_measured(grid_trained, family):
    """predict()'s runtime gives each view's OOF for a sequence as recorded and with thm/tof nulled."""
    cfg, _ = grid_trained
    out = nb.Path(cfg.out_dir)
    ds = nb.load_training_data(nb.Path(cfg.data_dir))
    seqs = pl.read_csv(out / "oof" / "sequences.csv")
    runtime = nb.Runtime(dataclasses.replace(cfg, tof_grid=False))  # the bundle's own setting must win
    runtime.load()
    assert runtime.cfg.tof_grid and not runtime.bundle.left_out
    assert set(runtime.bundle.models) == {"torch", "torch_imu", "keras", "keras_imu"}
    loaded, bundle = runtime.bundle.models[family], runtime.bundle
    left = set(ds.train_demographics.filter(pl.col("handedness") == 0)["subject"].to_list())
    picks = [i for i, s in enumerate(seqs["subject"]) if s in left][:1] + [0]
    for i in picks:
        sid, fold = seqs["sequence_id"][i], seqs["fold"][i]
        runtime.bundle = dataclasses.replace(
            bundle, models={family: nb.LoadedMember(loaded.member, [loaded.folds[fold]], np.ones(1))})
        raw = ds.train.filter(pl.col("sequence_id") == sid)
        demo = ds.train_demographics.filter(pl.col("subject") == raw["subject"][0])
        for view, seq in (("full", raw), ("imu_only", nb.blank_modalities(raw))):
            probas, served_view, _ = runtime.proba(
                seq.drop(["sequence_type", "orientation", "behavior", "phase", "gesture"]), demo)
            assert served_view == view
            oof = np.load(out / "oof" / f"oof_{family}_{view}.npy")
            np.testing.assert_allclose(probas[family][0], oof[i], rtol=1e-4, atol=1e-5)
