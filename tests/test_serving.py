"""No silent zero: serving survives the real gateway's habits and broken or foreign bundles, and
stops loudly when nothing can serve. One test per fault seen by a user (issue: no silent zero)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

import notebook as nb
from conftest import ROOT, install_standin_gateway, run_script, two_sequences

ALL_FAMILIES = {"lgbm", "torch", "torch_imu", "keras", "keras_imu"}


def copy_bundle(cfg, dest):
    shutil.copytree(nb.Path(cfg.out_dir) / "bundle", dest)
    return dest


def loaded_after_edit(cfg, dest, edit, reprove=False):
    """A fresh Runtime over a copy of the smoke bundle whose manifest `edit` changed in place; with
    `reprove`, its proof recorded again for the edited plan (as training would record it)."""
    bundle = copy_bundle(cfg, dest)
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    if reprove:
        manifest["proof"] = nb.record_proof(bundle, manifest)
        manifest["files"].update({f: nb.file_digest(bundle / f) for f in (nb.PROOF_CALLS, nb.PROOF_OUTPUTS)})
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    return runtime


def test_readme_local_rerun_with_relative_paths(trained, tmp_path):
    """The README's rerun command verbatim, from a project folder holding data/ (with the gateway
    package) and working/bundle: the same submission as the same bundle served with absolute paths."""
    cfg, _ = trained
    project = tmp_path / "project"
    copy_bundle(cfg, project / "working" / "bundle")
    data = project / "data"
    data.mkdir()
    for name in ("test.csv", "test_demographics.csv"):
        shutil.copy(nb.Path(cfg.data_dir) / name, data / name)
    install_standin_gateway(data)
    # Per-subject assignment and upside-down detection depend on the call order, which is random
    # per run: compare without them.
    res = run_script("--stage", "infer", "--model-path", "working/bundle", "--data-dir", "data",
                     "--subject-assignment", "false", "--upside-down-fix", "false", cwd=project)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gateway: kaggle_evaluation" in res.stdout and "fallback: 0 calls" in res.stdout
    assert "problems: none" in res.stdout
    relative = pl.read_parquet(project / "working" / "submission.parquet").sort("sequence_id")
    absolute_out = tmp_path / "absolute"
    res = run_script("--stage", "infer", "--model-path", str(project / "working" / "bundle"), "--data-dir",
                     str(data), "--out-dir", str(absolute_out), "--subject-assignment", "false",
                     "--upside-down-fix", "false", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert relative.equals(pl.read_parquet(absolute_out / "submission.parquet").sort("sequence_id"))
    assert relative.height == pl.read_csv(data / "test.csv")["sequence_id"].n_unique()
    assert not (project / "submission.parquet").exists()  # written into OUT, not where the user stands


def test_a_bundle_uploaded_the_kaggle_cli_default_way_serves_whole(trained, sample_dir, tmp_path):
    """`kaggle datasets create -p working/bundle` without --dir-mode uploads the regular files at the top
    of the folder and skips sub-folders (its documented default, "skip"). A copy made by that rule
    serves with every member and the intact bundle's answers."""
    cfg, _ = trained
    bundle = nb.Path(cfg.out_dir) / "bundle"
    uploaded = tmp_path / "kaggle-input" / "cmi-bfrb-bundle"
    uploaded.mkdir(parents=True)
    for path in bundle.iterdir():
        if path.is_file() and not path.is_symlink():
            shutil.copy(path, uploaded / path.name)
    assert not [p for p in bundle.iterdir() if p.is_dir()], "the bundle must keep no file in a sub-folder"
    test = pl.read_csv(sample_dir / "test.csv")
    demo = pl.read_csv(sample_dir / "test_demographics.csv")
    answers = {}
    for label, path in (("intact", bundle), ("uploaded", uploaded.parent)):  # a mounted dataset's parent
        runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(path), subject_assignment=False,
                                                    upside_down_fix=False))
        runtime.load()
        assert runtime.error is None and set(runtime.bundle.models) == ALL_FAMILIES and not runtime.bundle.left_out, label
        answers[label] = [runtime.predict(seq, demo.filter(pl.col("subject") == seq["subject"][0]))
                          for _, seq in test.group_by("sequence_id", maintain_order=True)]
        assert runtime.stats.fallbacks == 0
    assert answers["uploaded"] == answers["intact"]


