"""The PyTorch net: packing, padding invariance, overfitting, loss weighting, resume with OOF."""
import numpy as np
import pytest

import notebook as nb
from conftest import smoke_config

torch = pytest.importorskip("torch")


def tiny_model(in_ch=10, **kw):
    cfg = nb.parse_config(["--profile", "smoke"], environ={})
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = nb.build_torch_model(cfg, in_ch)
    model.eval()
    return model


def test_packed_and_unpacked_forward_agree_without_padding():
    model = tiny_model()
    x = torch.randn(3, 40, 10)
    lengths = torch.tensor([40, 40, 40])
    demo = torch.randn(3, 7)
    with torch.no_grad():
        a = model(x, lengths, demo, packed=True)
        b = model(x, lengths, demo, packed=False)
    for k in ("y18", "y9", "y2"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [37, 4, 1])
def test_more_padding_does_not_change_a_sequence_output(length):
    model = tiny_model()
    torch.manual_seed(1)
    seq = torch.randn(1, length, 10)
    demo = torch.randn(1, 7)
    with torch.no_grad():
        alone = model(torch.nn.functional.pad(seq, (0, 0, 0, max(4 - length, 0))), torch.tensor([length]), demo)
        padded = torch.zeros(2, 90, 10)
        padded[0, :length] = seq[0]
        padded[1] = torch.randn(90, 10)
        batch = model(padded, torch.tensor([length, 90]), torch.cat([demo, torch.randn(1, 7)]))
    for k in ("y18", "y9", "y2"):
        torch.testing.assert_close(batch[k][:1], alone[k], rtol=1e-4, atol=1e-5)


def test_uncertainty_weighting_gives_gradients_to_its_log_variances():
    w = nb.UncertaintyWeights(3)
    losses = [torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True),
              torch.tensor(1.5, requires_grad=True)]
    w(losses).backward()
    assert w.s.grad is not None and (w.s.grad.abs() > 0).all()
    # d/ds (exp(-s) L + s) at s=0 is 1 - L
    torch.testing.assert_close(w.s.grad, torch.tensor([1 - 2.0, 1 - 0.5, 1 - 1.5]))


def test_combined_heads_are_a_distribution_and_respect_agreement():
    rng = np.random.default_rng(0)
    p = nb.combine_heads(rng.normal(size=(5, 18)), rng.normal(size=(5, 9)), rng.normal(size=5))
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    # All heads sure of gesture 2 (a target): the combination is sure too.
    y18 = np.full((1, 18), -20.0)
    y18[0, 2] = 20
    y9 = np.full((1, 9), -20.0)
    y9[0, 2] = 20
    assert nb.combine_heads(y18, y9, np.array([20.0])).argmax() == 2


