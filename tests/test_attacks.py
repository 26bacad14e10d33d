"""No silent zero: routes to a submission that is wrong without saying so, each tried on a fresh runtime
over an edited copy of the smoke bundle. Every attack ends either served correctly by the members left,
with the reason logged, or in a loud stop (BundleError) naming the path and the fix."""
import json
import shutil
import threading

import numpy as np
import polars as pl
import pytest

import notebook as nb
from test_serving import ALL_FAMILIES, copy_bundle, loaded_after_edit


def refused(runtime, *words):
    """The bundle cannot serve: the error names the manifest and each of `words`, and says how to fix it."""
    assert runtime.error and "manifest.json" in runtime.error and "Fix:" in runtime.error, runtime.error
    assert all(w in runtime.error for w in words), runtime.error
    with pytest.raises(nb.BundleError):
        runtime.require()


def _drop(key, view=None):
    def edit(m):
        if view:
            m[key].pop(view)
        else:
            m.pop(key)
    return edit


@pytest.mark.parametrize("edit,words", [
    (_drop("blend_weights"), ["'blend_weights' is missing"]),
    (_drop("blend_weights", "imu_only"), ["blend_weights.imu_only"]),
    (lambda m: m["blend_weights"]["full"].__setitem__(0, float("nan")), ["blend_weights.full", "NaN"]),
    (lambda m: m["target_scale"].__setitem__("full", float("nan")), ["target_scale.full"]),
    (lambda m: m["target_scale"].__setitem__("imu_only", -1), ["target_scale.imu_only"]),
    (lambda m: m["blend_weights"]["full"].pop(), ["blend_weights.full", "one per member"]),
    (lambda m: m["blend_weights"].__setitem__("full", [0.5] * len(m["members"])), ["summing to 1"]),
    (_drop("config"), ["'config' is missing"]),
    (lambda m: m["members"]["lgbm"].__setitem__("fold_weights", [float("inf"), 1.0]), ["fold_weights"]),
    (_drop("proof"), ["the field 'proof' is missing"]),
    (lambda m: m["serving"].__setitem__("rule", "majority"), ["serving.rule", '"majority"', "not one of"]),
    (lambda m: m["serving"].update(rule="slots", slot_source="tea_leaves"), ["serving.slot_source", "not one of"]),
    (lambda m: m["serving"].update(rule="slots", slot_source="heads", gesture_weight={"full": 1.0}),
     ["serving.gesture_weight", "per view"]),
    (lambda m: m["serving"].update(rule="slots", slot_source="heads", gesture_weight={"full": -1, "imu_only": 1}),
     ["serving.gesture_weight", "0 to 10"]),
    (lambda m: m.update(fallback_gesture="Wave"), ["fallback_gesture", '"Wave"', "not one of the 18"]),
    (lambda m: m["config"].__setitem__("sample_rate_hz", "abc"), ["config.sample_rate_hz", '"abc"', "a number from"]),
    (lambda m: m["config"].__setitem__("tof_grid", "yes"), ["config.tof_grid", "true or false"]),
    (lambda m: m["config"].__setitem__("net_hidden", -3), ["config.net_hidden", "-3", "an integer >= 1"]),
], ids=["no-blend-weights", "no-imu-weights", "nan-weight", "nan-scale", "negative-scale", "weights-short",
        "weights-sum", "no-config", "inf-fold-weight", "no-proof", "unknown-rule", "unknown-slot-source",
        "weights-one-view", "negative-gesture-weight", "fallback-not-a-gesture", "config-rate-text",
        "config-bool-text", "config-negative"])
def test_a_manifest_that_cannot_be_served_as_written_stops_loudly(trained, tmp_path, edit, words):
    cfg, _ = trained
    refused(loaded_after_edit(cfg, tmp_path / "bundle", edit), *words)


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "lgbm/../../x.txt"])
def test_file_names_that_leave_the_bundle_are_refused(trained, tmp_path, name):
    cfg, _ = trained

    def edit(m):
        m["members"]["lgbm"]["files"][0] = name
        m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    refused(loaded_after_edit(cfg, tmp_path / "bundle", edit), "not a file inside the bundle")


def test_a_symlink_out_of_the_bundle_is_refused(trained, tmp_path):
    cfg, _ = trained
    (tmp_path / "elsewhere.txt").write_text("x")

    def edit(m):
        m["slot_models"]["files"][0] = "link.txt"
        m["files"]["link.txt"] = {"bytes": 1, "sha256": "0" * 64}
    bundle = copy_bundle(cfg, tmp_path / "b")
    (bundle / "link.txt").symlink_to(tmp_path / "elsewhere.txt")
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    refused(runtime, "link.txt", "not a file inside the bundle")


