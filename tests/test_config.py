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
    cfg = nb.parse_config(["-f", "/root/.local/share/jupyter/runtime/kernel-1.json"], environ={})
    assert cfg.profile in nb.PROFILES


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
