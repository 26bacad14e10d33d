"""The nets' training recipe: the mixed-precision paths Kaggle's GPU runs (forced here on the CPU with
tiny models), augmentations that agree with the physics of the derived channels, and auxiliary
targets that stay aligned with the steps they label."""
import dataclasses

import numpy as np
import polars as pl
import pytest

import notebook as nb
from conftest import smoke_config

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def smoke_fold(tmp_path_factory):
    """Net inputs and targets of the smoke demo data, split 2:1."""
    tmp = tmp_path_factory.mktemp("recipe")
    cfg = smoke_config(tmp, net_variants="all")  # one member's config
    ds = nb.load_training_data(nb.resolve_data_dir(cfg))
    inputs = nb.net_inputs_from(*nb.derive(ds.train, ds.train_demographics, cfg))
    targets = nb.net_targets(ds.train, nb.label_index(nb.sequence_labels(ds.train)["gesture"].to_list(), nb.GESTURES))
    train = np.arange(len(targets.y)) % 3 != 0
    return tmp, cfg, inputs, targets, train


def test_torch_fp16_autocast_with_grad_scaler_trains_and_serves(smoke_fold):
    """--torch-precision fp16 is what torch_precision(auto) picks on CUDA; forced on the CPU here."""
    tmp, cfg, inputs, targets, train = smoke_fold
    cfg = dataclasses.replace(cfg, torch_precision="fp16", epochs=2, torch_phase_pool=True)
    model = nb.build_torch_model(cfg, len(inputs.names))
    x, lengths, demo = nb.torch_batch(inputs.arrays[:4], inputs.demographics[:4],
                                      nb.InputScaler.fit(inputs, np.arange(len(inputs.names)), 0), "cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x, lengths, demo)
    assert out["y18"].dtype == torch.float16, "autocast did not run the heads in fp16"
    records = []
    res = nb.train_torch_fold(cfg, inputs.subset(train), targets.subset(train), {"full": inputs.subset(~train)},
                              targets.y[~train], 0, records.append)
    assert [r["precision"] for r in records] == ["fp16", "fp16"] and res["bad_steps"] == 0
    assert all(np.isfinite(r["loss"]) for r in records)
    served = nb.build_torch_model(cfg, len(res["scaler"].columns))
    served.load_state_dict(res["state"])
    p = nb.torch_heads(nb.NetFold(served, res["scaler"]), inputs.subset(~train))["gesture"]
    assert np.isfinite(p).all() and np.allclose(p.sum(1), 1, atol=1e-4)


def test_torch_fp16_falls_back_to_fp32_after_non_finite_losses(smoke_fold, monkeypatch, capsys):
    tmp, cfg, inputs, targets, train = smoke_fold
    cfg = dataclasses.replace(cfg, torch_precision="fp16", epochs=1)
    monkeypatch.setattr(nb, "NET_RECIPE", {**nb.NET_RECIPE, "max_bad_steps": 2, "batch_size": 16})
    real, calls = nb.head_losses, []

    def overflowing(*args, **kw):  # the first steps overflow, as fp16 can on a GPU
        gesture, extra = real(*args, **kw)
        calls.append(1)
        return ([l * float("inf") for l in gesture], extra) if len(calls) <= 2 else (gesture, extra)

    monkeypatch.setattr(nb, "head_losses", overflowing)
    records = []
    res = nb.train_torch_fold(cfg, inputs.subset(train), targets.subset(train), {"full": inputs.subset(~train)},
                              targets.y[~train], 0, records.append)
    assert res["bad_steps"] == 2 and records[-1]["precision"] == "fp32"
    assert "continues in fp32" in capsys.readouterr().out
    assert np.isfinite(records[-1]["loss"])


def test_keras_mixed_float16_trains_and_its_weights_serve_in_float32(smoke_fold, monkeypatch):
    """keras_policy() answers mixed_float16 on a GPU; forced here. A bundle trained so must also
    load where the policy is float32 (a local rerun on a CPU)."""
    pytest.importorskip("keras")
    tmp, cfg, inputs, targets, train = smoke_fold
    monkeypatch.setattr(nb, "keras_policy", lambda: "mixed_float16")
    cfg = dataclasses.replace(cfg, epochs=1)
    res = nb.train_keras_fold(cfg, inputs.subset(train), targets.subset(train), {"full": inputs.subset(~train)},
                              targets.y[~train], 0, lambda rec: None)
    model = res["model"]
    assert any(getattr(layer, "compute_dtype", "") == "float16" for layer in model.layers)
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    va = inputs.subset(~train)
    mixed = nb.keras_heads(nb.NetFold(nb.KerasPredictor(model, len(res["scaler"].mean)), res["scaler"]), va)["gesture"]
    assert np.isfinite(mixed).all()
    path = tmp / "mixed.weights.npz"
    nb.save_keras_fold(path, model, res["scaler"])
    monkeypatch.setattr(nb, "keras_policy", lambda: "float32")
    loaded, scaler = nb.load_keras_fold(path, cfg)
    plain = nb.keras_heads(nb.NetFold(nb.KerasPredictor(loaded, len(scaler.mean)), scaler), va)["gesture"]
    np.testing.assert_allclose(plain, mixed, atol=2e-2)


def test_a_turned_device_mount_equals_recomputing_the_channels(sample_dir):
    """The rotation augmentation on derived channels gives what the physics channels of a device
    mounted turned by r would be: acc' = r acc, orientation q r*."""
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    one = train.filter(pl.col("sequence_id") == train["sequence_id"][0])
    seq_ids = one["sequence_id"].to_numpy()
    acc, rot = one.select(nb.ACC_COLS).to_numpy(), one.select(nb.ROT_COLS).to_numpy()
    names = list(nb.imu_channels(acc, rot, seq_ids, 10.0))
    before = np.column_stack(list(nb.imu_channels(acc, rot, seq_ids, 10.0).values()))
    r = nb._small_rotation(np.random.default_rng(3), 25.0)
    turned = nb.turn_device_frame(before, names, r, np.zeros((len(acc), 3)))
    q = nb.clean_quaternions(rot, seq_ids)[0]
    recomputed = nb.imu_channels(nb.quat_rotate(r, acc), nb.quat_multiply(q, nb.quat_conjugate(r)), seq_ids, 10.0)
    for c in ("acc_x", "acc_z", "lin_y", "grav_x", "ang_vel_z", "rot_w", "rot_y", "rot_angle", "lin_world_x",
              "lin_world_z", "lin_mag", "acc_mag"):
        np.testing.assert_allclose(turned[:, names.index(c)], recomputed[c], atol=2e-3, err_msg=c)
    # A bias in the accelerometer shows in the world frame too, turned by the orientation.
    drift = np.tile([0.0, 0.0, 0.5], (len(acc), 1))
    biased = nb.turn_device_frame(before, names, np.array([1.0, 0, 0, 0]), drift)
    world = nb.imu_channels(acc + drift, rot, seq_ids, 10.0)
    for c in ("acc_z", "lin_world_x", "lin_world_y", "lin_world_z", "lin_mag"):
        np.testing.assert_allclose(biased[:, names.index(c)], world[c], atol=2e-3, err_msg=c)


def test_time_stretch_divides_the_rate_channels():
    """A turn about z at a constant rate, resampled to twice its length, is the same turn at half
    the rate: ang_vel and ang_dist halve, the orientation path is unchanged."""
    n, fs, rate = 60, 10.0, 1.2  # rad/s
    t = np.arange(n) / fs
    rot = np.column_stack([np.cos(rate * t / 2), 0 * t, 0 * t, np.sin(rate * t / 2)])
    acc = np.tile([0.0, 0.0, nb.GRAVITY], (n, 1))
    ch = nb.imu_channels(acc, rot, np.zeros(n), fs)
    names = list(ch)
    stretched = nb.stretch_time(np.column_stack(list(ch.values())), names, 2.0)
    slow = nb.imu_channels(acc[:1].repeat(2 * n, 0),
                           np.column_stack([np.cos(rate * np.arange(2 * n) / fs / 4), 0 * np.arange(2 * n),
                                            0 * np.arange(2 * n), np.sin(rate * np.arange(2 * n) / fs / 4)]),
                           np.zeros(2 * n), fs)
    inner = slice(5, -5)
    for c in ("ang_vel_z", "ang_vel_mag", "ang_dist"):
        np.testing.assert_allclose(stretched[inner, names.index(c)], slow[c][inner], rtol=0.05, err_msg=c)
    np.testing.assert_allclose(stretched[inner, names.index(c)].mean(), rate / 2 / fs, rtol=0.05)


def test_the_phase_target_rides_along_with_its_steps(smoke_fold, monkeypatch):
    """Stretched, cropped to --max-len and mixed, the per-step phase target still marks the steps
    it belongs to: 0 before the gesture, 1 during it, and nothing in the padding."""
    tmp, cfg, inputs, targets, train = smoke_fold
    monkeypatch.setattr(nb, "AUGMENTATIONS", {**nb.AUGMENTATIONS, "time_stretch": 1.0, "mixup": 0.0, "rotation": 0.0})
    cfg = dataclasses.replace(cfg, max_len=40)
    scaler = nb.InputScaler.fit(inputs, np.arange(len(inputs.names)), cfg.max_len)
    idx = np.arange(8)
    x, lengths, demo, y, orientation, behavior, phase = nb.training_batch(inputs, targets, idx, scaler, cfg,
                                                                          np.random.default_rng(0))
    assert x.shape[:2] == phase.shape and (lengths <= 40).all()
    for row, i in enumerate(idx):
        p = phase[row, :lengths[row]]
        assert np.all(np.diff(p) >= -1e-6), "the gesture phase comes last and stays"
        assert p[-1] == pytest.approx(targets.phase[i][-1])
        assert (phase[row, lengths[row]:] == 0).all()
    np.testing.assert_array_equal(orientation.argmax(1), targets.orientation[idx])


def test_phase_targets_follow_the_pooled_steps():
    """One target per phase-head step (stride input steps each), valid only where every step it
    covers is, for both nets: the torch net's own pooled mask marks exactly the valid targets."""
    phase = np.array([[0, 0, 1, 1, 1, 1, 0, 0]], dtype=np.float32)  # the last two steps are padding
    np.testing.assert_array_equal(nb.phase_targets(phase, np.array([6]), stride=2), [[0.0, 1.0, 1.0, -1.0]])
    mixed = nb.phase_targets(np.array([[0, 1, 1, 1]], np.float32), np.array([4]), stride=2, steps=4)
    np.testing.assert_array_equal(mixed, [[0.5, 1.0, -1.0, -1.0]])  # Keras: padded to 8 input steps
    net = nb.GestureNet(3, 7, (8, 8), 4, 0.0, True)  # two blocks: stride 4
    lengths = np.array([37, 16, 9])
    x = nb.torch.zeros(3, 40, 3)
    o = net.eval()(x, nb.torch.from_numpy(lengths), nb.torch.zeros(3, 7))
    target = nb.phase_targets(np.zeros((3, 40), np.float32), lengths, net.phase_stride)
    np.testing.assert_array_equal(o["phase_mask"].numpy(), target >= 0)