def test_the_slot_models_load_from_the_bundle(trained, tmp_path):
    """Whatever plan the smoke run chose, its slot models must load and answer when the plan reads them."""
    cfg, _ = trained
    plan = nb.serving_plan("slots", "lgbm", {"full": 1.0, "imu_only": 0.5})
    runtime = loaded_after_edit(cfg, tmp_path / "bundle", lambda m: m.update(serving=plan), reprove=True)
    assert runtime.bundle.plan == plan and "slot models" not in runtime.bundle.left_out, runtime.bundle.left_out
    assert all(len(runtime.bundle.slot_models[t]) == cfg.folds for t in nb.SLOT_MODEL_TARGETS)
    x = np.zeros((1, len(runtime.bundle.slot_model_names)), dtype=np.float32)
    p = nb.slot_model_proba(runtime.bundle.slot_models, x)
    assert p.shape == nb.UNIFORM_SLOT_INPUTS["lgbm"].shape and np.isfinite(p).all()


@pytest.mark.parametrize("source", ["heads"])
def test_the_nets_heads_serve_the_slot_rule(trained, tmp_path, source):
    """A plan on the nets' own heads serves every call with them (no call short of its slot context)."""
    cfg, _ = trained
    plan = nb.serving_plan("slots", source, {"full": 1.0, "imu_only": 2.0})
    runtime = loaded_after_edit(cfg, tmp_path / "bundle", lambda m: m.update(serving=plan), reprove=True)
    assert runtime.bundle.plan == plan and not runtime.bundle.left_out, runtime.bundle.left_out
    test = pl.read_csv(nb.Path(cfg.data_dir) / "test.csv")
    demo = pl.read_csv(nb.Path(cfg.data_dir) / "test_demographics.csv")
    for _, seq in list(test.group_by("sequence_id", maintain_order=True))[:6]:
        assert runtime.predict(seq, demo.filter(pl.col("subject") == seq["subject"][0])) in nb.GESTURES
    assert runtime.stats.fallbacks == 0 and not runtime.stats.problems, runtime.stats.problems
    assert all(len(h) for h in runtime.subjects.history.values())


def test_the_bundle_serves_the_plan_training_chose(trained):
    cfg, report = trained
    manifest = json.loads((nb.Path(cfg.out_dir) / "bundle" / "manifest.json").read_text())
    assert manifest["serving"] == report["serving_rule"]["plan"]
    runtime = nb.Runtime(cfg)
    assert runtime.require().plan == manifest["serving"] or not cfg.subject_assignment