def test_a_manifest_that_is_a_list_names_the_path_and_the_fix(trained, tmp_path):
    cfg, _ = trained
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    (bundle / "manifest.json").write_text(json.dumps([1, 2, 3]))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    refused(runtime, "a JSON list, not an object", str(bundle))


def _rewrite_booster(bundle, manifest, k, change):
    """Edit fold k's LightGBM file and list its new size and SHA-256, as a careful forger would."""
    name = manifest["members"]["lgbm"]["files"][k]
    path = bundle / name
    lines = path.read_text().splitlines(keepends=True)
    i = next(j for j, line in enumerate(lines) if line.startswith("feature_names="))
    lines[i] = "feature_names=" + " ".join(change(lines[i].strip().split("=", 1)[1].split(" "))) + "\n"
    path.write_text("".join(lines))
    manifest["files"][name] = nb.file_digest(path)


def test_a_booster_with_its_features_in_another_order_is_left_out(trained, tmp_path):
    cfg, _ = trained
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    _rewrite_booster(bundle, manifest, 1, lambda names: names[1:2] + names[:1] + names[2:])
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    assert runtime.error is None and set(runtime.bundle.models) == ALL_FAMILIES - {"lgbm"}
    assert "first difference at position 0" in runtime.bundle.left_out["lgbm"]


def test_a_lightgbm_only_bundle_whose_booster_expects_other_features_stops(trained, tmp_path):
    cfg, _ = trained

    def lgbm_only_with_one_name_less(m):
        m["members"] = {"lgbm": m["members"]["lgbm"]}
        m["members"]["lgbm"]["feature_names"] = m["members"]["lgbm"]["feature_names"][:-1]
        m["blend_weights"] = {"full": [1.0], "imu_only": [1.0]}
    runtime = loaded_after_edit(cfg, tmp_path / "bundle", lgbm_only_with_one_name_less)
    assert runtime.error and "no member" in runtime.error and "booster's features differ" in runtime.error
    with pytest.raises(nb.BundleError):
        runtime.predict(pl.DataFrame(), pl.DataFrame())


def _calls(cfg):
    test = pl.read_csv(nb.Path(cfg.data_dir) / "test.csv")
    demo = pl.read_csv(nb.Path(cfg.data_dir) / "test_demographics.csv")
    return [(seq, demo.filter(pl.col("subject") == seq["subject"][0]))
            for _, seq in test.group_by("sequence_id", maintain_order=True)][:8]


def test_four_threads_making_the_first_calls_get_the_serial_answers(trained):
    cfg, _ = trained
    serving = nb.dataclasses.replace(cfg, subject_assignment=False, upside_down_fix=False)  # order-free answers
    calls = _calls(cfg)
    serial = nb.Runtime(serving)
    expected = [serial.predict(*c) for c in calls]
    runtime = nb.Runtime(serving)
    answers = [None] * len(calls)
    start = threading.Barrier(4)

    def worker(t):
        start.wait()
        for i in range(t, len(calls), 4):
            answers[i] = runtime.predict(*calls[i])
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == expected and runtime.stats.fallbacks == 0 and runtime.stats.calls == len(calls)


def _bundles(cfg, parent, specs):
    """Copies of the smoke bundle under `parent`: name -> (created, edit of the copy's folder or None)."""
    for name, (created, edit) in specs.items():
        bundle = copy_bundle(cfg, parent / name)
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["created"] = created
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        if edit:
            edit(bundle)


def _drop_blend_weights(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    m.pop("blend_weights")
    (bundle / "manifest.json").write_text(json.dumps(m))


def _lose_every_fold_file(bundle):
    for f in json.loads((bundle / "manifest.json").read_text())["files"]:
        if "_fold" in f:
            (bundle / f).unlink()


def _fail_the_proof(bundle):
    (bundle / nb.PROOF_OUTPUTS).write_bytes(b"not an archive")


def test_several_bundles_under_one_folder_the_newest_that_can_serve_serves(trained, tmp_path, capsys):
    """A newer bundle with a valid manifest but lost files, or a proof that fails, used to be chosen
    and stop serving, though an older one beside it serves; so did a `created` that is no date."""
    cfg, _ = trained
    parent = tmp_path / "input"
    _bundles(cfg, parent, {"a-old": ("2000-01-01T00:00:00Z", None), "b-new": ("2001-01-01T00:00:00Z", None),
                           "c-no-weights": ("2002-01-01T00:00:00Z", _drop_blend_weights),
                           "d-lost-files": ("2003-01-01T00:00:00Z", _lose_every_fold_file),
                           "e-bad-proof": ("2004-01-01T00:00:00Z", _fail_the_proof),
                           "f-no-date": ("not a date", None)})
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(parent)))
    runtime.load()
    assert runtime.error is None and runtime.bundle.path == parent / "b-new"
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "bundles under" in ln)
    assert line.count("bundles under") == 1 and "6 bundles" in line and "serving the newest that can serve" in line
    for name, why in (("a-old", "older"), ("f-no-date", "older"), ("c-no-weights", "cannot serve"),
                      ("d-lost-files", "cannot serve"), ("e-bad-proof", "cannot serve: ")):
        assert f"{parent / name} ({why}" in line, (name, line)
    assert "proof cannot be replayed" in line and "blend_weights" in line
    # A broken alphabetically-first bundle never shadows a valid one.
    for name in ("a-old", "b-new", "f-no-date"):
        shutil.rmtree(parent / name)
    copy_bundle(cfg, parent / "z-good")
    (parent / "a-broken").mkdir()
    (parent / "a-broken" / "manifest.json").write_text("{not json")
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(parent)))
    runtime.load()
    assert runtime.error is None and runtime.bundle.path == parent / "z-good"


