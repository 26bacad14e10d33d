"""The Keras twin: save/load round trip, padding invariance, lazy TensorFlow import."""
import subprocess
import sys

import numpy as np
import pytest

import notebook as nb
from conftest import ROOT, smoke_config

pytest.importorskip("keras")


@pytest.fixture(scope="module")
def keras_fold(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keras")
    cfg = smoke_config(tmp, net_variants="all")  # one member's config
    nb.resolve_data_dir(cfg)
    ds = nb.load_training_data(nb.Path(cfg.data_dir))
    labels = nb.sequence_labels(ds.train)
    inputs = nb.net_inputs_from(*nb.derive(ds.train, ds.train_demographics, cfg))
    y = np.array([nb.GESTURE_INDEX[g] for g in labels["gesture"]])
    mask = np.arange(len(y)) % 3 != 0
    targets = nb.net_targets(ds.train, nb.label_index(nb.sequence_labels(ds.train)["gesture"].to_list(), nb.GESTURES))
    res = nb.train_keras_fold(cfg, inputs.subset(mask), targets.subset(mask), {"full": inputs.subset(~mask)}, y[~mask],
                              0, lambda rec: None)
    return tmp, res, inputs.subset(~mask)


def test_save_load_round_trip_gives_identical_predictions(keras_fold):
    """Weights saved as arrays, the architecture rebuilt from the config: the same outputs."""
    tmp, res, va = keras_fold
    path = tmp / "fold.weights.npz"
    nb.save_keras_fold(path, res["model"], res["scaler"])
    loaded, scaler = nb.load_keras_fold(path, smoke_config(tmp, net_variants="all"))
    np.testing.assert_array_equal(scaler.mean, res["scaler"].mean)
    c = len(res["scaler"].mean)
    a = nb.keras_heads(nb.NetFold(nb.KerasPredictor(res["model"], c), res["scaler"]), va)["gesture"]
    b = nb.keras_heads(nb.NetFold(nb.KerasPredictor(loaded, c), scaler), va)["gesture"]
    np.testing.assert_array_equal(a, b)


def test_more_padding_does_not_change_the_output(keras_fold):
    _, res, va = keras_fold
    model, scaler = res["model"], res["scaler"]
    arr, demo = va.arrays[0], va.demographics[:1]
    alone = nb.keras_inputs([arr], demo, scaler)
    padded = {k: v.copy() for k, v in alone.items()}
    extra = nb.KERAS_BUCKET * 3
    padded["x"] = np.pad(padded["x"], ((0, 0), (0, extra), (0, 0)))
    padded["x"][:, -extra:] = 7.0  # garbage in the padding must not leak through
    padded["mask"] = np.pad(padded["mask"], ((0, 0), (0, extra)))
    pred = nb.KerasPredictor(model, len(scaler.mean))
    np.testing.assert_allclose(pred(alone)["gesture"], pred(padded)["gesture"], rtol=1e-5, atol=1e-6)


def test_both_frameworks_step_through_one_schedule(keras_fold):
    """keras_learning_rate reads a float, and a schedule at the optimizer's step; the Keras twin's
    optimizer and the torch net's scheduler give the same rate at every step, from lr_factors (linear
    warmup, then cosine to zero, kept past the end)."""
    import keras
    tmp, res, _ = keras_fold
    cfg = smoke_config(tmp, net_variants="all")
    peak = nb.NET_RECIPE["lr"]
    assert nb.keras_learning_rate(keras.optimizers.AdamW(learning_rate=3e-4)) == pytest.approx(3e-4)
    steps_per_epoch = 5
    factors = nb.lr_factors(cfg, steps_per_epoch)
    total, warmup = len(factors) - 1, factors.index(1.0) + 1
    assert 0 < warmup < total and factors[0] < factors[warmup - 1] == 1.0 and factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(factors[warmup:], factors[warmup + 1:])), "cosine decay after the warmup"
    opt = keras.optimizers.AdamW(nb.keras_layers().StepRates([peak * f for f in factors]))
    model = nb.build_torch_model(cfg, 10)
    torch_opt, sched = nb.torch_optimizer(cfg, model, nb.UncertaintyWeights(3), steps_per_epoch)
    for step in range(total + 4):
        opt.iterations.assign(step)
        assert nb.keras_learning_rate(opt) == pytest.approx(torch_opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), step
        assert torch_opt.param_groups[1]["lr"] == pytest.approx(10 * torch_opt.param_groups[0]["lr"]), step
        torch_opt.step()
        sched.step()
    # After training, the optimizer stepped once per batch of every epoch (patience 0: none skipped),
    # and the rate read is the schedule's at that step.
    trained_opt = res["model"].optimizer
    done = int(trained_opt.iterations)
    assert done > 0 and done % cfg.epochs == 0
    assert nb.keras_learning_rate(trained_opt) == pytest.approx(peak * nb.lr_factors(cfg, done // cfg.epochs)[-1], abs=1e-9)


def test_importing_the_notebook_does_not_import_tensorflow():
    code = "import sys, notebook; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False False", res.stderr