def test_the_scoring_rerun_serves_a_gateway_process_from_the_lazily_loaded_bundle(trained, tmp_path):
    """The scoring rerun as Kaggle runs it: the notebook under KAGGLE_IS_COMPETITION_RERUN (no flags
    needed to stop training: the rerun never trains) reaches CMIInferenceServer(predict).serve(), which
    blocks; a gateway in another process sends every test sequence over a socket as Arrow frames and
    writes submission.parquet. The bundle loads on the first call, and the notebook exits cleanly
    once the gateway is done."""
    import socket
    cfg, _ = trained
    data = tmp_path / "data"
    data.mkdir()
    for name in ("test.csv", "test_demographics.csv"):
        shutil.copy(nb.Path(cfg.data_dir) / name, data / name)
    install_standin_gateway(data)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "KAGGLE_IS_COMPETITION_RERUN": "1",
           "CMITEST_GATEWAY_PORT": port}
    server = subprocess.Popen([sys.executable, str(ROOT / "notebook.py"), "--model-path",
                               str(nb.Path(cfg.out_dir) / "bundle"), "--data-dir", str(data), "--out-dir",
                               str(tmp_path / "out")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    (tmp_path / "gateway").mkdir()
    try:
        gateway = subprocess.run([sys.executable, str(data / "kaggle_evaluation" / "cmi_inference_server.py"),
                                  str(data / "test.csv"), str(data / "test_demographics.csv")],
                                 cwd=tmp_path / "gateway", env=env, capture_output=True, text=True, timeout=600)
        out, err = server.communicate(timeout=120)
    finally:
        server.kill()
    assert gateway.returncode == 0, gateway.stderr[-3000:] + err[-3000:]
    assert server.returncode == 0, out[-3000:] + err[-3000:]
    assert "gateway: kaggle_evaluation (scoring rerun)" in out and not (tmp_path / "out" / "bundle").exists()
    assert out.index("gateway: kaggle_evaluation (scoring rerun)") < out.index("predict: bundle"), "loaded lazily"
    sub = pl.read_parquet(tmp_path / "gateway" / "submission.parquet")
    test = pl.read_csv(data / "test.csv", infer_schema_length=None)
    assert sorted(sub["sequence_id"]) == sorted(test["sequence_id"].unique()) and set(sub["gesture"]) <= set(nb.GESTURES)
    assert sub["gesture"].n_unique() > 1, "one gesture for every sequence"


def test_serve_in_process_leaves_the_working_directory_and_reads_paths_as_given(trained, tmp_path, monkeypatch):
    cfg, _ = trained
    project = tmp_path / "project"
    copy_bundle(cfg, project / "working" / "bundle")
    (project / "data").mkdir(parents=True)
    for name in ("test.csv", "test_demographics.csv"):
        shutil.copy(nb.Path(cfg.data_dir) / name, project / "data" / name)
    install_standin_gateway(project / "data")
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project / "data"))
    serving = nb.parse_config(["--stage", "infer", "--model-path", "working/bundle", "--data-dir", "data"], environ={})
    assert all(os.path.isabs(getattr(serving, f)) for f in ("data_dir", "out_dir", "model_path"))
    nb.serve(serving)
    assert nb.Path.cwd() == project
    assert (project / "working" / "submission.parquet").exists()
    sys.modules.pop("kaggle_evaluation.cmi_inference_server", None)
    sys.modules.pop("kaggle_evaluation", None)


def test_bundle_load_names_every_member(trained, capsys):
    cfg, _ = trained
    runtime = nb.Runtime(cfg)
    runtime.load()
    line = [ln for ln in capsys.readouterr().out.splitlines() if "loaded in" in ln][0]
    assert "serving lgbm, torch, torch_imu, keras, keras_imu" in line and set(runtime.bundle.models) == ALL_FAMILIES


LOAD_AND_PREDICT = """
import json, sys
sys.path.insert(0, {root!r})
import polars as pl
import notebook as nb
test = pl.read_csv({test!r})
demo = pl.read_csv({demo!r})
seq = test.filter(pl.col("sequence_id") == test["sequence_id"][0])
result = {{}}
for bundle in {bundles!r}:
    cfg = nb.parse_config(["--model-path", bundle, "--profile", "smoke"], environ={{}})
    runtime = nb.Runtime(cfg)
    answer = runtime.predict(seq, demo.filter(pl.col("subject") == seq["subject"][0]))
    result[bundle] = {{"models": sorted(runtime.bundle.models), "left_out": runtime.bundle.left_out, "answer": answer}}
print("RESULT " + json.dumps(result))
"""


def test_truncated_lightgbm_file_is_left_out_and_never_crashes_the_process(trained, made_sample_dir, tmp_path):
    """LightGBM's parser aborts the whole process on a cut file: the size/SHA-256 check must stop it
    first. Several cut points; in a subprocess, so a regression fails this test, not the suite."""
    cfg, _ = trained
    bundles = []
    for cut in (0.05, 0.5, 0.999):
        bundle = copy_bundle(cfg, tmp_path / f"cut{cut}")
        path = bundle / "lgbm_fold0.txt"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
        bundles.append(str(bundle))
    code = LOAD_AND_PREDICT.format(root=str(ROOT), test=str(made_sample_dir / "test.csv"),
                                   demo=str(made_sample_dir / "test_demographics.csv"), bundles=bundles)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert res.returncode == 0, f"exit {res.returncode}: " + res.stderr[-3000:]
    result = json.loads(res.stdout.split("RESULT ", 1)[1])
    for bundle in bundles:
        r = result[bundle]
        assert set(r["models"]) == ALL_FAMILIES - {"lgbm"} and r["answer"] in nb.GESTURES, r
        assert "lgbm_fold0.txt" in r["left_out"]["lgbm"] and "bytes" in r["left_out"]["lgbm"], r