def test_a_missing_bundle_lists_what_is_attached(trained, tmp_path):
    """README step 3 after the simplest publishing route: CMI_MODEL_PATH names a dataset that is not
    attached; the error lists what is, and its fix names the notebook's setting."""
    (tmp_path / "input" / "my-training-notebook").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        nb.find_bundle(tmp_path / "input" / "cmi-bfrb-bundle")
    assert "there is no such folder" in str(err.value) and "CMI_MODEL_PATH" in str(err.value)
    with pytest.raises(FileNotFoundError, match="my-training-notebook"):
        nb.find_bundle(tmp_path / "input")


def test_the_same_sequence_called_again_replaces_its_history_entry(trained):
    """Under a per-subject rule a rerun of one sequence_id must not count twice: three calls of the same
    sequence, with another of its subject's sequences between them, give one answer and one entry."""
    cfg, _ = trained
    runtime = nb.Runtime(cfg)
    runtime.bundle = nb.dataclasses.replace(runtime.require(), plan=nb.serving_plan("gesture_capacity"))
    calls = _calls(cfg)
    (seq, demo), (other, other_demo) = [c for c in calls if c[0]["subject"][0] == calls[0][0]["subject"][0]][:2]
    answers = [runtime.predict(seq, demo)]
    runtime.predict(other, other_demo)
    answers += [runtime.predict(seq, demo) for _ in range(2)]
    assert len(set(answers[1:])) == 1 and all(a in nb.GESTURES for a in answers)
    assert list(runtime.subjects.history[seq["subject"][0]]) == [other["sequence_id"][0], seq["sequence_id"][0]]


def _one_call(cfg):
    """The first call whose thermopiles and ToF are present."""
    return next(c for c in _calls(cfg) if c[0]["thm_1"].null_count() == 0)