def test_tiny_model_overfits_a_handful_of_sequences(tmp_path, monkeypatch):
    cfg = smoke_config(tmp_path, net_variants="all")  # one member's config
    nb.resolve_data_dir(cfg)
    ds = nb.load_training_data(nb.Path(cfg.data_dir))
    labels = nb.sequence_labels(ds.train)
    inputs = nb.net_inputs_from(*nb.derive(ds.train, ds.train_demographics, cfg))
    keep = np.zeros(len(labels), bool)
    keep[np.arange(0, len(labels), len(labels) // 12)[:12]] = True
    sub = inputs.subset(keep)
    y = np.array([nb.GESTURE_INDEX[g] for g in labels["gesture"].to_numpy()[keep]])
    monkeypatch.setattr(nb, "AUGMENTATIONS", dict.fromkeys(nb.AUGMENTATIONS, 0.0))
    monkeypatch.setattr(nb, "NET_RECIPE", {**nb.NET_RECIPE, "modality_dropout": 0.0, "label_smoothing": 0.0, "ema": 0.0,
                                           "dropout": 0.0, "lr": 5e-3, "batch_size": 12})
    cfg.epochs, cfg.net_patience = 60, 1000
    cfg.net_conv, cfg.net_hidden = (32, 32), 32
    res = nb.train_torch_fold(cfg, sub, nb.net_targets(ds.train, nb.label_index(nb.sequence_labels(ds.train)["gesture"].to_list(), nb.GESTURES)).subset(keep), {"full": sub}, y, 0, lambda rec: None)
    model = nb.build_torch_model(cfg, len(sub.names))
    model.load_state_dict(res["state"])
    p = nb.torch_heads(nb.NetFold(model, res["scaler"]), sub)["gesture"]
    assert (p.argmax(1) == y).mean() >= 0.95


def test_skipped_folds_still_fill_every_oof_row(tmp_path):
    cfg = smoke_config(tmp_path, models="torch", net_variants="all")
    nb.train(cfg)
    first = {v: np.load(tmp_path / "out" / "oof" / f"oof_torch_{v}.npy") for v in nb.VIEWS}
    stamp = (tmp_path / "out" / "bundle" / "torch_fold0.pt").stat().st_mtime_ns
    nb.train(cfg)  # every fold is in the bundle: skipped, but its validation rows are predicted again
    assert (tmp_path / "out" / "bundle" / "torch_fold0.pt").stat().st_mtime_ns == stamp
    for v in nb.VIEWS:
        again = np.load(tmp_path / "out" / "oof" / f"oof_torch_{v}.npy")
        assert (again.sum(1) > 0.99).all()
        np.testing.assert_allclose(again, first[v], rtol=1e-5, atol=1e-6)
    log = (tmp_path / "out" / "logs" / "torch.jsonl").read_text().strip().splitlines()
    assert len(log) >= 2 and '"imu_only"' in log[0]


def test_input_blanking_equals_the_raw_imu_only_path(sample_dir):
    train = nb.load_sensor_csv(sample_dir / "train_sample.csv", nb.TRAIN_COLS)
    demo = nb.load_demographics(sample_dir / "train_demographics.csv")
    cfg = nb.parse_config(["--profile", "smoke"], environ={})
    full = nb.net_inputs_from(*nb.derive(train, demo, cfg))
    raw_blank = nb.net_inputs_from(*nb.derive(nb.blank_modalities(train), demo, cfg))
    assert full.names == raw_blank.names
    assert len(full.arrays) == len(raw_blank.arrays) == train["sequence_id"].n_unique() > 0
    values, flags = nb.modality_masks(full.names)
    assert values.any() and flags.any()
    changed = 0
    for a, b in zip(full.arrays, raw_blank.arrays, strict=True):
        assert a.shape == b.shape
        blanked = nb.blank_modality_values(a, full.names)
        changed += not np.array_equal(blanked, a, equal_nan=True)
        np.testing.assert_allclose(blanked, b, rtol=1e-6, atol=1e-6)
        assert np.isnan(b[:, values]).all() and (b[:, flags] == 0).all()
    assert changed > 0, "no sequence carried thm/ToF: the comparison would prove nothing"


def test_the_ema_averages_weights_and_batchnorm_statistics_with_its_warm_up():
    """torch's AveragedModel with ema_average: after the copy of the initial weights, the first step
    moves every float tensor (BatchNorm's running statistics included) by min(decay, 2 / 11); the
    integer counter follows the model."""
    torch = nb.torch
    model = nb.GestureNet(3, 7, (8,), 4, 0.0, True)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=nb.ema_average(0.99), use_buffers=True)
    ema.update_parameters(model)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    model.train()
    model(torch.randn(2, 12, 3), torch.tensor([12, 9]), torch.zeros(2, 7))  # BatchNorm statistics move
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ema.update_parameters(model)
    d, now = 2 / 11, model.state_dict()
    assert any("running_mean" in k for k in now)
    for k, v in ema.module.state_dict().items():
        if v.dtype.is_floating_point:
            np.testing.assert_allclose(v.numpy(), (d * before[k] + (1 - d) * now[k]).numpy(), rtol=1e-6, atol=1e-7,
                                       err_msg=k)
        else:
            assert torch.equal(v, now[k]), k