def test_a_fold_from_another_run_is_refused_by_its_sha256(trained, tmp_path):
    cfg, _ = trained
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    path = bundle / "lgbm_fold1.txt"
    text = path.read_text()
    i = text.index("num_class=") + len("num_class=")  # "18" -> "19": same size, other content
    path.write_text(text[:i + 1] + ("9" if text[i + 1] != "9" else "7") + text[i + 2:])
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    assert runtime.error is None and set(runtime.bundle.models) == ALL_FAMILIES - {"lgbm"}
    assert "SHA-256" in runtime.bundle.left_out["lgbm"] and str(path) in runtime.bundle.left_out["lgbm"]


def test_killed_retrain_with_other_settings_leaves_no_bundle_that_loads(trained, tmp_path):
    """A finished run, then a retrain into the same folder with another seed, killed after its first
    fold: the old manifest is gone before that fold was written, so nothing mixed can serve."""
    cfg, _ = trained
    data = tmp_path / "data"
    shutil.copytree(cfg.data_dir, data)
    out = tmp_path / "out"
    shutil.copytree(cfg.out_dir, out)
    before = (out / "bundle" / "lgbm_fold0.txt").read_bytes()
    retrain = nb.dataclasses.replace(cfg, data_dir=str(data), demo=False, out_dir=str(out), seed=cfg.seed + 1,
                                     stop_after_folds=1, model_path=None)
    with pytest.raises(nb.StopRequested):
        nb.train(retrain)
    assert (out / "bundle" / "lgbm_fold0.txt").read_bytes() != before  # a fold of the new run
    assert not (out / "bundle" / "manifest.json").exists()
    runtime = nb.Runtime(nb.dataclasses.replace(retrain, stop_after_folds=0))
    with pytest.raises(nb.BundleError, match="removed its manifest.json at .* and has not finished"):
        runtime.require()  # says what happened, not "train first"
    # The run finished (resumed): its manifest serves, and a rerun with the same settings keeps it.
    resumed = nb.dataclasses.replace(retrain, stop_after_folds=0, models=("lgbm",))
    nb.train(resumed)
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert set(manifest["members"]) == {"lgbm"} and not (out / "bundle" / nb.UNFINISHED).exists()
    nb.invalidate_stale_manifest(out / "bundle", nb.run_fingerprint(resumed, manifest["data_fingerprint"]))
    assert (out / "bundle" / "manifest.json").exists()
    nb.invalidate_stale_manifest(out / "bundle", nb.run_fingerprint(retrain, manifest["data_fingerprint"]))
    assert not (out / "bundle" / "manifest.json").exists()


def test_one_absurd_value_poisons_no_member(trained, sample_dir):
    """1e30 in acc_z made the Squeezeformer answer NaN and the whole call fall back: inputs are
    clipped to physical ranges before any model."""
    cfg, _ = trained
    runtime = nb.set_runtime(cfg)
    test = pl.read_csv(sample_dir / "test.csv", infer_schema_length=None)
    seq = test.filter(pl.col("sequence_id") == two_sequences(test)[1])
    demo = pl.read_csv(sample_dir / "test_demographics.csv").filter(pl.col("subject") == seq["subject"][0])
    seq = seq.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(1e30).otherwise(pl.col("acc_z")).alias("acc_z"))
    runtime.require()
    probas, view, _ = runtime.proba(seq, demo)
    assert set(probas) == ALL_FAMILIES and all(np.isfinite(p).all() for p in probas.values())
    assert nb.predict(seq, demo) in nb.GESTURES and runtime.stats.fallbacks == 0
    assert set(runtime.stats.problems) == {"sensor values outside their physical range; clipped to it"}  # counted


