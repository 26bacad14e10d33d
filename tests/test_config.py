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
    kernel = ["-f", "/root/.local/share/jupyter/runtime/kernel-1.json", "--HistoryManager.hist_file=:memory:"]
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


def test_every_field_is_documented_and_has_its_decision():
    """Every field has a doc of its own (--help prints it) and an entry in docs/DECISIONS.md that names
    its flag: what it was measured on, or why it is not a model choice."""
    docs = [f.metadata.get("doc", "") for f in nb.dataclasses.fields(nb.Config)]
    assert all(d and not d.startswith("(edited") for d in docs) and len(set(docs)) == len(docs)
    decisions = (nb.Path(nb.__file__).parent / "docs" / "DECISIONS.md").read_text()
    missing = [f.name for f in nb.dataclasses.fields(nb.Config) if f"`{nb.flag_of(f.name)}" not in decisions]
    assert not missing, f"no entry in docs/DECISIONS.md names these options: {missing}"


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
    # grouped by the Config's sections, each option with what it takes and its default per profile
    for title in nb.CONFIG_SECTIONS:
        assert f"\n{title}:\n" in res.stdout, title
    assert "CMI_<FIELD>" in res.stdout
    flat = " ".join(res.stdout.split())
    assert "{all,train,infer}" in flat and "per profile: smoke 2, quick 3, full 5" in flat


def test_the_help_sections_are_the_config_cell_sections():
    """CONFIG_SECTIONS is the `# --- title` comments of the Config class, in order, each with the field
    right below it: a section renamed, added or moved in one place and not the other fails here."""
    import ast
    source = nb.Path(nb.__file__).read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Config")
    lines = source.splitlines()[cls.lineno - 1:cls.end_lineno]
    found = {}
    for i, line in enumerate(lines):
        if line.strip().startswith("# --- "):
            found[line.strip()[len("# --- "):]] = lines[i + 1].strip().split(":")[0]
    assert found == nb.CONFIG_SECTIONS and list(found) == list(nb.CONFIG_SECTIONS)


def test_help_texts_with_a_percent_sign_print_as_written():
    @nb.dataclass
    class Share:
        share: float = nb._doc("a 10% share of the rows", 0.1, low=0.0)
    text = nb.config_parser({f.name: f for f in nb.dataclasses.fields(Share)}).format_help()
    assert "a 10% share of the rows" in " ".join(text.split())


def test_every_path_is_absolute_once_parsed(tmp_path, monkeypatch):
    """The gateway runs in OUT; a relative path read after that would point elsewhere."""
    monkeypatch.chdir(tmp_path)
    cfg = nb.parse_config(["--data-dir", "data", "--model-path", "working/bundle", "--resume-from", "old"],
                          environ={})
    assert cfg.data_dir == str(tmp_path / "data") and cfg.model_path == str(tmp_path / "working" / "bundle")
    assert cfg.out_dir == str(tmp_path / "working") and cfg.resume_from == str(tmp_path / "old")
    assert cfg.demo is False
    demo = nb.parse_config([], environ={})  # no competition data attached: demo data in ./demo_data
    assert demo.data_dir == str(tmp_path / "demo_data") and demo.demo is True


def _a_value_no_profile_uses(name):
    """A valid value for a profile-set field that differs from every profile's own."""
    used = {p.get(name) for p in nb.PROFILES.values()}
    candidates = {"models": [("lgbm",), ("torch",), ("keras", "lgbm")], "net_conv": [(24, 48), (40, 80)],
                  "net_variants": [("imu",)]}.get(name)
    if candidates is None:  # a number inside the field's allowed range
        meta = {f.name: f.metadata for f in nb.dataclasses.fields(nb.Config)}[name]
        low, high = meta["low"] or 0, meta["high"] or 10 ** 6
        if all(isinstance(v, int) for v in used):
            candidates = [v for v in range(max(int(low), 6), int(low) + 300) if v <= high]  # 6+: folds <= subjects
        else:
            candidates = [v for v in (0.05, 0.07, 0.11, 0.33, 0.77, 1.0) if low <= v <= high]
    return next(c for c in candidates if c not in used)


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
        text = str(value).lower() if isinstance(value, bool) else nb.as_text(value) if isinstance(value, tuple) else str(value)
        by_flag = nb.parse_config(["--profile", profile, "--" + name.replace("_", "-"), text], environ={})
        by_env = nb.parse_config([], environ={"CMI_PROFILE": profile, f"CMI_{name.upper()}": text})
        assert getattr(by_flag, name) == value == getattr(by_env, name), (profile, name)