BAD_INPUTS = {
    "counters all 0": (lambda s, d: (s.with_columns(pl.lit(0).alias("sequence_counter")), d), "sequence_counter repeats"),
    "rows doubled": (lambda s, d: (pl.concat([s, s]), d), "sequence_counter repeats"),
    "counter null": (lambda s, d: (s.with_columns(pl.lit(None, pl.Int64).alias("sequence_counter")), d),
                     "sequence_counter empty"),
    "counter gap": (lambda s, d: (s.with_columns(pl.col("sequence_counter") * 2), d), "does not run 0..n-1"),
    "handedness 2": (lambda s, d: (s, d.with_columns(pl.lit(2).alias("handedness"))), "handedness"),
    "handedness left": (lambda s, d: (s, d.with_columns(pl.lit("left").alias("handedness"))), "handedness"),
    "age -5": (lambda s, d: (s, d.with_columns(pl.lit(-5).alias("age"))), "demographics age"),
    "height 1e9": (lambda s, d: (s, d.with_columns(pl.lit(1e9).alias("height_cm"))), "demographics height_cm"),
    "tof 1e9": (lambda s, d: (s.with_columns(pl.lit(1e9).alias("tof_1_v0")), d), "outside their physical range"),
    "tof -5": (lambda s, d: (s.with_columns(pl.lit(-5.0).alias("tof_2_v3")), d), "outside their physical range"),
    "acc +inf": (lambda s, d: (s.with_columns(pl.lit(float("inf")).alias("acc_x")), d), "infinite sensor values"),
    "acc -inf": (lambda s, d: (s.with_columns(pl.lit(float("-inf")).alias("acc_y")), d), "infinite sensor values"),
    "every sensor null": (lambda s, d: (s.with_columns(pl.lit(None, pl.Float32).alias(c) for c in nb.SENSOR_COLS), d),
                          "no sensor values in the call"),
    "every sensor infinite": (lambda s, d: (s.with_columns(pl.lit(float("inf")).alias(c) for c in nb.SENSOR_COLS), d),
                              "no sensor values in the call"),
    "IMU null, thm and ToF present": (lambda s, d: (s.with_columns(pl.lit(None, pl.Float32).alias(c)
                                                                  for c in nb.ACC_COLS + nb.ROT_COLS), d),
                                      "IMU empty; answered from the thermopiles and ToF alone"),
    "two rows": (lambda s, d: (s.head(2), d), "sequence of 1 or 2 rows"),
    "one row": (lambda s, d: (s.head(1), d), "sequence of 1 or 2 rows"),
    "no subject column": (lambda s, d: (s.drop("subject"), d), "no subject column"),
    "no sequence_id column": (lambda s, d: (s.drop("sequence_id"), d), "no sequence_id column"),
    "two demographics rows, the other's first": (
        lambda s, d: (s, pl.concat([d.with_columns(pl.lit("SUBJ_OTHER").alias("subject"),
                                                   (1 - pl.col("handedness")).alias("handedness")), d])),
        "the sequence's subject's row used"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_every_repair_of_a_bad_input_is_counted_and_logged(trained, kind, caplog):
    """A valid gesture and a log line for each bad input, and the kind in the closing summary."""
    cfg, _ = trained
    mutate, problem = BAD_INPUTS[kind]
    runtime = nb.Runtime(cfg)
    seq, demo = mutate(*_one_call(cfg))
    answer = runtime.predict(seq, demo)
    assert type(answer) is str and answer in nb.GESTURES
    assert any(problem in k for k in runtime.stats.problems), dict(runtime.stats.problems)
    assert problem in caplog.text and problem in runtime.summary()


def test_the_sequence_subjects_demographics_row_is_the_one_used(trained):
    cfg, _ = trained
    runtime = nb.Runtime(cfg)
    seq, demo = _one_call(cfg)
    other = demo.with_columns(pl.lit("SUBJ_OTHER").alias("subject"), (1 - pl.col("handedness")).alias("handedness"))
    chosen = nb.checked_demographics(pl.concat([other, demo]), seq["subject"][0], runtime.stats)
    assert chosen.height == 1 and chosen["subject"][0] == seq["subject"][0]


def test_a_run_of_fallback_answers_stops_serving(trained):
    """Twenty calls in a row that only the fallback could answer: predict() raises, so the gateway fails
    visibly instead of scoring a submission of fallback answers; every later call raises too."""
    cfg, _ = trained
    runtime = nb.Runtime(cfg)
    seq, demo = _one_call(cfg)
    for _ in range(nb.FALLBACK_STREAK_LIMIT - 1):
        assert runtime.predict(pl.DataFrame(), pl.DataFrame()) == runtime.fallback
    assert runtime.predict(seq, demo) in nb.GESTURES  # a real answer resets the run
    for _ in range(nb.FALLBACK_STREAK_LIMIT - 1):
        runtime.predict(pl.DataFrame(), pl.DataFrame())
    with pytest.raises(nb.BundleError, match="the last 20 calls were all answered by the fallback"):
        runtime.predict(pl.DataFrame(), pl.DataFrame())
    with pytest.raises(nb.BundleError):
        runtime.predict(seq, demo)


def test_a_local_gateway_run_mostly_answered_by_the_fallback_fails(trained, tmp_path, monkeypatch):
    """No run of 20, but every third call unanswerable: the submission is written, the summary says it, and
    serving raises, so the script exits non-zero."""
    cfg, _ = trained
    serving = nb.dataclasses.replace(cfg, stage="infer", out_dir=str(tmp_path / "out"),
                                     model_path=str(nb.Path(cfg.out_dir) / "bundle"))
    runtime = nb.set_runtime(serving)
    real_answer, count = runtime.answer, iter(range(10 ** 6))
    monkeypatch.setattr(runtime, "answer", lambda s, d: None if next(count) % 3 == 0 else real_answer(s, d))
    with pytest.raises(nb.BundleError, match=r"calls were answered by the fallback gesture \(more than 10%\)"):
        nb.serve(serving)
    assert (tmp_path / "out" / "submission.parquet").exists()
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())["serving"]
    assert summary["fallback_calls"] > 0.1 * summary["calls"]


def test_a_bundle_whose_every_member_fails_per_call_stops_the_gateway(trained, tmp_path, monkeypatch):
    cfg, _ = trained
    serving = nb.dataclasses.replace(cfg, stage="infer", out_dir=str(tmp_path / "out"),
                                     model_path=str(nb.Path(cfg.out_dir) / "bundle"))
    runtime = nb.set_runtime(serving)
    runtime.require()
    # Every member fails every call (each is left out of that call's blend, as test_serving checks).
    monkeypatch.setattr(runtime, "proba", lambda *a, **k: ({}, "full", {}))
    with pytest.raises(nb.BundleError, match="the last 20 calls were all answered by the fallback"):
        nb.serve(serving)


def test_an_untouched_bundle_passes_its_proof(trained):
    cfg, _ = trained
    manifest = json.loads((nb.Path(cfg.out_dir) / "bundle" / "manifest.json").read_text())
    proof = manifest["proof"]
    assert len(proof["views"]) == 8 and set(proof["views"]) == set(nb.VIEWS)
    assert 0 in {d["handedness"] for d in proof["demographics"]}, "a left-handed reference subject"
    assert {proof["calls"], proof["outputs"]} <= set(manifest["files"])
    runtime = nb.Runtime(cfg)
    runtime.load()
    assert runtime.error is None and set(runtime.bundle.models) == ALL_FAMILIES and not runtime.bundle.left_out


def test_the_proof_catches_a_booster_whose_features_are_permuted(trained, tmp_path):
    """The file's and the manifest's feature names permuted alike, sizes and SHA-256 updated: every name
    check passes, and the booster reads shifted columns. Only the replay sees it."""
    cfg, _ = trained
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    swap = lambda names: names[::-1]  # noqa: E731  (every column moves)
    for k in range(len(manifest["members"]["lgbm"]["files"])):
        _rewrite_booster(bundle, manifest, k, swap)
    manifest["members"]["lgbm"]["feature_names"] = swap(manifest["members"]["lgbm"]["feature_names"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    assert runtime.error is None and set(runtime.bundle.models) == ALL_FAMILIES - {"lgbm"}
    assert "load-time proof" in runtime.bundle.left_out["lgbm"] and "lightgbm" in runtime.bundle.left_out["lgbm"]


def test_the_proof_catches_a_torch_fold_replaced_by_another_folds_file(trained, tmp_path):
    cfg, _ = trained
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    first, second = manifest["members"]["torch"]["files"][:2]
    shutil.copy(bundle / second, bundle / first)
    manifest["files"][first] = nb.file_digest(bundle / first)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    assert runtime.error is None and "torch" not in runtime.bundle.models and "torch_imu" in runtime.bundle.models
    assert "load-time proof" in runtime.bundle.left_out["torch"] and "(fold 0;" in runtime.bundle.left_out["torch"]


def test_a_proof_file_that_does_not_match_the_manifest_stops_the_bundle(trained, tmp_path):
    cfg, _ = trained
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    (bundle / nb.PROOF_OUTPUTS).write_bytes(b"not an archive")
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    assert runtime.error and "proof cannot be replayed" in runtime.error and "Fix:" in runtime.error


# --- Training and options: every attack stops at parse time, naming the option and the fix.
OPTION_ATTACKS = [
    (["--net-aux-weights", "nan,0,0"], "--net-aux-weights 'nan,0,0': not a list it can use"),
    (["--net-conv", "16,0"], "--net-conv '16,0': not a list it can use"),
    (["--folds=5", "--folds", "6"], "--folds: given more than once"),
]


@pytest.mark.parametrize("argv,message", OPTION_ATTACKS, ids=[a[0] for a, _ in OPTION_ATTACKS])
def test_an_unusable_option_stops_at_parse_time(argv, message):
    with pytest.raises(nb.ConfigError) as err:
        nb.parse_config(argv, environ={})
    assert message in str(err.value) and "Fix:" in str(err.value), str(err.value)


def test_a_plain_default_edit_in_the_config_cell_works(tmp_path):
    """The natural notebook edit `folds: int | None = 4` (the _doc() call replaced) used to kill every
    run, --help included, with KeyError 'doc'. Run as a user runs the edited notebook: its own file."""
    import subprocess
    import sys
    from conftest import plainly_edited
    (tmp_path / "edited.py").write_text(plainly_edited(nb.Path(nb.__file__).read_text(), "folds", "4"))
    code = ("import edited\n"
            "c = edited.parse_config(['--profile', 'full'], environ={})\n"
            "print(c.folds)\n"
            "print('folds' in {f.name for f in edited.dataclasses.fields(edited.Config)"
            " if 'lgbm' in edited.affected(f)})\n"
            "edited.parse_config(['--help'], environ={})\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[:2] == ["4", "True"] and "--folds" in res.stdout  # kept; retrains every model


def test_an_inference_only_run_never_generates_demo_data(tmp_path):
    cfg = nb.parse_config(["--stage", "infer", "--demo", "--data-dir", str(tmp_path / "none")], environ={})
    assert nb.resolve_data_dir(cfg) == tmp_path / "none" and not (tmp_path / "none").exists()
    with pytest.raises(nb.DataError, match="missing"):
        nb.require_data_files(nb.resolve_data_dir(cfg), cfg.stage)


def test_the_config_line_names_no_bundles_serving_will_name(trained, tmp_path, capsys):
    """With several bundles attached, the "N bundles under ..." line is printed once, by serving."""
    cfg, _ = trained
    for name in ("a", "b"):
        copy_bundle(cfg, tmp_path / "input" / name)
    infer = nb.dataclasses.replace(cfg, stage="infer", model_path=str(tmp_path / "input"))
    assert "serving the bundle" in nb.config_line(infer)
    assert "bundles under" not in capsys.readouterr().out
    nb.Runtime(infer).load()
    assert capsys.readouterr().out.count("2 bundles under") == 1


def _label_edit(column, value, rows_to_edit=(1,)):
    def edit(rows):
        for i in rows_to_edit:
            rows[i][rows[0].index(column)] = value
        return rows
    return edit


@pytest.mark.parametrize("edit,message", [
    (_label_edit("orientation", "seated straight"), "column 'orientation' has 1 unknown value(s), e.g. ['seated straight']"),
    (_label_edit("behavior", ""), "column 'behavior' has 1 empty cells"),
    (_label_edit("sequence_type", "target"), "column 'sequence_type' has 1 unknown value(s)"),
    (_label_edit("phase", "gesture"), "column 'phase' has 1 unknown value(s)"),
    (_label_edit("gesture", "Wave"), "column 'gesture' has 1 unknown value(s), e.g. ['Wave']"),
], ids=["orientation lower-cased", "behavior empty", "sequence_type", "phase", "gesture"])
def test_a_training_label_outside_the_known_values_stops_training(edit, message, tmp_path, sample_dir):
    """Such a label used to be read as class 0: the slot models learnt from it and reported accuracy 1.000."""
    from test_data import _write_train
    path = _write_train(tmp_path, sample_dir, edit)
    with pytest.raises(nb.DataError) as err:
        nb.load_training_data(tmp_path)
    assert message in str(err.value) and str(path) in str(err.value) and "Fix:" in str(err.value), str(err.value)


def test_a_sequence_without_a_subject_stops_training(tmp_path, sample_dir):
    """An empty subject for a whole sequence ended in a raw sklearn TypeError after the features."""
    from test_data import _write_train

    def no_subject(rows):
        first = rows[1][rows[0].index("sequence_id")]
        for r in rows[1:]:
            if r[rows[0].index("sequence_id")] == first:
                r[rows[0].index("subject")] = ""
        return rows
    _write_train(tmp_path, sample_dir, no_subject)
    with pytest.raises(nb.DataError, match=r"column 'subject' has \d+ empty cells.*Fix:"):
        nb.load_training_data(tmp_path)


def test_upper_cased_sensor_columns_are_renamed_and_answer_as_intact(trained):
    """Sensor columns named in another case used to be missing: the models answered from the
    demographics alone, one gesture for all, and no fallback counted."""
    cfg, _ = trained
    runtime = nb.Runtime(cfg)
    calls = _calls(cfg)[:6]
    intact = [runtime.predict(s, d) for s, d in calls]
    shouting = nb.Runtime(cfg)
    upper = [shouting.predict(s.rename({c: c.upper() for c in s.columns if c in nb.SENSOR_COLS}), d) for s, d in calls]
    assert upper == intact and shouting.stats.fallbacks == 0
    assert shouting.stats.problems["column names in another case; renamed to the competition's"] == len(calls)


def test_the_breaker_counts_a_share_not_only_a_streak(trained):
    """19 unusable calls and one good one, over and over: no streak reaches 20, but once more than half
    of 40 calls or more fell back, serving stops loudly."""
    cfg, _ = trained
    runtime = nb.Runtime(cfg)
    seq, demo = _one_call(cfg)
    blank = seq.with_columns(pl.lit(None, pl.Float32).alias(c) for c in nb.SENSOR_COLS)
    with pytest.raises(nb.BundleError, match=r"\d+ of \d+ calls were answered by the fallback gesture"):
        for _ in range(10):
            for _ in range(nb.FALLBACK_STREAK_LIMIT - 1):
                runtime.predict(blank, demo)
            runtime.predict(seq, demo)
    assert runtime.stats.calls == 2 * nb.FALLBACK_STREAK_LIMIT + 1  # the first call past the share


def test_predict_imported_by_another_program_reads_no_argv_and_raises_on_a_bad_setting(trained, monkeypatch):
    """`import notebook` in a process with flags of its own, then notebook.predict(): the Runtime made
    lazily used to parse that argv, fail, and answer GESTURES[0] for every call without a word."""
    cfg, _ = trained
    seq, demo = _one_call(cfg)
    monkeypatch.setattr(nb, "_RUNTIME", None)
    monkeypatch.setattr(nb.sys, "argv", ["host.py", "--host-flag", "1", "-x"])
    monkeypatch.setenv("CMI_MODEL_PATH", str(nb.Path(cfg.out_dir) / "bundle"))
    monkeypatch.setenv("CMI_DATA_DIR", cfg.data_dir)
    assert nb.predict(seq, demo) in nb.GESTURES and nb._RUNTIME.stats.fallbacks == 0
    monkeypatch.setattr(nb, "_RUNTIME", None)
    monkeypatch.setenv("CMI_FOLDS", "abc")
    with pytest.raises(nb.ConfigError, match="CMI_FOLDS='abc'"):
        nb.predict(seq, demo)


def test_first_calls_from_several_threads_make_one_runtime(trained, monkeypatch):
    cfg, _ = trained
    seq, demo = _one_call(cfg)
    monkeypatch.setattr(nb, "_RUNTIME", None)
    monkeypatch.setattr(nb.sys, "argv", ["host.py"])
    monkeypatch.setenv("CMI_MODEL_PATH", str(nb.Path(cfg.out_dir) / "bundle"))
    made = []
    real = nb.Runtime.__init__

    def counted(self, *a, **k):
        made.append(1)
        real(self, *a, **k)
    monkeypatch.setattr(nb.Runtime, "__init__", counted)
    threads = [threading.Thread(target=nb.predict, args=(seq, demo)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and nb._RUNTIME.stats.calls == 8


def test_the_proofs_tolerance_is_the_codes_not_the_manifests(trained, tmp_path):
    """proof.tolerance edited to 1e9 used to let a swapped fold pass the proof."""
    cfg, _ = trained

    def edit(m):
        m["proof"]["tolerance"] = 1e9
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    first, second = manifest["members"]["torch"]["files"][:2]
    shutil.copy(bundle / second, bundle / first)
    manifest["files"][first] = nb.file_digest(bundle / first)
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    assert "torch" not in runtime.bundle.models and f"tolerance {nb.PROOF_TOLERANCE:g}" in runtime.bundle.left_out["torch"]


def test_a_header_only_test_file_stops_before_any_gateway(trained, tmp_path):
    """It used to end in an IndexError from inside the gateway."""
    cfg, _ = trained
    data = tmp_path / "data"
    shutil.copytree(cfg.data_dir, data)
    header = (data / "test.csv").read_text().splitlines()[0]
    (data / "test.csv").write_text(header + "\n")
    serving = nb.dataclasses.replace(cfg, stage="infer", data_dir=str(data), demo=False, out_dir=str(tmp_path / "out"),
                                     model_path=str(nb.Path(cfg.out_dir) / "bundle"))
    with pytest.raises(nb.DataError, match="a header and no rows.*Fix:"):
        nb.serve(serving)
    assert not (tmp_path / "out" / "submission.parquet").exists()


def _other_rule(m):
    m["serving"] = nb.serving_plan("argmax" if m["serving"]["rule"] != "argmax" else "gesture_capacity")


def _other_weights(m):
    m["blend_weights"]["full"] = [1.0] + [0.0] * (len(m["members"]) - 1)


def _other_fallback(m):
    m["fallback_gesture"] = next(g for g in nb.GESTURES if g != m["fallback_gesture"])


@pytest.mark.parametrize("edit,where", [
    (_other_rule, "serving.rule"),
    (lambda m: m["serving"].update(nb.serving_plan("slots", "heads", {"full": 1.0, "imu_only": 1.0})), "serving.rule"),
    (_other_weights, "blend_weights.full["),
    (lambda m: m["target_scale"].__setitem__("imu_only", m["target_scale"]["imu_only"] * 1.5), "target_scale.imu_only"),
    (lambda m: m["members"]["lgbm"].__setitem__("fold_weights", [1.0] + [0.0] * (len(m["members"]["lgbm"]["files"]) - 1)),
     "members.lgbm.fold_weights["),
    (_other_fallback, "fallback_gesture"),
    (lambda m: m["upside_down"].__setitem__("enabled", not m["upside_down"]["enabled"]), "upside_down.enabled"),
], ids=["rule", "slots-rule", "blend-weight", "target-scale", "fold-weight", "fallback", "upside-down-check"])
def test_a_plan_edited_to_valid_values_is_refused_by_the_proof(trained, tmp_path, edit, where):
    """Each value serving decides by, edited to one that validates (a rule tried by hand, weights that
    still sum to 1): the answers could change where no replay of 8 calls shows it, so the proof's copy
    of the plan refuses the bundle, naming the field."""
    cfg, _ = trained
    refused(loaded_after_edit(cfg, tmp_path / "bundle", edit), where, "proof was recorded with")


def _reference_calls(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    calls = pl.read_parquet(bundle / nb.PROOF_CALLS)
    demo = pl.DataFrame(manifest["proof"]["demographics"])
    return manifest, [(seq, demo.filter(pl.col("subject") == seq["subject"][0]))
                      for _, seq in calls.group_by("sequence_id", maintain_order=True)]


@pytest.mark.parametrize("plan", [None, ("slots", "lgbm"), ("slots", "heads")],
                         ids=["as-trained", "slots-lgbm", "slots-heads"])
def test_the_proofs_answers_are_what_predict_serves_the_reference_calls(trained, tmp_path, plan):
    """The answers the proof stores are predict()'s, in call order, under the plan training chose and
    under each slot plan (its proof recorded for it): the served plan, the slot models and the
    per-subject rule are inside the proof. (The proof never turns a wearer: the check is off here.)"""
    cfg, _ = trained
    edit = (lambda m: m.update(serving=nb.serving_plan(*plan, {"full": 1.0, "imu_only": 2.0}))) if plan else (lambda m: None)
    runtime = loaded_after_edit(cfg, tmp_path / "bundle", edit, reprove=bool(plan))
    assert runtime.error is None and not runtime.bundle.left_out, runtime.bundle.left_out
    manifest, calls = _reference_calls(tmp_path / "bundle")
    served = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(tmp_path / "bundle"), upside_down_fix=False))
    assert [served.predict(seq, demo) for seq, demo in calls] == manifest["proof"]["answers"]
    assert served.stats.fallbacks == 0 and not served.stats.problems, served.stats.problems
    if plan == ("slots", "lgbm"):
        assert nb.SLOT_OUTPUT in np.load(tmp_path / "bundle" / nb.PROOF_OUTPUTS).files


def test_slot_models_that_compute_something_else_are_left_out_and_the_reduced_plan_is_proven(trained, tmp_path):
    """Under a slots/lgbm plan, the orientation slot models of two folds swapped (sizes and SHA-256
    updated): every file check passes; the replay of the slot models shows it, they are left out, and
    what serves (gesture_capacity over the members) is proven on the stored outputs."""
    cfg, _ = trained
    bundle = tmp_path / "bundle"
    loaded_after_edit(cfg, bundle, lambda m: m.update(serving=nb.serving_plan("slots", "lgbm", {"full": 1.0, "imu_only": 1.0})),
                      reprove=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    first, second = [f for f in manifest["slot_models"]["files"] if f.startswith("slot_model_orientation")][:2]
    (bundle / first).write_bytes((bundle / second).read_bytes())
    manifest["files"][first] = nb.file_digest(bundle / first)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = nb.Runtime(nb.dataclasses.replace(cfg, model_path=str(bundle)))
    runtime.load()
    assert runtime.error is None and set(runtime.bundle.models) == ALL_FAMILIES, runtime.error
    assert runtime.bundle.rule == "gesture_capacity" and "load-time proof" in runtime.bundle.left_out["slot models"]


def test_a_reduced_blend_is_proven_on_the_stored_outputs(trained, tmp_path, monkeypatch):
    """A member left out (another fold's file under its name): the blend of the others must answer
    the reference calls as their stored outputs do under the plan that serves; a decision that
    differs there (here: every class moved in the replay, past the members' own checks) stops the bundle."""
    cfg, _ = trained
    bundle = copy_bundle(cfg, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    first, second = manifest["members"]["torch"]["files"][:2]
    (bundle / first).write_bytes((bundle / second).read_bytes())
    manifest["files"][first] = nb.file_digest(bundle / first)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    served = nb.dataclasses.replace(cfg, model_path=str(bundle))
    runtime = nb.Runtime(served)
    runtime.load()
    assert runtime.error is None and set(runtime.bundle.models) == ALL_FAMILIES - {"torch"}

    real_replay, real_difference = nb.replay_proof, nb.proof_difference

    def replay_with_the_classes_moved(*args, **kwargs):  # every call's gesture probabilities shifted by one class
        out, views, keys = real_replay(*args, **kwargs)
        return {k: np.roll(v, 1, axis=-1) if k.endswith(".gesture") else v for k, v in out.items()}, views, keys
    monkeypatch.setattr(nb, "replay_proof", replay_with_the_classes_moved)
    monkeypatch.setattr(nb, "proof_difference",  # ... where each member's own check does not look
                        lambda got, stored, prefix: real_difference(got, stored, prefix) if prefix == "torch." else (0.0, -1))
    runtime = nb.Runtime(served)
    runtime.load()
    assert runtime.error and "reference calls" in runtime.error and "stored at training give" in runtime.error
    assert "lgbm, torch_imu, keras, keras_imu under the" in runtime.error
