"""The README stays honest: its commands are the ones CI runs, every file it names is in the
repository, and it carries no dated results or one machine's folders (those belong in docs/)."""
import math
import re

import notebook as nb

from conftest import ROOT

README = (ROOT / "README.md").read_text()
# Outputs and inputs a run creates or a user brings, named in the README but never in the repository.
NOT_IN_REPO = ("working/", "data/", "demo_data/", "/kaggle/", "bundle/", ".venv")
COMPETITION_FILES = {"train.csv", "train_demographics.csv", "test.csv", "test_demographics.csv",
                     "train_sample.csv", "kaggle_evaluation/"}  # the competition's download (docs/DATA.md)
RUN_FILES = {"manifest.json", "dataset-metadata.json", "demo_config.json", "run_summary.json"}  # a run writes them (bundle, demo data)


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)


def test_the_two_setup_blocks_are_what_ci_runs():
    """Block 1 installs and runs the job, block 2 installs and runs the tests. .ci/run ends with block 2
    verbatim, and block 1's install is block 2's first step, so CI proves block 1's install too."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    blocks = [b.strip() for b in code_blocks(README)]
    run_job, run_tests = blocks[0], blocks[1]
    assert len(run_job.splitlines()) == 1 and len(run_tests.splitlines()) == 1, "one command per set-up block"
    assert ci[-1] == run_tests, "the last line of .ci/run must be the README's test command, verbatim"
    install, _, run = run_job.rpartition(" && ")
    assert run_tests.startswith(install + " && "), "both blocks must install the same way"
    assert run == ".venv/bin/python notebook.py"
    # Anything .ci/run does before the test command only sets test-suite variables.
    for line in ci[:-1]:
        assert line.startswith(("#", "set ", "cd ", "export CMITEST_")) or not line.strip(), line


def _named_paths(text: str, folders: bool = True) -> set[str]:
    """Link targets and code-quoted file names (and, with `folders`, code-quoted paths with a slash)."""
    links = set(re.findall(r"\]\(([^)#\s]+)\)", text))
    file_name = r"[\w.\-]+(/[\w.\-<>]*)*\.(py|md|txt|ipynb|json|csv|toml|cfg)"
    ticked = {t for t in re.findall(r"`([^`\s]+)`", text)
              if re.fullmatch(file_name, t) or (folders and re.fullmatch(r"[\w.\-]+/[\w.\-/]*", t))}
    return {p for p in links | ticked if not p.startswith(("http", *NOT_IN_REPO)) and "<" not in p
            and p not in COMPETITION_FILES | RUN_FILES}


def test_every_file_the_readme_names_exists_in_the_repository():
    named = _named_paths(README)
    assert {"docs/RESULTS.md", "docs/DECISIONS.md", "docs/DATA.md", "notebook.ipynb"} <= named
    missing = []
    for path in sorted(named):
        candidates = [ROOT / path, ROOT / "tests" / path]  # a bare test file name is under tests/
        if not any(c.exists() for c in candidates):
            missing.append(path)
    assert not missing, f"the README names files the repository does not have: {missing}"
    for doc in ("docs/RESULTS.md", "docs/DECISIONS.md", "docs/DATA.md"):
        for path in _named_paths((ROOT / doc).read_text(), folders=False):
            here = (ROOT / doc).parent / path
            assert (ROOT / path).exists() or here.exists() or (ROOT / "tests" / path).exists(), (doc, path)


def test_no_dates_or_machine_folders_outside_the_docs():
    for name in ("README.md", "notebook.py"):
        text = (ROOT / name).read_text()
        assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", text), f"{name}: dated results belong in docs/RESULTS.md"
        assert not re.findall(r"/tmp/\w", text), f"{name}: one machine's folders belong nowhere"


def test_the_first_screen_says_what_it_is_scores_costs_and_how_to_run():
    first = "\n".join(README.splitlines()[:45])
    assert "notebook" in first and "demo data" in first
    assert re.search(r"0\.8\d\d\d", first) and "not a leaderboard" in first
    assert re.search(r"hours?", first) and "T4" in first
    blocks = code_blocks(README)
    assert all(b in first for b in blocks[:2]), "both set-up commands on the first screen"


def test_the_readme_splits_the_full_profile_into_the_two_sessions_it_promises():
    """CMI_STOP_AFTER_FOLDS counts fold models over all members, so the README's number takes the
    full profile's 25 fold models (members x folds) in two sessions, neither of them empty."""
    text = (ROOT / "README.md").read_text()
    n = int(re.search(r"CMI_STOP_AFTER_FOLDS=(\d+)", text).group(1))
    cfg = nb.parse_config(["--profile", "full"], environ={})
    total = sum(m.seeds for m in nb.ensemble_members(cfg)) * cfg.folds
    assert f"{total} fold models ({len(nb.ensemble_members(cfg))} members x {cfg.folds} folds)" in text
    assert n < total <= 2 * n, f"{n} a session: {math.ceil(total / n)} sessions for {total} fold models"