def test_an_edit_of_the_config_cell_survives_every_profile(tmp_path):
    """The natural notebook edit: change a default in the Config dataclass. The edited notebook is run
    as a user runs it (its own file, a subprocess), once per profile."""
    import subprocess
    import sys
    from conftest import default_edited
    source = default_edited(default_edited(nb.Path(nb.__file__).read_text(), "folds", "4"), "net_hidden", "20")
    (tmp_path / "edited.py").write_text(source)
    code = ("import sys, edited\n"
            "for p in sorted(edited.PROFILES):\n"
            "    c = edited.parse_config(['--profile', p], environ={})\n"
            "    print(p, c.folds, c.net_hidden, c.epochs == edited.PROFILES[p]['epochs'])\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.split()[0] in nb.PROFILES]
    assert lines == [f"{p} 4 20 True" for p in sorted(nb.PROFILES)]


def test_unknown_names_are_errors_that_suggest_the_closest():
    with pytest.raises(nb.ConfigError, match=r"'--n-folds'.*did you mean --folds\?"):
        nb.parse_config(["--n-folds", "5"], environ={})
    with pytest.raises(nb.ConfigError, match=r"'--fold'.*did you mean --folds\?"):
        nb.parse_config(["--fold", "5"], environ={})  # no abbreviations: a prefix is a typo too
    with pytest.raises(nb.ConfigError, match=r"CMI_FOLD: no such setting; did you mean CMI_FOLDS\?"):
        nb.parse_config([], environ={"CMI_FOLD": "5"})
    with pytest.raises(nb.ConfigError, match=r"'stray'"):
        nb.parse_config(["stray"], environ={})
    # The test suite's own variables and other programs' are not the notebook's.
    assert nb.parse_config([], environ={"CMITEST_SAMPLE_DIR": "/x", "KAGGLE_USERNAME": "me"}).folds == 3


BAD_VALUES = [
    (["--folds", "1"], {}, r"--folds '1': out of range; --folds \(or CMI_FOLDS\) takes an integer >= 2"),
    (["--epochs", "0"], {}, r"--epochs '0': out of range.*integer >= 1"),
    ([], {"CMI_FOLDS": "abc"}, r"CMI_FOLDS='abc': not an integer"),
    (["--stage", "fit"], {}, r"--stage 'fit'.*one of all, train, infer"),
    (["--models", "lgbm,xgb"], {}, r"--models 'lgbm,xgb'.*one or more of lgbm, torch, keras"),
    (["--torch-precision", "fp8"], {}, r"--torch-precision 'fp8'.*auto, fp32, bf16, fp16"),
    (["--lgbm-modality-dropout", "1.5"], {}, r"--lgbm-modality-dropout '1.5'.*from 0 to 1"),
    (["--net-aux-weights", "1,2"], {}, r"--net-aux-weights '1,2'.*3 comma-separated numbers"),
    (["--demo-train-subjects", "2", "--folds", "3", "--demo"], {}, r"at least as many training subjects as folds"),
    (["--subject-assignment", "maybe"], {}, r"--subject-assignment 'maybe': not a boolean"),
]


@pytest.mark.parametrize("argv,env,message", BAD_VALUES, ids=[" ".join(a) or next(iter(e)) for a, e, _ in BAD_VALUES])
def test_a_bad_value_names_the_option_what_was_given_and_what_is_allowed(argv, env, message):
    with pytest.raises(nb.ConfigError, match=message) as err:
        nb.parse_config(argv, environ=env)
    assert "Fix:" in str(err.value)


def test_a_bad_config_cell_value_is_caught_too(tmp_path):
    """The Config cell edited to folds = 1: the same check as a flag, naming the cell's field."""
    import subprocess
    import sys
    from conftest import default_edited
    (tmp_path / "edited.py").write_text(default_edited(nb.Path(nb.__file__).read_text(), "folds", "1"))
    res = subprocess.run([sys.executable, "-c", "import edited; edited.parse_config([], environ={})"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "ConfigError: Config.folds = 1: out of range" in res.stderr, res.stderr[-1500:]


@pytest.mark.parametrize("args,env,shown", [
    (["--folds", "1"], {}, "--folds"), (["--epochs", "0"], {}, "--epochs"), ([], {"CMI_FOLDS": "abc"}, "CMI_FOLDS"),
    (["--n-folds", "5"], {}, "--folds"), ([], {"CMI_FOLD": "5"}, "CMI_FOLDS"), (["--stage", "fit"], {}, "--stage"),
    (["--out-dir", "a_file"], {}, "--out-dir")])
def test_the_script_stops_before_reading_or_writing_anything(args, env, shown, tmp_path):
    """As a user runs it: a message on stderr naming the option, a non-zero exit, and no folder made
    (no demo data generated, no fold file written)."""
    from conftest import run_script
    (tmp_path / "a_file").write_text("not a folder")
    res = run_script(*args, cwd=tmp_path, env_extra=env, timeout=120)
    assert res.returncode != 0 and "ConfigError:" in res.stderr and shown in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
