import pytest

import notebook as nb


def test_profile_defaults_and_flag_override():
    cfg = nb.parse_config(["--profile", "smoke", "--folds", "3"], environ={})
    assert cfg.profile == "smoke" and cfg.folds == 3 and cfg.epochs == nb.PROFILES["smoke"]["epochs"]


def test_environment_variables_override_and_flags_win():
    env = {"CMI_FOLDS": "4", "CMI_PROFILE": "smoke", "CMI_DEMO": "1", "CMI_SAMPLE_RATE_HZ": "20"}
    cfg = nb.parse_config([], environ=env)
    assert cfg.folds == 4 and cfg.demo is True and cfg.sample_rate_hz == 20.0
    assert nb.parse_config(["--folds", "2"], environ=env).folds == 2


def test_jupyter_arguments_are_ignored():
    """The kernel's own `-f connection.json` changes nothing: the same Config as without it, with the
    settings given by environment and by flag intact."""
    env = {"CMI_FOLDS": "4", "CMI_PROFILE": "smoke"}
    kernel = ["-f", "/root/.local/share/jupyter/runtime/kernel-1.json"]
    plain = nb.parse_config(["--epochs", "3"], environ=env)
    assert nb.parse_config(kernel + ["--epochs", "3"], environ=env) == plain
    assert nb.parse_config(["--epochs", "3"] + kernel, environ=env) == plain
    assert (plain.folds, plain.epochs, plain.profile) == (4, 3, "smoke")


def test_bad_values_are_rejected_with_the_option_name():
    with pytest.raises(ValueError, match="--stage"):
        nb.parse_config(["--stage", "fit"], environ={})
    with pytest.raises(ValueError, match="--models"):
        nb.parse_config(["--models", "xgb"], environ={})


def test_rerun_never_trains(monkeypatch):
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")
    assert nb.parse_config(["--stage", "all"], environ={}).stage == "infer"


def test_every_field_is_documented():
    for f in nb.dataclasses.fields(nb.Config):
        assert len(f.metadata.get("doc", "")) > 10, f.name


def test_boolean_flags_can_be_switched_both_ways():
    assert nb.parse_config(["--demo"], environ={}).demo is True
    assert nb.parse_config(["--subject-assignment", "false"], environ={}).subject_assignment is False
    assert nb.parse_config([], environ={"CMI_SUBJECT_ASSIGNMENT": "0"}).subject_assignment is False


def test_help_lists_every_option():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, str(nb.Path(nb.__file__)), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for f in nb.dataclasses.fields(nb.Config):
        assert "--" + f.name.replace("_", "-") in res.stdout
    assert "10% of" in res.stdout  # help texts with a percent sign print as written


def test_every_path_is_absolute_once_parsed(tmp_path, monkeypatch):
    """The gateway runs in OUT; a relative path read after that would point elsewhere."""
    monkeypatch.chdir(tmp_path)
    cfg = nb.parse_config(["--data-dir", "data", "--model-path", "working/bundle", "--importance-path",
                           "imp.csv"], environ={})
    assert cfg.data_dir == str(tmp_path / "data") and cfg.model_path == str(tmp_path / "working" / "bundle")
    assert cfg.out_dir == str(tmp_path / "working") and cfg.importance_path == str(tmp_path / "imp.csv")
    assert cfg.demo is False
    demo = nb.parse_config([], environ={})  # no competition data attached: demo data in ./demo_data
    assert demo.data_dir == str(tmp_path / "demo_data") and demo.demo is True


def _a_value_no_profile_uses(name):
    """A valid value for a profile-set field that differs from every profile's own."""
    used = {p.get(name) for p in nb.PROFILES.values()}
    candidates = {"models": ["lgbm", "torch", "keras,lgbm"], "torch_arch": ["squeezeformer", "gru"],
                  "torch_conv": ["24,48", "40,80"], "lgbm_imu_reference": [True, False]}.get(name)
    if candidates is None:
        base = max(v for v in used if v is not None)
        candidates = [type(base)(base * 3 + 1)]
    return next(c for c in candidates if c not in used or name == "lgbm_imu_reference")


PROFILE_FIELDS = sorted({name for p in nb.PROFILES.values() for name in p})


def test_every_profile_field_is_unset_by_default():
    """Profiles fill only unset (None) fields, so each field they set must default to None."""
    defaults = nb.Config()
    assert [n for n in PROFILE_FIELDS if getattr(defaults, n) is not None] == []
    assert all(set(p) == set(nb.PROFILES["full"]) for p in nb.PROFILES.values()), "every profile sets every such field"


@pytest.mark.parametrize("profile", sorted(nb.PROFILES))
def test_a_flag_and_a_cmi_variable_survive_every_profile(profile):
    for name in PROFILE_FIELDS:
        value = _a_value_no_profile_uses(name)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        by_flag = nb.parse_config(["--profile", profile, "--" + name.replace("_", "-"), text], environ={})
        by_env = nb.parse_config([], environ={"CMI_PROFILE": profile, f"CMI_{name.upper()}": text})
        assert getattr(by_flag, name) == value == getattr(by_env, name), (profile, name)


def test_an_edit_of_the_config_cell_survives_every_profile(tmp_path):
    """The natural notebook edit: change a default in the Config dataclass. The edited notebook is run
    as a user runs it (its own file, a subprocess), once per profile."""
    import subprocess
    import sys
    source = (nb.Path(nb.__file__)).read_text()
    edits = {'    folds: int | None = _doc("number of CV folds (grouped by subject, stratified by gesture)")':
             '    folds: int | None = _doc("number of CV folds (grouped by subject, stratified by gesture)", 7)',
             '    torch_hidden: int | None = _doc("BiGRU hidden size per direction")':
             '    torch_hidden: int | None = _doc("BiGRU hidden size per direction", 20)'}
    for old, new in edits.items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    (tmp_path / "edited.py").write_text(source)
    code = ("import sys, edited\n"
            "for p in sorted(edited.PROFILES):\n"
            "    c = edited.parse_config(['--profile', p], environ={})\n"
            "    print(p, c.folds, c.torch_hidden, c.epochs == edited.PROFILES[p]['epochs'])\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.split()[0] in nb.PROFILES]
    assert lines == [f"{p} 7 20 True" for p in sorted(nb.PROFILES)]
