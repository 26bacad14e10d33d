"""The whole script end to end, the bundle, predict() on the real test file, resume."""
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

import notebook as nb
from conftest import ROOT, install_standin_gateway, run_script, sequence_ids, smoke_config, two_sequences


# The members the smoke profile trains: the full profile's, tiny.
SMOKE_MEMBERS = ["lgbm", "torch", "torch_imu", "keras", "keras_imu"]


def test_smoke_run_end_to_end_as_a_subprocess(tmp_path):
    res = run_script("--profile", "smoke", "--lgbm-threads", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gateway: builtin" in res.stdout
    # Every line a Kaggler sees is the notebook's own: no TensorFlow/absl start-up notices, no
    # LightGBM native log, no third-party INFO lines, no warnings on a clean run.
    assert res.stderr.strip() == "", res.stderr[-3000:]
    out = tmp_path / "working"
    sub = pl.read_parquet(out / "submission.parquet")
    test = pl.read_csv(tmp_path / "demo_data" / "test.csv", infer_schema_length=None)
    assert sub.columns == ["sequence_id", "gesture"]
    assert sorted(sub["sequence_id"]) == sorted(test["sequence_id"].unique())
    assert set(sub["gesture"]) <= set(nb.GESTURES)
    report = json.loads((out / "cv_report.json").read_text())
    for name in ("lgbm", "ensemble"):
        for view in ("full", "imu_only"):
            r = report["models"][name][view]
            assert {"metric", "binary_f1", "macro_f1", "per_fold"} <= set(r)
            assert len(r["per_fold"]) == 2
    seqs = pl.read_csv(out / "oof" / "sequences.csv")
    assert seqs.columns == ["sequence_id", "subject", "gesture", "fold"]
    oof = np.load(out / "oof" / "oof_lgbm_full.npy")
    assert oof.dtype == np.float32 and oof.shape == (seqs.height, 18)
    np.testing.assert_allclose(oof.sum(axis=1), 1.0, rtol=1e-4)
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["class_names"] == nb.GESTURES and manifest["format_version"] == nb.BUNDLE_FORMAT
    meta = json.loads((out / "bundle" / "dataset-metadata.json").read_text())
    assert meta["id"].endswith("/cmi-bfrb-bundle") and meta["licenses"]
    # Folds are grouped by subject.
    assert (seqs.group_by("subject").agg(pl.col("fold").n_unique())["fold"] == 1).all()
    # Plots: written, non-empty, real PNG files.
    for name in ("confusion_matrix", "per_gesture_f1", "training_curves_torch", "training_curves_torch_imu",
                 "training_curves_keras", "training_curves_keras_imu",
                 "ensemble_weights", "lgbm_feature_importance"):
        png = (out / "plots" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    summary = json.loads((out / "run_summary.json").read_text())
    assert {"load", "features", "train_lgbm", "serve"} <= set(summary["stage_seconds"])
    assert summary["peak_rss_mb"] > 0 and summary["device"] == "cpu" and summary["config"]["profile"] == "smoke"
    assert "run summary:" in res.stdout
    # Running the script again reuses the generated demo data instead of regenerating it. With a
    # budget spent before the first fold it stops cleanly, saying what is missing and how to resume.
    again = run_script("--profile", "smoke", "--lgbm-threads", "1", "--stage", "train", "--out-dir", "cut",
                       "--time-budget-hours", "0.00001", cwd=tmp_path)
    assert again.returncode == 0 and "demo data: generated" not in again.stdout
    assert "lgbm: not trained in this session (the time budget: 0.0 min of 0.0 min left" in again.stdout
    assert "nothing to serve yet" in again.stdout and "To finish, rerun with the same settings" in again.stdout
    assert json.loads((tmp_path / "cut" / "run_summary.json").read_text())["not_trained"].keys() == set(SMOKE_MEMBERS)


def test_infer_stage_serves_the_real_test_file(trained, sample_dir, tmp_path):
    cfg, _ = trained
    bundle = os.path.join(cfg.out_dir, "bundle")
    (tmp_path / "run_summary.json").write_text(json.dumps({"stage_seconds": {"train_lgbm": 99.0}}))
    res = run_script("--stage", "infer", "--model-path", os.path.dirname(bundle), "--data-dir",
                     str(sample_dir), "--out-dir", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sub = pl.read_parquet(tmp_path / "submission.parquet")
    assert sorted(sub["sequence_id"]) == sorted(sequence_ids(sample_dir / "test.csv"))
    assert set(sub["gesture"]) <= set(nb.GESTURES)
    assert "problems: none" in res.stdout
    # The config line describes the bundle served; one run summary, at the end.
    assert f"serving the bundle {bundle}: trained with profile=smoke folds=2" in res.stdout
    assert res.stdout.count("run summary:") == 1 and res.stdout.strip().splitlines()[-1].startswith("run summary:")
    # A demo-trained bundle on data that is not the demo: said before the gateway starts, and recorded.
    warning = "was trained on generated demo data"
    assert warning in res.stderr and res.stdout.index("gateway:") > 0
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["serving"]["demo_bundle_on_other_data"] is True
    # An inference-only run reports its own stages, not those of an earlier training run.
    assert set(summary["stage_seconds"]) == {"serve"}


def test_kaggle_evaluation_and_builtin_gateways_give_the_same_submission(trained, tmp_path):
    cfg, _ = trained
    data = tmp_path / "data"
    data.mkdir()
    for name in ("test.csv", "test_demographics.csv"):
        (data / name).write_bytes((nb.Path(cfg.data_dir) / name).read_bytes())
    subs = {}
    for gateway in ("builtin", "kaggle_evaluation"):
        if gateway == "kaggle_evaluation":  # found beside the data, as the competition ships it
            install_standin_gateway(data)
        out = tmp_path / gateway
        # Assignment and upside-down detection depend on the call order, which differs between the
        # gateways: compare without them.
        res = run_script("--stage", "infer", "--model-path", os.path.join(cfg.out_dir, "bundle"), "--data-dir",
                         str(data), "--out-dir", str(out), "--subject-assignment", "false",
                         "--upside-down-fix", "false", cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert f"gateway: {gateway}" in res.stdout
        subs[gateway] = pl.read_parquet(out / "submission.parquet").sort("sequence_id")
    assert subs["builtin"].height == pl.read_csv(data / "test.csv")["sequence_id"].n_unique()
    assert subs["builtin"].equals(subs["kaggle_evaluation"])


def test_predict_on_real_test_sequences_returns_plain_str(trained, sample_dir):
    cfg, _ = trained
    nb.set_runtime(cfg)
    test = pl.read_csv(sample_dir / "test.csv", infer_schema_length=100)
    demo = pl.read_csv(sample_dir / "test_demographics.csv")
    for sid in test["sequence_id"].unique():
        seq = test.filter(pl.col("sequence_id") == sid)
        mine = demo.filter(pl.col("subject") == seq["subject"][0])  # one row, as the gateway sends it
        out = nb.predict(seq, mine)
        assert type(out) is str and out in nb.GESTURES
        # IMU-only: the same sequence with every thm/tof cell empty (String-typed, as the gateway may)
        blank = seq.with_columns([pl.lit(None, dtype=pl.String).alias(c) for c in nb.THM_COLS + nb.TOF_COLS])
        out = nb.predict(blank, mine)
        assert type(out) is str and out in nb.GESTURES
    assert not nb._RUNTIME.stats.problems


@pytest.mark.parametrize("family", SMOKE_MEMBERS)
def test_cv_imu_view_is_the_predict_path(trained, family):
    """The imu_only OOF equals what predict()'s runtime computes for a blanked raw sequence."""
    cfg, _ = trained
    out = nb.Path(cfg.out_dir)
    ds = nb.load_training_data(nb.Path(cfg.data_dir))
    seqs = pl.read_csv(out / "oof" / "sequences.csv")
    oof_imu = np.load(out / "oof" / f"oof_{family}_imu_only.npy")
    runtime = nb.Runtime(cfg)
    runtime.load()
    loaded, bundle = runtime.bundle.models[family], runtime.bundle
    for i in [0, 7]:
        sid, fold = seqs["sequence_id"][i], seqs["fold"][i]
        raw = nb.blank_modalities(ds.train.filter(pl.col("sequence_id") == sid))
        demo = ds.train_demographics.filter(pl.col("subject") == raw["subject"][0])
        one_fold = nb.LoadedMember(loaded.member, [loaded.folds[fold]], np.ones(1))
        runtime.bundle = nb.dataclasses.replace(bundle, models={family: one_fold})
        probas, view, _ = runtime.proba(raw.drop(["sequence_type", "orientation", "behavior", "phase", "gesture"]), demo)
        assert view == "imu_only"
        np.testing.assert_allclose(probas[family][0], oof_imu[i], rtol=1e-4, atol=1e-5)


class SlowTorchClock(nb.TrainingClock):
    """The session's clock, where each epoch of the PyTorch BiGRU takes 10,000 s and nothing else
    takes any time: the budget's refusal, made deterministic."""

    def epoch_done(self, member, epoch, epochs):
        if member == "torch":
            self.start -= 10_000
            self.fold_start -= 10_000
        super().epoch_done(member, epoch, epochs)


def test_a_run_split_by_its_budget_serves_what_is_complete_and_resumes_to_the_same_oof(tmp_path):
    """Session 1: the time budget stops training during the first BiGRU fold (its first epoch projects
    past the budget): the bundle serves LightGBM, the one member with every fold, and the log and
    run_summary.json name what was not trained and how to resume. Session 2: --stop-after-folds 2
    counts over all members, so it trains the BiGRU's two folds and stops before the IMU-only
    variant's first. Session 3, into another output folder with --resume-from: the rest. Its OOF is the OOF
    of one uninterrupted run."""
    base = smoke_config(tmp_path / "a")
    nb.train(base)
    split = smoke_config(tmp_path / "b", time_budget_hours=1.0)
    report = nb.train(split, clock=SlowTorchClock(split))
    out = tmp_path / "b" / "out"
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert list(manifest["members"]) == ["lgbm"], "only a member with every fold is blended and served"
    assert set(report["not_trained"]) == set(SMOKE_MEMBERS) - {"lgbm"}
    assert "time budget" in report["not_trained"]["torch"] and "epoch 1 of 2" in report["not_trained"]["torch"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["not_trained"] == report["not_trained"] and "rerun with the same settings" in summary["resume"]
    assert not (out / "bundle" / "torch_fold0.pt").exists() and not (out / "bundle" / "torch_fold0.json").exists()
    runtime = nb.Runtime(split)
    test = pl.read_csv(tmp_path / "b" / "demo" / "test.csv", infer_schema_length=None)
    demo = pl.read_csv(tmp_path / "b" / "demo" / "test_demographics.csv")
    for sid in two_sequences(test):
        seq = test.filter(pl.col("sequence_id") == sid)
        assert runtime.predict(seq, demo.filter(pl.col("subject") == seq["subject"][0])) in nb.GESTURES
    assert runtime.stats.fallbacks == 0 and set(runtime.bundle.models) == {"lgbm"}

    counted = smoke_config(tmp_path / "b", stop_after_folds=2)
    report = nb.train(counted)
    assert set(report["not_trained"]) == {"torch_imu", "keras", "keras_imu"}
    assert "--stop-after-folds 2" in report["not_trained"]["keras"]
    assert (out / "bundle" / "torch_fold1.json").exists() and not (out / "bundle" / "torch_imu_fold0.pt").exists()
    assert list(json.loads((out / "bundle" / "manifest.json").read_text())["members"]) == ["lgbm", "torch"]

    finish = smoke_config(tmp_path / "c", data_dir=str(tmp_path / "b" / "demo"), resume_from=str(out))
    nb.train(finish)
    log = json.loads((tmp_path / "c" / "out" / "bundle" / "torch_fold1.json").read_text())
    assert log == json.loads((out / "bundle" / "torch_fold1.json").read_text()), "resumed, not retrained"
    # Determinism too: the nets of both runs trained from scratch with the same seed (on CPU they
    # are bit-exact for a fixed thread count; the tolerance only allows for float summation order).
    for name in SMOKE_MEMBERS:
        for f in (f"oof_{name}_full.npy", f"oof_{name}_imu_only.npy"):
            np.testing.assert_allclose(np.load(tmp_path / "a" / "out" / "oof" / f),
                                       np.load(tmp_path / "c" / "out" / "oof" / f), rtol=1e-5, atol=1e-6)


def test_the_clock_projects_folds_from_those_timed_and_counts_over_members():
    t = [0.0]
    clock = nb.TrainingClock(nb.Config(time_budget_hours=1.0), now=lambda: t[0])
    clock.timed("torch", 1500.0)  # a fold an earlier session trained (its meta file's seconds)
    clock.start_fold("torch")  # 1,500 s of 3,600 s left: fits
    t[0] = 1500.0
    assert clock.end_fold("torch") == 1500.0 and clock.projected("torch") == 1500.0
    clock.start_fold("lgbm")  # nothing timed yet: it may start while time is left
    t[0] = 2200.0
    clock.end_fold("lgbm")
    with pytest.raises(nb.OutOfBudget, match="time budget: 23.3 min of 1.00 h left, and a torch fold takes 25.0 min"):
        clock.start_fold("torch")
    with pytest.raises(nb.OutOfBudget, match="torch fold takes"):
        clock.start_fold("keras")  # once refused, no fold starts any more

    during = nb.TrainingClock(nb.Config(time_budget_hours=1.0), now=lambda: t[0])
    during.start_fold("keras")
    t[0] += 1000.0  # the first epoch of 5 took 1,000 s: 4,000 s more, 2,600 s left
    with pytest.raises(nb.OutOfBudget, match="needs 1.11 h more after epoch 1 of 5"):
        during.epoch_done("keras", 0, 5)

    counted = nb.TrainingClock(nb.Config(stop_after_folds=2), now=lambda: t[0])
    for member in ("lgbm", "torch"):
        counted.start_fold(member)
        counted.end_fold(member)
    with pytest.raises(nb.OutOfBudget, match="--stop-after-folds 2: 2 new fold models"):
        counted.start_fold("keras")
    assert nb.TrainingClock(nb.Config(), now=lambda: t[0]).left() == float("inf")  # elsewhere: no limit


def test_a_full_profile_without_a_gpu_says_so_and_what_would_fit(monkeypatch, capsys):
    """Before anything trains: the projected time per member; without a GPU a line saying so and
    the fix; past the budget, the settings that would fit (here the largest --epochs)."""
    monkeypatch.setattr(nb, "FULL_PROFILE_SECONDS_PER_SEQUENCE",
                        {"lgbm": 0.05, "torch": 0.004, "torch_imu": 0.003, "keras": 0.008, "keras_imu": 0.006})
    cfg = nb.parse_config(["--profile", "full", "--time-budget-hours", "8"], environ={})
    n = 8151
    per = nb.projected_training(cfg, n, "cpu")
    n_train = n * 4 / 5
    assert per["torch"] == pytest.approx(0.004 * n_train * 60 * 5) and per["lgbm"] == pytest.approx(0.05 * n_train * 5)
    nb.say_projection(cfg, n, "cpu")
    said = capsys.readouterr().out
    total = sum(per.values())
    fits = max(e for e in range(1, 60) if sum(nb.projected_training(nb.dataclasses.replace(cfg, epochs=e), n, "cpu").values()) <= 8 * 3600)
    assert f"projected training time on cpu: {nb.hours(total)}" in said and "no GPU" in said
    assert f"--epochs {fits} (CMI_EPOCHS={fits}) would fit" in said
    nb.say_projection(cfg, n, "cuda")
    said = capsys.readouterr().out
    assert "assumed GPU speed-up" in said and "no GPU" not in said and "would fit" not in said
    nb.say_projection(nb.parse_config(["--profile", "quick"], environ={}), n, "cpu")
    assert capsys.readouterr().out == "", "the rates are the full profile's: no projection for the others"


def test_more_seeds_resume_the_first_and_average_into_one_member(tmp_path, capsys):
    """--net-seeds 2 after a run of one seed: seed 0's files are resumed, only seed 1 trains; the
    member stays one in the blend, its OOF is the mean of the two seeds' fold outputs, and every
    file is in the manifest with its weight (a fold's weight shared by its seeds)."""
    one = smoke_config(tmp_path, models="torch", net_variants="all")
    nb.train(one)
    oof_one = np.load(tmp_path / "out" / "oof" / "oof_torch_full.npy")
    capsys.readouterr()
    two = smoke_config(tmp_path, models="torch", net_variants="all", net_seeds=2)
    nb.train(two)
    log = capsys.readouterr().out
    assert "torch fold 0 seed 1 epoch" in log and "torch fold 0 epoch" not in log, "seed 0 is resumed, seed 1 trains"
    manifest = json.loads((tmp_path / "out" / "bundle" / "manifest.json").read_text())
    fam = manifest["members"]["torch"]
    assert list(manifest["members"]) == ["torch"]
    assert fam["files"] == ["torch_fold0.pt", "torch_fold0_seed1.pt", "torch_fold1.pt", "torch_fold1_seed1.pt"]
    assert fam["fold_weights"][0] == fam["fold_weights"][1] and sum(fam["fold_weights"]) == pytest.approx(1.0)
    runtime = nb.Runtime(nb.dataclasses.replace(two, stage="infer"))
    loaded = runtime.require().models["torch"]
    td = nb.prepare_training_data(nb.load_training_data(nb.Path(two.data_dir)), two, nb.Path(two.out_dir))
    inputs = loaded.member.training_inputs(td, nb.Path(two.out_dir))["full"]
    seed1 = np.zeros_like(oof_one)
    for k in range(two.folds):
        va = td.folds == k
        seed1[va] = loaded.member.predict(loaded.folds[2 * k + 1], inputs.subset(va))["gesture"]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "oof" / "oof_torch_full.npy"), (oof_one + seed1) / 2,
                               rtol=1e-5, atol=1e-6)


def test_fold_fingerprints_follow_only_their_own_settings():
    """A Config field's `affects` (or its name's prefix) decides whose saved folds it retrains:
    LightGBM's settings never retrain a net, a net's never retrain LightGBM, what only the torch recipe
    reads never retrains the Keras twin, and threads, paths and serving settings retrain nothing."""
    base = nb.parse_config(["--profile", "smoke"], environ={})
    R = nb.dataclasses.replace  # noqa: N806
    members = {"lgbm": lambda c: nb.LgbmMember("lgbm", c, ["c"]), "torch": lambda c: nb.TorchMember("torch", c, ["c"]),
               "keras": lambda c: nb.KerasMember("keras", c, ["c"])}

    def changed(**edit):
        return {name: make(base).fingerprint("data") != make(R(base, **edit)).fingerprint("data")
                for name, make in members.items()}

    nothing = dict(lgbm=False, torch=False, keras=False)
    assert changed(net_hidden=base.net_hidden + 1) == {**nothing, "torch": True, "keras": True}
    assert changed(torch_precision="bf16") == {**nothing, "torch": True}
    assert changed(torch_phase_pool=False) == {**nothing, "torch": True}
    for net_field in (dict(epochs=base.epochs + 1), dict(tof_grid=True), dict(max_len=64), dict(net_aux_heads=False),
                      dict(net_patience=2), dict(net_aux_weights=(0.0, 0.0, 0.0))):
        assert changed(**net_field) == {**nothing, "torch": True, "keras": True}, net_field
    for lgbm_field in (dict(lgbm_rounds=7), dict(lgbm_modality_dropout=0.5), dict(lgbm_class_weight="balanced")):
        assert changed(**lgbm_field) == {**nothing, "lgbm": True}, lgbm_field
    for everyone in (dict(seed=1), dict(folds=3), dict(upside_down_fix=False), dict(sample_rate_hz=20.0)):
        assert changed(**everyone) == dict(lgbm=True, torch=True, keras=True), everyone
    idle = dict(torch_threads=2, lgbm_threads=2, log_level="DEBUG", stage="infer", out_dir="/elsewhere",
                subject_assignment=False, stop_after_folds=1, demo_train_subjects=9, workers=2, net_seeds=3)
    assert changed(**idle) == nothing
    assert nb.run_fingerprint(base, "data") == nb.run_fingerprint(R(base, **{k: v for k, v in idle.items()
                                                                             if k != "net_seeds"}), "data")
    for bundle_field in (dict(models=("lgbm",)), dict(net_variants=("all",)), dict(net_seeds=3),
                         dict(lgbm_rounds=7), dict(net_hidden=3)):
        assert nb.run_fingerprint(base, "data") != nb.run_fingerprint(R(base, **bundle_field), "data"), bundle_field
    assert nb.run_fingerprint(base, "data") != nb.run_fingerprint(base, "other data")
    for f in nb.dataclasses.fields(nb.Config):
        assert set(nb.affected(f)) <= {*nb.MEMBER_KINDS, "bundle"}, f.name
    # ... and the fixed recipe: an edit of a value there retrains the folds that read it
    before = {name: make(base).fingerprint("data") for name, make in members.items()}
    nb.LGBM_PARAMS["num_leaves"] += 1
    try:
        assert {name: make(base).fingerprint("data") != before[name] for name, make in members.items()} == {
            **nothing, "lgbm": True}
    finally:
        nb.LGBM_PARAMS["num_leaves"] -= 1


def test_a_field_added_later_retrains_the_folds_it_reads_unless_it_opts_out(tmp_path, capsys):
    """The next engineer adds settings without saying what they affect: a `lgbm_*` one retrains
    LightGBM's folds when changed, one of no member's prefix retrains everything, and only a field
    that opts out (NOTHING_TRAINED) resumes the saved folds. Run as training runs: the folds in the
    bundle are resumed or retrained."""
    extended = nb.dataclasses.make_dataclass("Extended", [
        ("lgbm_new_knob", int, nb._doc("a LightGBM setting added later", 1)),
        ("brand_new_knob", float, nb._doc("a setting of no member's prefix", 0.5)),
        ("new_report_path", str, nb._doc("a path added later", "", affects=nb.NOTHING_TRAINED))], bases=(nb.Config,))
    cfg = extended(**nb.dataclasses.asdict(smoke_config(tmp_path, models="lgbm,torch", net_variants="all", epochs=1)))
    members = {m.name: m for m in nb.ensemble_members(cfg)}
    for m in members.values():
        m.names = ["c"]

    def retrained(**edit):
        other = nb.dataclasses.replace(cfg, **edit)
        return {name: m.fingerprint("d") != type(m)(name, other, ["c"]).fingerprint("d") for name, m in members.items()}
    assert retrained(lgbm_new_knob=2) == {"lgbm": True, "torch": False}
    assert retrained(brand_new_knob=0.7) == {"lgbm": True, "torch": True}
    assert retrained(new_report_path="/x") == {"lgbm": False, "torch": False}

    nb.train(cfg)
    capsys.readouterr()
    nb.train(nb.dataclasses.replace(cfg, lgbm_new_knob=2, new_report_path="/x"))
    log = capsys.readouterr().out
    assert "lgbm fold 0: trained" in log and "torch fold 0: resumed from the bundle" in log, log[-3000:]


def test_missing_bundle_raises_with_a_clear_message(tmp_path, sample_dir):
    """Nothing to serve: predict() raises (a visible scoring error), it never answers the fallback."""
    cfg = smoke_config(tmp_path, model_path=str(tmp_path / "nowhere"))
    runtime = nb.set_runtime(cfg)
    test = pl.read_csv(sample_dir / "test.csv")
    with pytest.raises(nb.BundleError, match="manifest.json"):
        nb.predict(test.head(20), pl.DataFrame())
    assert str(tmp_path / "nowhere") in runtime.error and runtime.stats.fallbacks == 0


def test_notebook_ipynb_is_in_sync_with_notebook_py():
    import jupytext
    py = jupytext.read(ROOT / "notebook.py")
    ipynb = jupytext.read(ROOT / "notebook.ipynb")
    src = lambda nbk: [(c.cell_type, c.source) for c in nbk.cells]  # noqa: E731
    assert src(py) == src(ipynb), "notebook.ipynb is stale: run `jupytext --sync notebook.py`"


def test_import_defines_and_never_runs(tmp_path):
    """What `import notebook` may do: import numpy, polars and torch (the PyTorch nets are defined at
    module level) and set the OpenMP wait policy torch's import needs. What it never does: import
    TensorFlow/Keras (slow, noisy: on first use only), LightGBM, scikit-learn or SciPy, touch CUDA
    (no device picked, no memory allocated), read or write a file, or train anything."""
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); import notebook, torch; "
            "heavy = {'lightgbm', 'tensorflow', 'keras', 'sklearn', 'scipy'}; "
            "print(sorted(heavy & set(sys.modules)), 'torch' in sys.modules, torch.cuda.is_initialized(), "
            "notebook.torch_device.cache_info().currsize, os.environ.get('OMP_WAIT_POLICY'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[] True False 0 PASSIVE"
    assert list(tmp_path.iterdir()) == []  # no outputs, no demo data: importing writes nothing


def test_on_kaggle_an_attached_bundle_dataset_is_found_without_model_path(trained, tmp_path, monkeypatch):
    cfg, _ = trained
    kaggle_input = tmp_path / "input"
    (kaggle_input / "cmi-detect-behavior-with-sensor-data").mkdir(parents=True)
    import shutil
    shutil.copytree(nb.Path(cfg.out_dir) / "bundle", kaggle_input / "cmi-bfrb-bundle")
    monkeypatch.setattr(nb, "KAGGLE_DATA_DIR", kaggle_input / "cmi-detect-behavior-with-sensor-data")
    serving = smoke_config(tmp_path, model_path=None, stage="infer")  # OUT/bundle does not exist
    runtime = nb.Runtime(serving)
    runtime.load()
    assert runtime.error is None and set(runtime.bundle.models) >= {"lgbm", "torch"}
    assert nb.find_bundle(nb.bundle_path(runtime.requested)) == kaggle_input / "cmi-bfrb-bundle"


def test_assignment_respects_capacities_and_fixes_duplicates():
    rng = np.random.default_rng(0)
    drink = nb.GESTURE_INDEX["Drink from bottle/cup"]  # capacity 2: Seated Straight only
    assert nb.GESTURE_CAPACITY[drink] == 2 and nb.GESTURE_CAPACITY[0] == 8
    probs = rng.dirichlet(np.ones(18) * 0.3, size=6)
    for i in range(3):  # three sequences all look most like Drink; the third is also like Wave
        probs[i] = 0.01
        probs[i, drink] = 0.6
    probs[2, nb.GESTURE_INDEX["Wave hello"]] = 0.5
    probs /= probs.sum(1, keepdims=True)
    labels = nb.assign_labels(probs)
    assert np.bincount(labels, minlength=18)[drink] == 2
    assert labels[2] == nb.GESTURE_INDEX["Wave hello"]
    assert all(np.bincount(labels, minlength=18) <= nb.GESTURE_CAPACITY)


def study_subjects(n_subjects: int):
    """Labels of subjects who do every allowed (orientation, gesture) pair once per starting
    behaviour, as the study did: gesture, orientation and behaviour index per sequence."""
    y, o, b, subj = [], [], [], []
    for s in range(n_subjects):
        for orientation, gesture in nb.allowed_pairs():
            for behavior in range(2):
                y.append(nb.GESTURE_INDEX[gesture])
                o.append(nb.ORIENTATIONS.index(orientation))
                b.append(behavior)
                subj.append(f"S{s}")
    return np.array(y), np.array(o), np.array(b), np.array(subj)


def test_replayed_assignment_gains_on_data_with_the_study_structure():
    """Noisy probabilities for subjects that do every slot once: each assignment rule must help, and
    the slot rule (with informative orientation and behaviour) most."""
    rng = np.random.default_rng(1)
    y, o, b, subj = study_subjects(4)
    logits = rng.normal(0, 1.0, (len(y), 18))
    logits[np.arange(len(y)), y] += 1.2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    context = np.hstack([np.eye(4)[o] * 0.7 + 0.075, np.eye(2)[b] * 0.6 + 0.2])
    weak = np.hstack([np.eye(4)[o] * 0.2 + 0.2, np.eye(2)[b] * 0.1 + 0.45])  # the nets' heads, less sure
    slot_inputs = {"lgbm": context, "orientation": weak[:, :4], "behavior": weak[:, 4:]}
    folds = np.array([int(s[1:]) % 2 for s in subj])
    check = nb.serving_rule_check([nb.GESTURES[i] for i in y], {"full": probs, "imu_only": probs},
                                  {"full": slot_inputs, "imu_only": slot_inputs}, subj, folds, seeds=1)
    lb = {r: t["expected_lb"] for r, t in check["rules"].items()}
    assert lb["gesture_capacity"] > lb["argmax"] + 0.01 and lb["slots/lgbm"] > lb["gesture_capacity"] + 0.01, lb
    assert lb["slots/lgbm"] > lb["slots/heads"] > lb["gesture_capacity"], lb  # sharper context, better slots
    assert check["chosen"] == "slots/lgbm" and check["nested"]["expected_lb"] > lb["gesture_capacity"] + 0.01
    assert check["served"]["expected_lb"] == pytest.approx(lb["slots/lgbm"])


def test_serving_decides_as_the_replay_does(trained):
    """A subject's per-call rows fed to predict() in the replay's order get exactly the replay's
    answers: the same slot probabilities (plan, gesture weight of the call's view), the same history,
    the same assignment. Every member answers the same row, so the served blend is that row with the
    bundle's target scale."""
    cfg, _ = trained
    runtime = nb.Runtime(cfg)
    bundle = runtime.require()
    rng = np.random.default_rng(3)
    y, o, b, subj = study_subjects(1)
    logits = rng.normal(0, 1.0, (len(y), 18))
    logits[np.arange(len(y)), y] += 1.0
    raw = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    noisy = lambda eye: (eye + rng.uniform(0, 1.0, eye.shape)) / (eye + rng.uniform(0, 1.0, eye.shape)).sum(1, keepdims=True)  # noqa: E731
    slot_inputs = {"orientation": noisy(np.eye(4)[o]), "behavior": noisy(np.eye(2)[b])}
    demo = pl.DataFrame({"subject": ["S0"], **{k: [v] for k, v in nb.DEFAULT_DEMOGRAPHICS.items()}})
    plan = nb.serving_plan("slots", "heads", {"full": 0.5, "imu_only": 2.0})
    for view in nb.VIEWS:
        runtime = nb.Runtime(cfg)
        runtime.bundle, runtime.loaded = nb.dataclasses.replace(bundle, plan=plan), True
        weights = dict(zip(bundle.manifest["members"], bundle.manifest["blend_weights"][view]))
        served_p = nb.target_scaled(nb.blend([raw] * len(bundle.models), [weights[n] for n in bundle.models]),
                                    bundle.manifest["target_scale"][view])
        want = nb.replay_rule("slots", served_p, nb.slot_probabilities("heads", served_p, slot_inputs, plan["gesture_weight"][view]),
                              subj, seed=5)
        order = nb.replay_order(subj, seed=5)[0]
        current = {}
        runtime.proba = lambda *args, view=view: ({n: raw[current["i"]][None, :] for n in bundle.models}, view,
                                                   {k: v[current["i"]][None, :] for k, v in slot_inputs.items()})
        got = []
        for i in order:
            current["i"] = i
            seq = pl.DataFrame({"sequence_id": [f"SEQ_{i}"] * 3, "sequence_counter": [0, 1, 2], "subject": ["S0"] * 3,
                                **{c: [0.1, 0.2, 0.3] for c in nb.ACC_COLS + nb.ROT_COLS}})
            got.append(runtime.predict(seq, demo))
        assert runtime.stats.fallbacks == 0 and not runtime.stats.problems, runtime.stats.problems
        assert got == [nb.GESTURES[want[i]] for i in order], view


def test_slot_assignment_fixes_what_gesture_capacity_cannot():
    """Two sequences of one subject both look most like the same (orientation, gesture, behaviour)
    slot; the second is truly another gesture done in that same orientation and behaviour. Gesture
    capacity (8 for this gesture) lets both keep the first gesture; one slot each must move the one
    that fits the other gesture better."""
    above_ear, neck = nb.GESTURE_INDEX["Above ear - pull hair"], nb.GESTURE_INDEX["Neck - pinch skin"]
    probs = np.full((2, 18), 0.01)
    probs[0, above_ear], probs[0, neck] = 0.80, 0.05
    probs[1, above_ear], probs[1, neck] = 0.55, 0.30  # truly Neck - pinch skin
    probs /= probs.sum(1, keepdims=True)
    context = np.tile(np.concatenate([[0.94, 0.02, 0.02, 0.02], [0.95, 0.05]]), (2, 1))  # both seated straight, relaxing first
    slot_p = lambda c: nb.slot_probabilities("lgbm", probs, {"lgbm": c})  # noqa: E731
    assert nb.assign_labels(probs).tolist() == [above_ear, above_ear]
    assert nb.assign_slots(probs, slot_p(context)).tolist() == [above_ear, neck]
    # Told the two were performed in different orientations, the slots no longer collide.
    apart = context.copy()
    apart[1, :4] = [0.02, 0.94, 0.02, 0.02]
    assert nb.assign_slots(probs, slot_p(apart)).tolist() == [above_ear, above_ear]
    # The same from the nets' heads.
    heads = {"orientation": context[:, :4], "behavior": context[:, 4:]}
    assert nb.assign_slots(probs, nb.slot_probabilities("heads", probs, heads)).tolist() == [above_ear, neck]


def test_one_temperature_on_the_slot_table_changes_no_assignment():
    """Why the calibration weighs the gesture blend against the slot context and not the whole
    table: every row takes one slot, so a common power of the slot probabilities (a temperature)
    leaves the assignment unchanged, while the gesture weight can change it."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(18) * 0.3, 60)
    heads = {"orientation": rng.dirichlet(np.ones(4), 60), "behavior": rng.dirichlet(np.ones(2), 60)}
    base = nb.slot_probabilities("heads", probs, heads)
    for t in (0.3, 3.0):
        tempered = base ** (1 / t) / (base ** (1 / t)).sum(1, keepdims=True)
        assert (nb.assign_slots(probs, tempered) == nb.assign_slots(probs, base)).all()
    moved = [nb.assign_slots(probs, nb.slot_probabilities("heads", probs, heads, w)) for w in (0.25, 4.0)]
    assert (moved[0] != moved[1]).any()


def test_argmax9_picks_a_target_only_when_it_beats_the_non_target_mass():
    p = np.zeros((2, 18))
    t = np.flatnonzero(nb.TARGET_MASK)[0]
    nts = np.flatnonzero(~nb.TARGET_MASK)
    p[0, t], p[0, nts[:4]] = 0.3, 0.175  # argmax says the target, the 9 scored classes say non-target
    p[1, t], p[1, nts[0]] = 0.6, 0.4
    assert p[0].argmax() == t
    out = nb.argmax9(p)
    assert out[0] in set(nts) and out[1] == t


def test_predict_keeps_per_subject_state_only_when_enabled(trained, sample_dir):
    cfg, _ = trained
    runtime = nb.set_runtime(cfg)
    test = pl.read_csv(sample_dir / "test.csv")
    demo = pl.read_csv(sample_dir / "test_demographics.csv")
    seq = test.filter(pl.col("sequence_id") == two_sequences(test)[0])
    runtime.bundle = nb.dataclasses.replace(runtime.require(), plan=nb.serving_plan("argmax"))
    nb.predict(seq, demo.filter(pl.col("subject") == seq["subject"][0]))
    assert not runtime.subjects.history
    runtime.bundle = nb.dataclasses.replace(runtime.bundle, plan=nb.serving_plan("gesture_capacity"))
    for _ in range(3):
        out = nb.predict(seq, demo.filter(pl.col("subject") == seq["subject"][0]))
        assert type(out) is str and out in nb.GESTURES
    assert len(runtime.subjects.history[seq["subject"][0]]) == 1  # one sequence, however often it is called


def test_workers_train_the_bundle_one_process_trains(tmp_path):
    """--workers 2: two processes of notebook.py claim the folds and train them into the bundle, and the
    run reads them back. With the same threads (one each: OMP_NUM_THREADS=1), the OOF, cv_report.json
    and every bundle file (its SHA-256 in the manifest) are those of --workers 1. A --stop-after-folds
    session hands out whole folds up to the count, and the run stops as one process does."""
    env = {"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    common = ["--profile", "smoke", "--demo", "--data-dir", str(tmp_path / "demo"), "--stage", "train"]
    runs = {}
    for n in (1, 2):
        runs[n] = run_script(*common, "--out-dir", str(tmp_path / f"w{n}"), "--workers", str(n), cwd=tmp_path,
                             env_extra=env)
        assert runs[n].returncode == 0, runs[n].stderr[-3000:]
    log = runs[2].stdout
    assert "workers: 2 processes train 10 fold models of 10 folds (1 CPU threads each)" in log, log[:3000]
    assert "[worker 0]" in log and "[worker 1]" in log
    assert "lgbm fold 1: resumed from the bundle" in log and "keras fold 1: resumed from the bundle" in log
    one, two = tmp_path / "w1", tmp_path / "w2"
    oof = sorted(p.name for p in (one / "oof").glob("*.npy"))
    assert oof and oof == sorted(p.name for p in (two / "oof").glob("*.npy"))
    assert all((one / "oof" / f).read_bytes() == (two / "oof" / f).read_bytes() for f in oof)
    assert (one / "cv_report.json").read_bytes() == (two / "cv_report.json").read_bytes()
    files = [json.loads((d / "bundle" / "manifest.json").read_text())["files"] for d in (one, two)]
    assert files[0] == files[1] and any(f.endswith(".pt") for f in files[0])

    split = run_script(*common, "--out-dir", str(tmp_path / "split"), "--workers", "2", "--stop-after-folds", "3",
                       cwd=tmp_path, env_extra=env)
    assert split.returncode == 0, split.stderr[-3000:]
    assert "workers: 2 processes train 3 fold models of 3 folds" in split.stdout
    summary = json.loads((tmp_path / "split" / "run_summary.json").read_text())
    assert set(summary["not_trained"]) == set(SMOKE_MEMBERS) - {"lgbm"}, summary
    assert "--stop-after-folds 3: 3 new fold models" in summary["not_trained"]["torch"], summary


def test_workers_start_from_the_cells_a_kernel_ran(tmp_path):
    """In a Jupyter kernel there is no notebook.py: the workers run the code cells the kernel ran (its
    `In`), magics and shell lines left out, and main() in place of the cell that trains and serves.
    From notebook.ipynb's own code cells, with the settings cell's lines uncommented, that script runs."""
    cells = ["".join(c["source"]) for c in json.loads((ROOT / "notebook.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    cells.insert(1, "%env CMI_FOLDS=3\n!ls")
    script = tmp_path / "notebook_cells.py"
    script.write_text(nb.script_from_cells(cells))
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CMI_FOLDS": "3"})
    assert res.returncode == 0 and "--workers" in res.stdout and "--worker-of" in res.stdout, res.stderr[-2000:]
    assert nb.worker_script(tmp_path) == ROOT / "notebook.py"  # imported from its file: that file