def test_a_member_that_fails_per_call_is_left_out_of_that_blend_only(trained, sample_dir):
    cfg, _ = trained
    runtime = nb.set_runtime(cfg)
    runtime.require()
    test = pl.read_csv(sample_dir / "test.csv", infer_schema_length=None)
    demo = pl.read_csv(sample_dir / "test_demographics.csv")
    seq = test.filter(pl.col("sequence_id") == two_sequences(test)[0])
    weights = runtime.bundle.manifest["blend_weights"]["full"]
    heaviest = max(zip(weights, runtime.bundle.manifest["members"]))[1]
    loaded = runtime.bundle.models[heaviest]
    if heaviest == "lgbm":
        class NaNBooster:
            best_iteration = 0

            def predict(self, x, **kw):
                return np.full((len(x), 18), np.nan)
        loaded.folds[:] = [NaNBooster() for _ in loaded.folds]
    elif heaviest == "keras":
        loaded.folds[:] = [nb.NetFold(lambda batch: {"gesture": np.full((len(batch["x"]), 18), np.nan, np.float32)},
                                      fold.scaler) for fold in loaded.folds]
    else:
        def broken(*a, **k):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        for fold in loaded.folds:
            fold.model.forward = broken
    out = nb.predict(seq, demo)
    assert type(out) is str and out in nb.GESTURES
    assert runtime.stats.fallbacks == 0 and runtime.stats.reduced == 1
    assert heaviest not in runtime.stats.served["full"] and runtime.stats.served["full"]
    assert any(p.startswith(heaviest) for p in runtime.stats.problems), runtime.stats.problems
    assert "reduced blend: 1 calls" in runtime.summary()


def test_empty_bundle_stops_before_the_gateway_with_a_non_zero_exit(tmp_path, sample_dir):
    empty = tmp_path / "empty_bundle"
    empty.mkdir()
    res = run_script("--stage", "infer", "--model-path", str(empty), "--data-dir", str(sample_dir),
                     "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode != 0
    assert str(empty) in res.stderr and "manifest.json" in res.stderr and "Fix:" in res.stderr
    assert "gateway:" not in res.stdout and not (tmp_path / "out" / "submission.parquet").exists()


def test_bundle_where_no_member_loads_stops_and_names_each_reason(trained, tmp_path):
    cfg, _ = trained
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    for f in json.loads((bundle / "manifest.json").read_text())["files"]:
        (bundle / f).write_bytes(b"")
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    with pytest.raises(nb.BundleError) as err:
        runtime.require()
    assert str(bundle) in str(err.value) and all(f"{n}:" in str(err.value) for n in ALL_FAMILIES)


def test_format_version_as_text(trained, tmp_path):
    cfg, _ = trained
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = str(nb.BUNDLE_FORMAT)  # a hand-edited manifest: the same number
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert nb.read_manifest(bundle)["format_version"] == str(nb.BUNDLE_FORMAT)
    manifest["format_version"] = "2"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(nb.BundleError, match=rf"format_version '2'; this code reads format {nb.BUNDLE_FORMAT}"):
        nb.read_manifest(bundle)


@pytest.mark.parametrize("capability,expected", [((6, 0), False), ((7, 5), True), ((8, 6), True), ((9, 0), True)])
def test_cuda_support_follows_the_build_arch_list(capability, expected):
    # Kaggle's PyTorch builds since March 2026: no sm_60 (P100) kernels.
    archs = ["sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]
    assert nb.cuda_supported(capability, archs) is expected
    assert nb.cuda_supported((6, 0), ["sm_50", "sm_60", "sm_70"]) is True  # older builds kept the P100
    assert nb.cuda_supported((8, 9), ["compute_80"]) is True  # PTX runs on newer GPUs


def test_unsupported_gpu_means_cpu_with_one_warning(monkeypatch, caplog):
    import torch
    nb.torch_device.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    with caplog.at_level("WARNING", logger="cmi"):
        assert nb.torch_device() == "cpu" and nb.torch_device() == "cpu"
    warnings = [r for r in caplog.records if "not supported" in r.getMessage()]
    assert len(warnings) == 1 and "T4" in warnings[0].getMessage() and "P100" in warnings[0].getMessage()
    nb.torch_device.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert nb.torch_device() == "cuda"
    nb.torch_device.cache_clear()
