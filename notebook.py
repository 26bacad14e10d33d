# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # CMI – Detect Behavior with Sensor Data: one notebook from raw CSV to submission
#
# **On Kaggle** (Settings: accelerator **GPU T4 x2**, internet **off**), three journeys:
#
# 1. **Train.** Add Input → the competition; Save Version → Save & Run All. Everything lands in
#    `/kaggle/working`: `bundle/` (the models), `cv_report.json`, `oof/`, `plots/`. The full profile
#    (the Kaggle default) is estimated at 2.5-3 hours.
# 2. **Publish the bundle.** Nothing to upload: in the inference notebook, Add Input → Notebook
#    Output → this training notebook. Or download the output and run
#    `kaggle datasets create -p working/bundle` (first replace `YOUR_KAGGLE_USERNAME` in
#    `bundle/dataset-metadata.json` if the training log asked you to).
# 3. **Submit inference-only.** A new notebook from this same file, with the competition **and**
#    your bundle as inputs; in the settings cell below, uncomment `%env CMI_STAGE=infer` (and
#    `CMI_MODEL_PATH` only to pick another than the newest bundle that can serve). Nothing trains.
#    Submit from the Output tab.
#
# **Settings** go in the next cell as `%env CMI_<FIELD>=value` lines, one per Config field (section
# 1; `python notebook.py --help` lists them). A value set there, by a command-line flag, or by
# editing a default in the Config cell is never overridden by the profile; a misspelt name or a bad
# value stops the run at once, naming the option and what it takes.

# %% tags=["settings"]
# Settings: remove the "# " in front of the lines you want. Run from the command line,
# notebook.py ignores this cell (use flags there, e.g. --folds 5).
# Training:
# # %env CMI_FOLDS=5
# # %env CMI_EPOCHS=60
# # %env CMI_STOP_AFTER_FOLDS=13
# A second session finishing what the first one's time budget left (its output attached):
# # %env CMI_RESUME_FROM=/kaggle/input/<your training notebook>
# Inference-only, with your bundle attached (the newest that can serve is taken; CMI_MODEL_PATH picks another):
# # %env CMI_STAGE=infer
# # %env CMI_MODEL_PATH=/kaggle/input/cmi-bfrb-bundle

# %% [markdown]
# ## What this notebook does, top to bottom
#
# The model comes first (sections 1-15), the harness after it (16-21: command line, bundle, training
# in order, inference, serving, main).
#
# 1. **Config**: one dataclass; every field can be set as `--flag` or `CMI_<FIELD>` env var. The fixed
#    recipe (LightGBM parameters, the nets' optimiser and augmentations) sits right below it.
# 2. **Data**: the competition CSVs (or a generated demo dataset in the exact same schema),
#    loaded with polars as Float32 and validated with messages that name file, column and fix.
# 3. **Metric**: the competition score (binary F1 target/non-target + macro F1 over 8 targets and
#    `non_target`), and its two halves.
# 4. **Features**: canonical right hand (IMU axes, thermopiles and ToF grids mirrored), upside-down
#    wearers detected per subject and turned back, cleaned quaternions, gravity-free world-frame
#    acceleration, angular velocity, thermopile and time-of-flight summaries, Welch band powers.
# 5. **Models**: LightGBM on per-sequence aggregates; a PyTorch CNN-BiGRU-attention net (packed
#    sequences, orientation, starting-behaviour and per-step phase heads,
#    phase-weighted pooling, `--net-seeds` models per fold averaged) and its Keras 3 twin on the
#    per-timestep channels (optionally also the raw 8x8 ToF grids, through a per-frame 2D CNN), each
#    also as an IMU-only variant in the full profile. All are trained with modality dropout, so the
#    IMU-only half of the test set is served by the same models.
# 6. **Evaluation**: every model is scored twice on its out-of-fold predictions: as recorded, and
#    with the raw thermopile/ToF cells nulled exactly as in the IMU-only test sequences, through
#    the very code path `predict()` runs. Their mean is the expected leaderboard figure.
# 7. **Ensemble**: blend weights per view fitted on OOF (with a nested check), an optional
#    target/non-target scale kept only if it wins out of sample, and the serving plan that wins when
#    replayed on OOF, up to assigning a subject's sequences to the study's 102 slots with slot
#    probabilities from the nets' own heads or from two light LightGBM slot models.
# 8. **Bundle**: models + manifest in `OUT/bundle`, every file at its top level with its size and
#    SHA-256, loadable under other Keras/torch/LightGBM versions than it was trained with.
# 9. **Inference**: `predict(sequence, demographics)` loads the bundle lazily on its first call and
#    returns one of the 18 gesture names, served by `kaggle_evaluation` or a built-in gateway. An ensemble
#    member that fails is left out of the blend and counted; a bundle that cannot serve at all stops
#    the run with its path and the fix, never a silent submission of fallback answers.
#
# Speed on a 2-core CPU without GPU: `quick` (the local default) runs the whole demo end to end in
# about 4-5 min and then serves a sequence in tens of milliseconds; `smoke` runs in seconds and is
# what the tests use; `full` (the Kaggle default) is estimated at 2.5-3 h on a Kaggle T4. Figures:
# docs/RESULTS.md; why each default: docs/DECISIONS.md.

# %%
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import polars as pl

LOG = logging.getLogger("cmi")

# %% [markdown]
# ## 1. Config
#
# One dataclass. Values come, in increasing priority, from the field default, the chosen profile,
# `CMI_<FIELD>` environment variables (a Kaggle notebook has no argv) and command-line flags.
# A field left at `None` means "take it from the profile".

# %%
KAGGLE_DATA_DIR = Path("/kaggle/input/cmi-detect-behavior-with-sensor-data")
KAGGLE_WORKING = Path("/kaggle/working")
# A Kaggle notebook session is killed at 9 hours with its output lost. Training keeps 1 hour back:
# the slot models, the plan replay, the bundle's proof, plots and serving the public test take
# minutes on the full profile (docs/RESULTS.md, section 6), saving /kaggle/working a few more, and
# the rest absorbs a fold that runs longer than projected.
KAGGLE_TIME_BUDGET_HOURS = 9.0 - 1.0


# The 18 gestures, spelled exactly as the evaluation expects.
TARGET_GESTURES = [
    "Above ear - pull hair", "Cheek - pinch skin", "Eyebrow - pull hair", "Eyelash - pull hair",
    "Forehead - pull hairline", "Forehead - scratch", "Neck - pinch skin", "Neck - scratch",
]
NON_TARGET_GESTURES = [
    "Write name on leg", "Wave hello", "Glasses on/off", "Text on phone", "Write name in air",
    "Feel around in tray and pull out an object", "Scratch knee/leg skin",
    "Pull air toward your face", "Drink from bottle/cup", "Pinch knee/leg skin",
]
GESTURES = TARGET_GESTURES + NON_TARGET_GESTURES

MODEL_FAMILIES = ("lgbm", "torch", "keras")
NET_VARIANTS = ("all", "imu")  # --net-variants: what each net reads (member name suffix "" / "_imu")


# What a field's value changes (`affects`): the saved folds of these member kinds (a change retrains
# just them), or "bundle", which members there are. A field says nothing by default and is then read
# by its name: `lgbm_*` affects LightGBM, `torch_*` the PyTorch net, `net_*` both nets,
# and any other field every member and the bundle, so a new setting can never resume a stale fold.
# A field that changes no trained model (paths, threads, logging, serving and demo settings: the
# data fingerprint covers the data) opts out with `affects=NOTHING_TRAINED`.
MEMBER_KINDS = ("lgbm", "torch", "keras")
NETS = ("torch", "keras")
BUNDLE = ("bundle",)
NOTHING_TRAINED: tuple[str, ...] = ()
AFFECTED_BY_PREFIX = {"lgbm_": ("lgbm",), "torch_": ("torch",), "net_": NETS}


def _doc(text: str, default: Any = None, *, choices: Iterable[str] = (), many: bool = False,
         low: float | None = None, high: float | None = None, items: tuple[str, int | None] | None = None,
         affects: tuple[str, ...] | None = None) -> Any:
    """A Config field: its doc, what values it allows (checked by parse_config before anything runs):
    `choices` (`many`: comma-separated, several of them), a number in [`low`, `high`], or `items`, a
    comma-separated list of (type, count); and what it `affects` (above: None reads the name)."""
    return field(default=default, metadata={"doc": text, "choices": tuple(choices), "many": many, "low": low,
                                            "high": high, "items": items, "affects": affects})


def affected(f: dataclasses.Field) -> tuple[str, ...]:
    """The member kinds (and "bundle") whose saved folds a field's value changes: its `affects`, else
    what its name's prefix says, else everything."""
    if f.metadata.get("affects") is not None:
        return f.metadata["affects"]
    prefix = next((p for p in AFFECTED_BY_PREFIX if f.name.startswith(p)), None)
    return AFFECTED_BY_PREFIX[prefix] if prefix else (*MEMBER_KINDS, *BUNDLE)


def _edited_fields_kept(cls: type) -> type:
    """A default edited in the Config cell as a plain `folds: int | None = 4` drops its _doc(): the
    field keeps the value, without its range check, and retrains what its name says (affected())."""
    for f in dataclasses.fields(cls):
        if "doc" not in f.metadata:
            f.metadata = types.MappingProxyType({
                "doc": "(edited in the Config cell without _doc(): no range check)", "choices": (), "many": False,
                "low": None, "high": None, "items": None, "affects": None})
    return cls


@_edited_fields_kept
@dataclass
class Config:
    # --- where things are
    data_dir: str | None = _doc("folder with train.csv, train_demographics.csv, test.csv, "
                                "test_demographics.csv; default: the Kaggle competition folder "
                                "when it exists, else a demo dataset generated into ./demo_data",
                                affects=NOTHING_TRAINED)
    demo: bool = _doc("force the generated demo dataset even when real data exists", False,
                      affects=NOTHING_TRAINED)
    out_dir: str | None = _doc("output folder; default /kaggle/working on Kaggle, else ./working",
                               affects=NOTHING_TRAINED)
    model_path: str | None = _doc("bundle folder, or a folder containing one (a mounted Kaggle "
                                  "dataset: the newest bundle there that can serve); default OUT/bundle, "
                                  "else (on Kaggle) the newest valid bundle under /kaggle/input",
                                  affects=NOTHING_TRAINED)
    # --- what to run
    profile: str | None = _doc("smoke (seconds, for tests) | quick (minutes on a 2-core CPU, the "
                               "local default) | full (competition settings, the Kaggle default)",
                               choices=("smoke", "quick", "full"), affects=NOTHING_TRAINED)
    stage: str = _doc("all = train then serve; train = train only; infer = load a bundle and serve",
                      "all", choices=("all", "train", "infer"), affects=NOTHING_TRAINED)
    models: tuple[str, ...] | None = _doc("comma-separated model families to train: lgbm, torch, keras",
                              choices=MODEL_FAMILIES, many=True, affects=BUNDLE)
    folds: int | None = _doc("number of CV folds (grouped by subject, stratified by gesture)", low=2)
    epochs: int | None = _doc("training epochs for the neural nets", low=1, affects=NETS)
    seed: int = _doc("global random seed (folds, demo data, models, augmentation)", 42, low=0)
    sample_rate_hz: float = _doc("sampling rate used as the time base of every derivative and "
                                 "of the Welch bands", 10.0, low=0.5, high=1000.0)
    time_budget_hours: float | None = _doc("train no fold that would end past this many hours after the "
                                           "start (projected from the folds and epochs already timed): the "
                                           "members with every fold are blended, bundled and served, the rest "
                                           "resume in the next session (--resume-from); default on Kaggle "
                                           "8 (its 9-hour limit less 1 hour for what follows training and "
                                           "for saving the output), elsewhere 0 = no limit", low=0.0,
                                           affects=NOTHING_TRAINED)
    stop_after_folds: int = _doc("if > 0, train at most this many new fold models in this session, "
                                 "counted over all members (a fold's seeds count one each); the run "
                                 "then ends as under the time budget", 0, low=0, affects=NOTHING_TRAINED)
    workers: int | None = _doc("fold-training processes, each taking (member, fold) tasks as they come "
                               "on a GPU of its own (CUDA_VISIBLE_DEVICES), else on a 1/N share of the CPU "
                               "threads; the run then reads every fold back from the bundle, so OOF and "
                               "bundle are the one-process run's; default: the GPUs on Kaggle (2 on GPU "
                               "T4 x2), 1 elsewhere", low=1, affects=NOTHING_TRAINED)
    worker_of: str = _doc("(internal) the task file a --workers process trains from, set by the run", "",
                          affects=NOTHING_TRAINED)
    resume_from: str | None = _doc("an earlier run's output folder or bundle (on Kaggle, that notebook's "
                                   "output attached under /kaggle/input): its finished folds are copied "
                                   "into OUT/bundle and not trained again", affects=NOTHING_TRAINED)
    # --- demo data
    demo_train_subjects: int | None = _doc("demo dataset: number of training subjects", low=2,
                                           affects=NOTHING_TRAINED)
    demo_test_subjects: int | None = _doc("demo dataset: number of test subjects", low=1, affects=NOTHING_TRAINED)
    demo_pairs_per_subject: int | None = _doc("demo dataset: (orientation, gesture) pairs per "
                                              "subject, at most 51 (x2 starting behaviours)", low=1, high=51,
                                              affects=NOTHING_TRAINED)
    # --- features
    upside_down_fix: bool = _doc("detect subjects who wear the device upside down (their sequences' "
                                 "gravity, weighed against the four postures, decisively says turned; at "
                                 "inference from the subject's calls so far, so answers depend on the call "
                                 "order) and turn their rows back before every model", True)
    # --- LightGBM
    lgbm_learning_rate: float | None = _doc("LightGBM learning rate", low=1e-5, high=1.0)
    lgbm_rounds: int | None = _doc("LightGBM maximum boosting rounds (early stopping picks fewer)", low=1)
    lgbm_max_bin: int | None = _doc("LightGBM histogram bins per feature (fewer = faster)", low=2)
    lgbm_class_weight: str = _doc("none | balanced: per-class sample weights (docs/DECISIONS.md)", "none",
                                  choices=("none", "balanced"))
    lgbm_threads: int = _doc("LightGBM threads; 0 = auto (1 below 10k training rows, where "
                             "thread overhead outweighs the work; else all cores)", 0, low=0,
                             affects=NOTHING_TRAINED)
    lgbm_modality_dropout: float = _doc("probability that a training sequence gets an extra copy with "
                                        "thm/tof blanked as in the IMU-only test sequences", 1.0,
                                        low=0.0, high=1.0)
    # --- the nets (both frameworks)
    net_conv: tuple[int, ...] | None = _doc("output channels of the residual Conv1D blocks, comma-separated "
                                "(each block halves the time axis)", items=("int", None))
    net_hidden: int | None = _doc("BiGRU hidden size per direction", low=1)
    net_aux_heads: bool = _doc("train the auxiliary heads: per sequence the body orientation (4) and the "
                               "starting behaviour (2), per step the gesture phase", True)
    net_aux_weights: tuple[float, ...] = _doc("fixed weights of the orientation, behaviour and phase losses, "
                                              "added to the gesture heads' loss (never uncertainty-weighted: a "
                                              "learned weight favours the easy per-step phase task over the "
                                              "gesture)", (0.2, 0.2, 0.2), items=("float", 3))
    net_patience: int = _doc("early stopping patience, epochs, on the validation metric; 0 = train "
                             "every epoch and keep the last (EMA) weights, so the fold that produces "
                             "the OOF never picks its own epoch", 0, low=0)
    net_seeds: int | None = _doc("models per fold of every net member, each with its own seed, averaged "
                                 "(one member in the blend, a file per seed in the bundle; more seeds "
                                 "resume from the ones already trained)", low=1, affects=BUNDLE)
    net_variants: tuple[str, ...] | None = _doc("what each net reads: all (every channel, with modality "
                                                "dropout) and/or imu (IMU channels only); comma-separated, "
                                                "each its own ensemble member (<member>, <member>_imu) whose "
                                                "blend weight per CV view decides",
                                                choices=NET_VARIANTS, many=True, affects=(*NETS, *BUNDLE))
    max_len: int = _doc("nets read the last N steps of a sequence (the gesture is at the end); 0 = all", 0,
                        low=0, affects=NETS)
    tof_grid: bool = _doc("nets also read the five raw 8x8 ToF grids per step through a small per-frame "
                          "2D convolution (beside the per-sensor ToF statistics; the IMU-only variant "
                          "never reads them)", False, affects=NETS)
    # --- PyTorch only
    torch_phase_pool: bool = _doc("pool the sequence also weighted by the phase head (gesture steps and "
                                  "transition steps apart) beside the attention pool", True)
    torch_precision: str = _doc("auto (fp16 autocast + GradScaler on CUDA, fp32 on CPU) | fp32 | "
                                "bf16 | fp16", "auto", choices=("auto", "fp32", "bf16", "fp16"))
    torch_threads: int = _doc("torch CPU threads; 0 = torch's default", 0, low=0, affects=NOTHING_TRAINED)
    # --- inference
    subject_assignment: bool = _doc("allow the serving rules that assign a subject's sequences so far to "
                                    "gestures or to the study's slots (served only when their replayed OOF "
                                    "wins); false = a per-sequence decision", True, affects=NOTHING_TRAINED)
    log_level: str = _doc("logging level", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                          affects=NOTHING_TRAINED)


# The fixed recipe: the public LightGBM and CNN-BiGRU baselines' values, not options, because no run here
# ever measured another (docs/DECISIONS.md, "The fixed recipe"). Each is part of the fingerprint of the
# folds that read it (recipe_of), so an edit here retrains them.
LGBM_PARAMS = dict(num_leaves=31, min_data_in_leaf=10, feature_fraction=0.5, bagging_fraction=0.8, bagging_freq=1,
                   lambda_l2=1.0)
LGBM_EARLY_STOPPING = 50  # rounds without a better validation loss (both views)
NET_RECIPE = dict(dropout=0.3,           # conv blocks and the dense trunk
                  lr=2e-3,               # AdamW peak, after linear warmup, then cosine to zero
                  warmup_epochs=1,
                  weight_decay=1e-2,     # AdamW (not on the torch net's loss weights)
                  batch_size=64,         # sequences, length-bucketed
                  label_smoothing=0.1,   # of the 18-class targets
                  modality_dropout=0.5,  # a training sequence loses thm/tof, as an IMU-only test sequence
                  ema=0.99,              # torch: EMA decay of the weights evaluated and saved
                  max_bad_steps=3)       # torch: non-finite losses before a fold falls back to fp32
# How often each augmentation is applied (per sequence; mixup per batch).
AUGMENTATIONS = {"time_stretch": 0.3, "rotation": 0.5, "jitter": 0.5, "time_mask": 0.3, "feature_mask": 0.3,
                 "mixup": 0.3}


def recipe_of(kind: str | None) -> dict[str, Any]:
    """The fixed recipe a member kind reads (None: every kind's), for its fingerprint."""
    nets = {**NET_RECIPE, **AUGMENTATIONS}
    recipes = {"lgbm": {**LGBM_PARAMS, "early_stopping": LGBM_EARLY_STOPPING}, "torch": nets, "keras": nets}
    return recipes.get(kind, {}) if kind else recipes


def config_from(saved: dict[str, Any]) -> Config:
    """The Config a model was trained with, from its saved dict (fields this code no longer has
    are ignored; fields it added since keep their defaults)."""
    names = {f.name for f in dataclasses.fields(Config)}
    return dataclasses.replace(Config(), **{k: tuple(v) if isinstance(v, list) else v  # JSON keeps a tuple as a list
                                            for k, v in saved.items() if k in names})


def net_variant(cfg: Config) -> str:
    """The one --net-variants choice a net member's config names (all or imu)."""
    if len(cfg.net_variants) != 1:
        raise ValueError(f"a net member reads one variant, not {cfg.net_variants}")
    return cfg.net_variants[0]


PATH_FIELDS = ("data_dir", "out_dir", "model_path", "resume_from")
# Where and how a run is scheduled, never what a model is: left out of what a model file records.
RUN_FIELDS = (*PATH_FIELDS, "stage", "time_budget_hours", "stop_after_folds", "workers", "worker_of")


def member_name(family: str, cfg: Config) -> str:
    """The ensemble member a net family trains under `cfg` (one --net-variants)."""
    return family + ("_imu" if net_variant(cfg) == "imu" else "")


def member_family(member: str) -> str:
    """lgbm, torch or keras: the family an ensemble member belongs to."""
    return member.removesuffix("_imu")


def member_variant(member: str) -> str:
    """The --net-variants choice an ensemble member was trained under (all or imu)."""
    return "imu" if member.endswith("_imu") else "all"


def on_kaggle() -> bool:
    return KAGGLE_WORKING.exists() or "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def is_competition_rerun() -> bool:
    return bool(os.environ.get("KAGGLE_IS_COMPETITION_RERUN"))


def feature_cache_dir(cfg: Config) -> Path:
    """Locally under the out folder; on Kaggle a temporary folder, so the cache never becomes part of
    the notebook's saved output in /kaggle/working."""
    return Path(tempfile.gettempdir()) / "cmi-feature-cache" if on_kaggle() else Path(cfg.out_dir) / "cache"


def as_stored(q: np.ndarray) -> np.ndarray:
    """Quaternions with the sign the device stores (rot_w >= 0; q and -q are the same rotation)."""
    return np.where(q[:, :1] < 0, -q, q)


# %% [markdown]
# ## 2. Competition constants
#
# The gesture names are in section 1; column lists follow train.csv.

# %%
GESTURE_INDEX = {g: i for i, g in enumerate(GESTURES)}
TARGET_MASK = np.array([g in TARGET_GESTURES for g in GESTURES])
# 18 -> the metric's 9 classes: the targets keep their index (alphabetical), every other gesture is
# the 9th, `non_target`
TARGET_INDEX_9 = np.array([GESTURE_INDEX[g] if g in TARGET_GESTURES else len(TARGET_GESTURES) for g in GESTURES])

# The two CV views of every model (section 9): the fold as recorded, and with thm/ToF nulled as in
# the IMU-only half of the test set.
VIEWS = ("full", "imu_only")

ORIENTATIONS = ["Seated Straight", "Seated Lean Non Dom - FACE DOWN", "Lie on Back",
                "Lie on Side - Non Dominant"]
ONLY_SEATED_STRAIGHT = {"Drink from bottle/cup", "Feel around in tray and pull out an object",
                        "Glasses on/off"}
ONLY_SEATED_LEAN = {"Pinch knee/leg skin", "Scratch knee/leg skin", "Write name on leg"}
NEVER_SEATED_LEAN = {"Pull air toward your face", "Wave hello", "Write name in air"}
START_BEHAVIORS = ["Relaxes and moves hand to target location", "Moves hand to target location"]
# Every value a training label column may hold (train.csv, per row); validate_train checks them.
TRAIN_LABELS = {"gesture": GESTURES, "sequence_type": ["Target", "Non-Target"], "orientation": ORIENTATIONS,
                "behavior": [*START_BEHAVIORS, "Hand at target location", "Performs gesture"],
                "phase": ["Transition", "Gesture"]}

ACC_COLS = ["acc_x", "acc_y", "acc_z"]
ROT_COLS = ["rot_w", "rot_x", "rot_y", "rot_z"]
THM_COLS = [f"thm_{i}" for i in range(1, 6)]
TOF_COLS = [f"tof_{s}_v{p}" for s in range(1, 6) for p in range(64)]
SENSOR_COLS = ACC_COLS + ROT_COLS + THM_COLS + TOF_COLS
TEST_COLS = ["row_id", "sequence_id", "sequence_counter", "subject"] + SENSOR_COLS
TRAIN_COLS = (["row_id", "sequence_type", "sequence_id", "sequence_counter", "subject",
               "orientation", "behavior", "phase", "gesture"] + SENSOR_COLS)
DEMO_COLS = ["subject", "adult_child", "age", "sex", "handedness", "height_cm",
             "shoulder_to_wrist_cm", "elbow_to_wrist_cm"]
# Typical adult right-hander, used when a subject's demographics are missing.
DEFAULT_DEMOGRAPHICS = dict(adult_child=1, age=22.0, sex=1, handedness=1, height_cm=168.0,
                            shoulder_to_wrist_cm=52.0, elbow_to_wrist_cm=25.0)
# What a demographics cell may hold (the real files: age 10-53, height 135-190.5, shoulder to wrist
# 41-71, elbow to wrist 18-44 cm); anything else is unreadable and gets the default above.
DEMOGRAPHIC_RANGES = dict(adult_child=(0, 1), age=(5, 100), sex=(0, 1), handedness=(0, 1), height_cm=(90, 230),
                          shoulder_to_wrist_cm=(20, 100), elbow_to_wrist_cm=(10, 60))
DEMOGRAPHIC_CODES = ("adult_child", "sex", "handedness")  # 0 or 1, nothing between
GRAVITY = 9.81
UPSIDE_DOWN = "upside_down"  # per-subject flag next to the demographics: the device was worn upside down


def allowed_pairs() -> list[tuple[str, str]]:
    """The (orientation, gesture) pairs of the study design: 51 of them."""
    pairs = []
    for o in ORIENTATIONS:
        lean = o.startswith("Seated Lean")
        for g in GESTURES:
            if g in ONLY_SEATED_STRAIGHT and o != "Seated Straight":
                continue
            if g in ONLY_SEATED_LEAN and not lean:
                continue
            if g in NEVER_SEATED_LEAN and lean:
                continue
            pairs.append((o, g))
    return pairs


# The study's slots: every subject performs each allowed (orientation, gesture) pair once from each
# starting behaviour, 102 in all (the per-subject assignment of 15.1).
SLOTS = [(o, g, b) for o, g in allowed_pairs() for b in START_BEHAVIORS]
SLOT_GESTURE = np.array([GESTURE_INDEX[g] for _, g, _ in SLOTS])
SLOT_ORIENTATION = np.array([ORIENTATIONS.index(o) for o, _, _ in SLOTS])
SLOT_BEHAVIOR = np.array([START_BEHAVIORS.index(b) for _, _, b in SLOTS])


# %% [markdown]
# ## 3. Small utilities
#
# Label positions (unknown text never stops a run), and atomic writes: a Kaggle session can die at
# any moment; every artefact is written to a temporary file and renamed, so a reader sees either
# the old complete file or the new complete one.

# %%
def label_index(values: Iterable[Any], names: list[str], strict: str = "") -> np.ndarray:
    """Position of each value among `names`; text that is not one of them (a typo, a null) counts as
    the first, or, with `strict` (what the values are), is a ValueError naming it."""
    values, pos = list(values), {n: i for i, n in enumerate(names)}
    if strict and not set(values) <= pos.keys():
        raise ValueError(f"{strict} outside the {len(names)} names: {sorted(set(values) - pos.keys(), key=str)[:3]}")
    return np.array([pos.get(v, 0) for v in values], dtype=np.int64)


class DataError(ValueError):
    """Malformed or missing input data; the message names the file, the column and the fix."""


class BundleError(RuntimeError):
    """The bundle cannot serve (or one member of it cannot); the message names the path and the fix."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # keep the suffix: np.save adds .npy
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def short_hash(*parts: Any, n: int = 16) -> str:
    """A short stable hash of JSON-able parts (keys sorted): fingerprints and cache keys."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:n]


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default)))


def progress(iterable: Iterable, desc: str, total: int | None = None, **kw: Any) -> Iterable:
    """A tqdm bar in a terminal or a notebook (widget); in a plain log file (a script's output
    redirected, CI) no bar, whose carriage returns would garble it: the per-epoch and per-fold
    lines printed with say() tell the progress there."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional at inference time
        return iterable
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return tqdm(iterable, desc=desc, total=total, mininterval=0.5, leave=False, disable=not interactive, **kw)


def say(message: str) -> None:
    """Print a progress line without breaking an active tqdm bar."""
    try:
        from tqdm.auto import tqdm
        tqdm.write(message)
    except ImportError:
        print(message)


class Stopwatch:
    """Wall time per named stage, for the run summary: `with watch("load"): ...` adds to seconds["load"]."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# What native libraries print at start-up straight to file descriptor 2, past Python's logging.
NATIVE_START_UP_NOTICES = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
                           "cpu_feature_guard", "To enable the following instructions",
                           "rebuild TensorFlow with the appropriate compiler flags")


@contextlib.contextmanager
def native_notices_hidden() -> Iterator[None]:
    """Hide the start-up notices a native library prints to file descriptor 2 (TensorFlow's C++
    core logs through absl before Python can configure anything): the descriptor is captured
    meanwhile, and every other line is passed on. --log-level DEBUG shows everything."""
    if LOG.isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line.strip() and not any(n in line for n in NATIVE_START_UP_NOTICES):
                    print(line, file=sys.stderr)


def library_versions() -> dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "polars", "scipy", "scikit-learn", "lightgbm", "torch", "tensorflow", "keras"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def set_seed(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % (2**32))


# %% [markdown]
# ### 3.1 Sensor geometry
#
# Quaternion algebra (w, x, y, z; device -> world) and the two ways a wearer changes what the
# device reports: a left hand mirrors it, a device worn upside down turns it by 180 degrees about
# the axis normal to the watch face. The demo generator, the features and the nets use them.

# %%
def quat_from_euler(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.stack([cr * cp * cy + sr * sp * sy, sr * cp * cy - cr * sp * sy,
                     cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy], axis=-1)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw],
                    axis=-1)


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    return q * np.array([1.0, -1.0, -1.0, -1.0], dtype=q.dtype)


def quat_rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate vectors v (device frame) by unit quaternions q (device -> world), row by row. Not scipy's
    Rotation.apply, which refuses a whole batch for one NaN or zero quaternion (ValueError); here such
    a row comes out NaN and the others are exact (tests/test_features.py compares the two)."""
    w, u = q[..., :1], q[..., 1:]
    t = 2.0 * np.cross(u, v)
    return v + w * t + np.cross(u, t)


def _mirror_tables() -> tuple[np.ndarray, np.ndarray]:
    """Column permutation and signs that reflect the lateral (x) axis on a SENSOR_COLS matrix:
    acc (-x, y, z); quaternion (w, x, -y, -z) (the same reflection seen through a rotation);
    thermopiles and ToF sensors 3 and 5 sit mirror-wise and swap places, and every 8x8 ToF grid
    is flipped left to right. The flip assumes a grid's columns run along the lateral axis: the
    competition does not document the pixel layout, and the 15 sample sequences cannot settle it."""
    idx = {c: i for i, c in enumerate(SENSOR_COLS)}
    swap = {"thm_3": "thm_5", "thm_5": "thm_3"}
    for s in range(1, 6):
        other = {3: 5, 5: 3}.get(s, s)
        for p in range(64):
            swap[f"tof_{s}_v{p}"] = f"tof_{other}_v{p - p % 8 + 7 - p % 8}"
    perm = np.array([idx[swap.get(c, c)] for c in SENSOR_COLS])
    sign = np.array([-1.0 if c in ("acc_x", "rot_y", "rot_z") else 1.0 for c in SENSOR_COLS], np.float32)
    return perm, sign


MIRROR_PERM, MIRROR_SIGN = _mirror_tables()


def mirror_sensors(x: np.ndarray) -> np.ndarray:
    """Canonical right hand: a left-hand SENSOR_COLS matrix (n, 332) mirrored (and back: an involution)."""
    return x[:, MIRROR_PERM] * MIRROR_SIGN


def turn_upside_down(x: np.ndarray) -> np.ndarray:
    """A SENSOR_COLS matrix (n, 332) as the device worn upside down gives it (and back: an involution):
    turned 180 degrees about the axis normal to the watch face, so acc x and y change sign, the
    orientation quaternion is composed with that turn (and given the sign the device stores) and each
    8x8 ToF grid is rotated by 180 degrees."""
    x = x.copy()
    x[:, 0:2] *= -1
    w, qx, qy, qz = (x[:, 3 + i].copy() for i in range(4))  # q * (0, 0, 0, 1)
    x[:, 3], x[:, 4], x[:, 5], x[:, 6] = -qz, qy, -qx, w
    x[:, 3:7] = as_stored(x[:, 3:7])
    tof = x[:, 12:].reshape(len(x), 5, 64)
    x[:, 12:] = tof[:, :, ::-1].reshape(len(x), 320)
    return x


# %% [markdown]
# ## 4. Demo dataset
#
# Without competition data the notebook generates one in the exact competition schema, so every
# step runs anywhere. It is built to be as hard as the real data in the ways a model could exploit:
#
# - **Study design**: each subject performs each allowed (orientation, gesture) pair once per
#   starting behaviour; the sequence runs through a still start or a relaxing movement, the move to
#   the target, a pause there ("Hand at target location"), then about 30 steps of the gesture. No
#   duration depends on the gesture, so length alone predicts nothing (`bench/demo_references.py`).
# - **Confusable gestures move alike**: the four hair pulls are one pulling motion at neighbouring
#   places on the head, cheek and neck pinch one pinch, forehead and neck scratch one scratch. What
#   separates them is a few degrees of hand pose, less than how differently subjects wear the device
#   and reach their head, and what the sensors face there. Glasses, pulling air and drinking also
#   reach the head.
# - **The surface decides what the ToF and thermopiles see**: at each target, each of the five
#   sensors faces hair (sparse, noisy returns, ~30 C), skin (dense, smooth, ~34 C), clothing, a phone,
#   a tray, a cup or nothing; which zones of the 8x8 grid return follows the geometry of the place.
# - **People differ**: wear rotation of the device on the wrist, reach habits, tempo, amplitude, the
#   direction in which they perform a motion, left-handed wearers (mirrored), and a few training
#   subjects who wore the device upside down (as two of the 81 real ones did).
# - **Posture** tilts gravity (seated, leaning, lying on back or side).

# %%
DEMO_STAMP = "demo_config.json"  # the generator's mark on a folder it wrote
COMPETITION_FILES = ("train.csv", "train_demographics.csv", "test.csv", "test_demographics.csv")
DEMO_VERSION = 3  # part of the demo settings: a demo folder from another generator is regenerated

# What each sensor faces at a target: (ToF answer rate, distance noise in mm, temperature in C or
# None for the ambient temperature).
_SURFACES = {"hair": (0.35, 18.0, 30.5), "skin": (0.85, 5.0, 34.0), "clothing": (0.9, 4.0, 29.5),
             "phone": (0.7, 6.0, 27.0), "tray": (0.55, 10.0, None), "object": (0.6, 8.0, 21.0)}
# Motions: frequency range (Hz), rotation amplitude (degrees), translation amplitude (cm), shape.
_MOTIONS = {"pull": ((0.5, 0.9), 12.0, 4.0, "pulse"), "pinch": ((0.8, 1.3), 5.0, 0.6, "osc"),
            "scratch": ((2.2, 3.4), 8.0, 1.0, "osc"), "leg_write": ((0.9, 1.6), 10.0, 3.0, "write"),
            "leg_scratch": ((2.0, 3.2), 7.0, 1.0, "osc"), "leg_pinch": ((0.8, 1.3), 4.0, 0.6, "osc"),
            "wave": ((1.2, 2.0), 35.0, 8.0, "osc"), "air_write": ((0.8, 1.4), 20.0, 10.0, "write"),
            "draw": ((0.4, 0.7), 15.0, 12.0, "pulse"), "lift": ((0.3, 0.5), 25.0, 6.0, "lift"),
            "tilt": ((0.25, 0.4), 40.0, 3.0, "lift"), "tap": ((1.6, 2.6), 3.0, 0.4, "taps"),
            "feel": ((0.6, 1.0), 15.0, 5.0, "write")}
# Per gesture: hand pose at the target (roll, pitch, yaw in degrees, canonical right hand), motion,
# and {sensor: (surface, distance in mm)} for the sensors that face something there.
_DEMO_GESTURES: dict[str, dict[str, Any]] = {
    "Above ear - pull hair": dict(pose=(68, 14, 47), motion="pull", view={2: ("hair", 45), 3: ("hair", 35), 5: ("skin", 90)}),
    "Forehead - pull hairline": dict(pose=(61, 25, 39), motion="pull", view={1: ("hair", 50), 4: ("hair", 40), 5: ("skin", 75)}),
    "Eyebrow - pull hair": dict(pose=(63, 21, 42), motion="pull", view={1: ("skin", 40), 4: ("hair", 32), 5: ("skin", 65)}),
    "Eyelash - pull hair": dict(pose=(64, 18, 44), motion="pull", view={1: ("skin", 32), 4: ("skin", 28), 5: ("skin", 60)}),
    "Cheek - pinch skin": dict(pose=(67, 8, 45), motion="pinch", view={1: ("skin", 28), 2: ("skin", 38), 4: ("skin", 65)}),
    "Neck - pinch skin": dict(pose=(72, -3, 48), motion="pinch", view={2: ("skin", 28), 5: ("skin", 34), 3: ("clothing", 85)}),
    "Forehead - scratch": dict(pose=(60, 27, 38), motion="scratch", view={1: ("skin", 42), 4: ("skin", 36), 5: ("hair", 70)}),
    "Neck - scratch": dict(pose=(72, -5, 47), motion="scratch", view={2: ("skin", 32), 5: ("skin", 30), 3: ("clothing", 75)}),
    "Glasses on/off": dict(pose=(63, 23, 40), motion="lift", view={1: ("object", 22), 4: ("skin", 55)}),
    "Pull air toward your face": dict(pose=(58, 16, 30), motion="draw", view={}),
    "Drink from bottle/cup": dict(pose=(52, 33, 18), motion="tilt", view={1: ("object", 14), 2: ("object", 20), 4: ("skin", 70)}),
    "Write name on leg": dict(pose=(5, -55, 0), motion="leg_write", view={1: ("clothing", 16), 2: ("clothing", 22), 3: ("clothing", 30)}),
    "Scratch knee/leg skin": dict(pose=(8, -57, 4), motion="leg_scratch", view={1: ("clothing", 13), 2: ("clothing", 18), 3: ("skin", 26)}),
    "Pinch knee/leg skin": dict(pose=(7, -56, 2), motion="leg_pinch", view={1: ("clothing", 11), 2: ("skin", 16), 3: ("clothing", 26)}),
    "Wave hello": dict(pose=(85, 10, -20), motion="wave", view={}),
    "Write name in air": dict(pose=(50, 5, -10), motion="air_write", view={}),
    "Text on phone": dict(pose=(15, 25, 0), motion="tap", view={3: ("phone", 110), 1: ("phone", 140)}),
    "Feel around in tray and pull out an object": dict(pose=(-10, -35, 20), motion="feel",
                                                       view={3: ("tray", 90), 2: ("tray", 120), 1: ("object", 45)}),
}
# At rest the hand lies in the lap: the lower sensors see the legs.
_REST_VIEW = {1: ("clothing", 90), 2: ("clothing", 110), 3: ("clothing", 120)}

# Gravity as the real device reports it (device frame as recorded; g = acc / 9.81), read from plots
# of the full training set and checked against train_sample.csv (shared/cmi-sample/GRAVITY.md; the
# numbers are copied here, so the notebook never reads that folder). The generator turns the body so
# that the canonical hand pose of each gesture meets these directions: lying down moves gravity on x
# as far as a device worn upside down does, which is exactly what the upside-down check must not
# mistake (7.1).
# Per (gesture, orientation): median acc (m/s^2) over the last 30 rows (the gesture), GRAVITY.md 1.
_REAL_GESTURE_ACC = {
    ("Cheek - pinch skin", "Seated Straight"): (0.0, 9.2, -2.5),
    ("Eyelash - pull hair", "Seated Straight"): (-1.1, 9.2, -2.9),
    ("Feel around in tray and pull out an object", "Seated Straight"): (5.2, 0.3, -8.9),
    ("Forehead - pull hairline", "Seated Straight"): (-1.3, 8.9, -5.1),
    ("Neck - pinch skin", "Seated Straight"): (-1.2, 9.0, -4.2),
    ("Neck - scratch", "Seated Straight"): (0.2, 8.9, -3.0),
    ("Text on phone", "Seated Straight"): (8.4, 3.7, 3.6),
    ("Wave hello", "Seated Straight"): (0.8, 8.3, -2.8),
    ("Write name in air", "Seated Straight"): (0.7, 8.9, -4.5),
    ("Cheek - pinch skin", "Seated Lean Non Dom - FACE DOWN"): (6.6, 7.2, -1.4),
    ("Eyelash - pull hair", "Seated Lean Non Dom - FACE DOWN"): (6.5, 7.3, 2.3),
    ("Forehead - pull hairline", "Seated Lean Non Dom - FACE DOWN"): (6.3, 7.3, 3.4),
    ("Neck - pinch skin", "Seated Lean Non Dom - FACE DOWN"): (4.5, 7.6, -0.4),
    ("Neck - scratch", "Seated Lean Non Dom - FACE DOWN"): (0.7, 7.9, 0.0),
    ("Text on phone", "Seated Lean Non Dom - FACE DOWN"): (8.3, -0.5, 5.2),
    ("Write name on leg", "Seated Lean Non Dom - FACE DOWN"): (6.1, -3.4, -6.3),
    ("Cheek - pinch skin", "Lie on Back"): (-7.5, -0.7, -6.8),
    ("Eyelash - pull hair", "Lie on Back"): (-8.7, 0.2, -6.4),
    ("Forehead - pull hairline", "Lie on Back"): (-6.8, -0.8, -8.3),
    ("Neck - pinch skin", "Lie on Back"): (-7.5, -1.9, -2.4),
    ("Neck - scratch", "Lie on Back"): (-7.8, -3.6, -2.1),
    ("Text on phone", "Lie on Back"): (0.0, 7.9, -5.4),
    ("Wave hello", "Lie on Back"): (0.4, 7.1, 2.6),
    ("Write name in air", "Lie on Back"): (-4.1, 7.4, 1.6),
    ("Cheek - pinch skin", "Lie on Side - Non Dominant"): (-0.4, 2.3, -8.3),
    ("Eyelash - pull hair", "Lie on Side - Non Dominant"): (-3.1, 2.3, -8.3),
    ("Forehead - pull hairline", "Lie on Side - Non Dominant"): (4.7, 0.8, -2.0),
    ("Neck - pinch skin", "Lie on Side - Non Dominant"): (-2.9, 0.1, -8.4),
    ("Neck - scratch", "Lie on Side - Non Dominant"): (3.1, -2.0, -8.8),
    ("Text on phone", "Lie on Side - Non Dominant"): (8.9, -3.1, -2.7),
    ("Wave hello", "Lie on Side - Non Dominant"): (-6.4, 3.1, -6.9),
    ("Write name in air", "Lie on Side - Non Dominant"): (-2.0, 2.4, -8.5),
}
# Gestures the plots do not show move like these (a target gesture not shown: its orientation's
# pooled target-gesture median below).
_GRAVITY_LIKE = {"Pull air toward your face": "Wave hello", "Scratch knee/leg skin": "Write name on leg",
                 "Pinch knee/leg skin": "Write name on leg"}
# Per orientation, in g: the target gestures' pooled median while gesturing and at the first row
# (the relaxed start), GRAVITY.md 2; and how far one sequence's posture strays from it (degrees,
# fitted so that the spread between sequences matches the real interquartile ranges).
_REAL_POSTURE = {  # orientation: (gesture-phase direction, start direction, posture spread)
    "Seated Straight": ((-0.08, 0.93, -0.35), (0.27, 0.18, 0.65), 7.0),
    "Seated Lean Non Dom - FACE DOWN": ((0.61, 0.75, 0.04), (0.49, -0.03, 0.70), 14.0),
    "Lie on Back": ((-0.78, -0.14, -0.47), (0.28, 0.00, 0.26), 16.0),
    "Lie on Side - Non Dominant": ((0.01, 0.10, -0.81), (0.70, -0.09, -0.14), 30.0),
}
DEMO_SHAKE = 0.6
_REST_POSE = (5.0, -50.0, 0.0)  # canonical hand at rest in the lap (roll, pitch, yaw in degrees)
_RAISED = np.array([30.0, 25.0, 10.0])  # a hand that relaxes first starts raised by this much


def _gesture_gravity(gesture: str, orientation: str) -> np.ndarray:
    """Unit gravity direction (device frame) while `gesture` is performed in `orientation`."""
    acc = _REAL_GESTURE_ACC.get((_GRAVITY_LIKE.get(gesture, gesture), orientation))
    d = np.array(acc if acc is not None else _REAL_POSTURE[orientation][0], dtype=float)
    return d / np.linalg.norm(d)


def quat_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The unit quaternion of the smallest rotation taking direction a onto direction b."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    q = np.array([1.0 + a @ b, *np.cross(a, b)])
    if np.linalg.norm(q) < 1e-9:  # opposite: any half turn about an axis normal to a
        q = np.array([0.0, *np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])])
    return q / np.linalg.norm(q)


def quat_slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(n, 4) rotations from a (t = 0) to b (t = 1) along the shortest arc."""
    if a @ b < 0:
        b = -b
    angle = float(np.arccos(np.clip(a @ b, -1.0, 1.0)))
    if angle < 1e-6:
        return np.broadcast_to(a, (len(t), 4)).copy()
    return (np.sin((1 - t) * angle)[:, None] * a + np.sin(t * angle)[:, None] * b) / np.sin(angle)


def _body_turn(hand_pose_deg: np.ndarray, gravity: np.ndarray) -> np.ndarray:
    """The turn of the body (world frame) under which a hand in `hand_pose_deg` sees `gravity`."""
    q_hand = quat_from_euler(*np.deg2rad(hand_pose_deg))
    return quat_between(quat_rotate(q_hand, gravity), np.array([0.0, 0.0, 1.0]))


def _random_turn(rng: np.random.Generator, sd_deg: float) -> np.ndarray:
    """A rotation about a random axis by a normal angle of sd `sd_deg`."""
    axis = rng.normal(0, 1, 3)
    half = np.deg2rad(rng.normal(0, sd_deg)) / 2
    return np.array([np.cos(half), *(np.sin(half) * axis / np.linalg.norm(axis))])


def _motion_wave(shape: str, t: np.ndarray, freq: float, phase0: float, rng: np.random.Generator) -> np.ndarray:
    """The motion's time course in [-1, 1] (pulses in [0, 1])."""
    x = 2 * np.pi * freq * t + phase0
    if shape == "pulse":
        return np.maximum(np.sin(x), 0) ** 2
    if shape == "write":
        return 0.7 * np.sin(x) + 0.45 * np.sin(1.7 * x + rng.uniform(0, 6)) + 0.25 * np.sin(2.9 * x + rng.uniform(0, 6))
    if shape == "lift":
        return np.sin(np.clip(x - phase0, 0, np.pi))  # one lift and lower
    if shape == "taps":
        return (np.sin(x) > 0.6).astype(float) * rng.uniform(0.6, 1.0, len(t))
    return np.sin(x)


def _demo_timeline(rng: np.random.Generator, behavior: str, tempo: float,
                   target: bool) -> tuple[int, int, int, int]:
    """(still or relaxing steps, steps moving to the target, pause at the target, gesture steps):
    drawn independently of the gesture, except that non-target gestures last longer, as in the real
    data (rows: target 67 +- 35, non-target 76 +- 35, min 29, median 59, max 700)."""
    if behavior == START_BEHAVIORS[0]:  # relaxes first: a movement down to rest
        n_start = int(rng.integers(8, 16) / tempo)
    elif rng.random() < 0.08:  # already at rest and waiting, sometimes for a long time
        n_start = int(rng.uniform(60, 350) / tempo)
    else:
        n_start = int(rng.gamma(1.0, 7.0) / tempo)
    n_move = max(5, int(rng.integers(8, 20) / tempo))
    n_pause = max(2, int(rng.gamma(1.5, 3.0) / tempo))
    n_gest = max(14, int(rng.gamma(12.0, 2.6) * (1.0 if target else 1.3) / tempo))
    # Real sequences are 29 to 700 rows and always end with the gesture: a long wait gives way.
    n_start = max(n_start, 29 - n_move - n_pause - n_gest)
    return min(n_start, 700 - n_move - n_pause - n_gest), n_move, n_pause, n_gest


def _tof_view(rng: np.random.Generator, view: dict[int, tuple[str, float]], dist_t: np.ndarray,
              angles: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 5, 64) distances (NaN = no return) and (n, 5) distance of each grid's centre, for the
    surfaces in `view` at centre distance dist_t (mm, per step; > 249 = out of range)."""
    n = len(dist_t)
    gy, gx = np.mgrid[0:8, 0:8]
    out = np.full((n, 5, 64), np.nan)
    centre = np.full((n, 5), np.inf)
    for s, (surface, base) in view.items():
        rate, noise, _ = _SURFACES[surface]
        theta = angles[s] + rng.normal(0, 0.35)
        slope = rng.uniform(4.0, 10.0)
        plane = (np.cos(theta) * (gx - 3.5) + np.sin(theta) * (gy - 3.5)).ravel() * slope
        d_centre = base + dist_t
        d = d_centre[:, None] + plane[None, :] + rng.normal(0, noise, (n, 64))
        seen = (rng.random((n, 64)) < rate) & (d >= 0) & (d <= 249)
        out[:, s - 1, :] = np.where(seen, np.clip(d, 0, 249), np.nan)
        centre[:, s - 1] = d_centre
    return out, centre


def _sequence_view(rng: np.random.Generator, site_view: dict[int, tuple[str, float]],
                   subj: dict[str, Any]) -> dict[int, tuple[str, float]]:
    """What each sensor faces in this sequence: the band sits a little differently every time, so a
    sensor may miss the surface or catch it from further away; people's hair differs (short hair
    reads like skin); arm length and reach scale every distance."""
    view = {}
    for s in range(1, 6):
        if s in site_view:
            if rng.random() < 0.35:
                continue
            surface, dist = site_view[s]
        elif site_view and rng.random() < 0.35:
            surface, dist = list(site_view.values())[int(rng.integers(0, len(site_view)))]
            dist = dist * rng.uniform(1.3, 2.5)
        else:
            continue
        surface = subj["surface_as"].get(surface, surface)
        view[s] = (surface, dist * subj["reach_scale"] * rng.uniform(1 - 0.25, 1 + 0.3))
    return view


def _demo_thermopiles(rng: np.random.Generator, faced: tuple[tuple[dict[int, tuple[str, float]], np.ndarray], ...],
                      subj: dict[str, Any]) -> np.ndarray:
    """(n, 5) temperatures: each sensor drifts towards the temperature of what it faces, with a lag.
    `faced` pairs a view (sensor -> surface) with the (n, 5) distances of its centre."""
    n = len(faced[0][1])
    ambient = subj["ambient"]
    goal = np.full((n, 5), ambient)
    gain = subj["thm_gain"] * rng.uniform(0.5, 1.2)  # skin contact and airflow differ every time
    for view, centre in faced:
        for s, (surface, _) in view.items():
            temp = _SURFACES[surface][2]
            w = gain * np.exp(-np.clip(centre[:, s - 1], 0, None) / 35.0)
            goal[:, s - 1] += w * ((ambient if temp is None else temp) - ambient)
    thm = np.empty((n, 5))
    level = goal[0] + rng.normal(0, 0.3, 5)
    for i in range(n):
        level = level + 0.12 * (goal[i] - level)
        thm[i] = level
    thm += subj["thm_offset"] + rng.normal(0, 0.6, 5) + rng.normal(0, 0.08, (n, 5))
    return thm


def _demo_sequence(rng: np.random.Generator, gesture: str, orientation: str, behavior: str,
                   subj: dict[str, Any], fs: float) -> dict[str, Any]:
    """One sequence in the canonical right-hand frame: arrays acc (n,3), rot (n,4), thm (n,5),
    tof (n,320), the phase boundaries and n."""
    site = _DEMO_GESTURES[gesture]
    freq_range, rot_amp, trans_amp, shape = _MOTIONS[site["motion"]]
    tempo = subj["tempo"] * (1 + rng.uniform(-0.15, 0.15))
    n_start, n_move, n_pause, n_gest = _demo_timeline(rng, behavior, tempo, gesture in TARGET_GESTURES)
    n = n_start + n_move + n_pause + n_gest
    t = np.arange(n) / fs
    at_target = n_start + n_move
    gesture_start = at_target + n_pause
    # Closeness to the target: 0 at rest, a smooth reach, 1 from the pause on.
    reach = np.clip((np.arange(n) - n_start) / max(n_move, 1), 0, 1)
    reach = 0.5 - 0.5 * np.cos(np.pi * reach)
    # Pose (degrees): rest -> target; relaxing starts from a raised hand and comes down first.
    rest = subj["rest_pose"] + rng.normal(0, 6, 3)
    target = np.array(site["pose"], float) + subj["reach_habit"] + rng.normal(0, 4, 3)
    euler = rest[None, :] * (1 - reach[:, None]) + target[None, :] * reach[:, None]
    if behavior == START_BEHAVIORS[0]:
        raised = rest + _RAISED + rng.normal(0, 8, 3)
        fall = np.clip(np.arange(n) / max(n_start, 1), 0, 1)
        fall = 0.5 - 0.5 * np.cos(np.pi * fall)
        euler += (raised - rest)[None, :] * (1 - fall[:, None]) * (reach[:, None] < 1e-9)
    in_gesture = (np.arange(n) >= gesture_start).astype(float)
    freq = rng.uniform(*freq_range) * tempo
    wave = _motion_wave(shape, t - gesture_start / fs, freq, rng.uniform(0, 2 * np.pi), rng) * in_gesture
    # Each subject performs a motion along their own direction, not one the gesture dictates.
    axis = subj["motion_axes"][shape] + rng.normal(0, 0.25, 3)
    axis /= np.linalg.norm(axis)
    amp = subj["amp"] * (1 + rng.uniform(-0.3, 0.3))
    euler += wave[:, None] * axis[None, :] * rot_amp * amp
    euler += np.cumsum(rng.normal(0, 0.4, (n, 3)), axis=0) + rng.normal(0, 0.5, (n, 3))  # drift, tremor
    rad = np.deg2rad(euler)
    q_hand = quat_from_euler(rad[:, 0], rad[:, 1], rad[:, 2])
    # The body turns the hand from the posture's resting gravity to the gesture's as it reaches; each
    # subject and each sequence hold the posture a little differently.
    gravity_at_rest, spread = np.array(_REAL_POSTURE[orientation][1]), _REAL_POSTURE[orientation][2]
    turn = quat_slerp(_body_turn(np.array(_REST_POSE) + _RAISED / 2, gravity_at_rest),
                      _body_turn(np.array(site["pose"], float), _gesture_gravity(gesture, orientation)), reach)
    stray = quat_multiply(_random_turn(rng, 0.7 * spread), subj["posture"][orientation])
    q_body = quat_multiply(np.broadcast_to(stray, (n, 4)), turn)
    q = quat_multiply(quat_multiply(q_body, q_hand), np.broadcast_to(subj["wear"], (n, 4)))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # Linear acceleration (world frame): the second derivative of the hand path.
    pos = reach[:, None] * subj["reach_vector"][None, :] + wave[:, None] * axis[None, ::-1] * trans_amp * amp / 100
    lin_world = np.gradient(np.gradient(pos, 1 / fs, axis=0), 1 / fs, axis=0)
    # Arm and body movement beyond the script: smooth random acceleration, stronger while the hand
    # moves, so that |acc| varies as much as in the real data (10.01 +- 1.21 m/s^2).
    kernel = 0.6 ** np.arange(8)
    shake = np.stack([np.convolve(rng.normal(0, 1, n), kernel)[:n] for _ in range(3)], axis=1)
    lin_world += shake * DEMO_SHAKE * (0.5 + reach * (1 - in_gesture) + in_gesture)[:, None]
    acc = quat_rotate(quat_conjugate(q), lin_world + np.array([0.0, 0.0, GRAVITY]))
    acc += rng.normal(0, 0.12, (n, 3)) + rng.normal(0, 0.08, 3)
    # ToF: the rest view fades as the target view comes in; the motion moves the hand off the surface.
    away = (1 - reach) * 320 + np.abs(wave) * trans_amp * amp * (6 if shape == "pulse" else 3)
    view = _sequence_view(rng, site["view"], subj)
    tgt, tgt_centre = _tof_view(rng, view, away, subj["tof_angles"][gesture])
    rst, rst_centre = _tof_view(rng, _REST_VIEW, reach * 320, subj["tof_angles"]["rest"])
    grid = np.fmin(tgt, rst)
    stray = rng.random((n, 5, 64)) < 0.03  # occasional far echoes from the room
    grid = np.where(np.isnan(grid) & stray, rng.uniform(150, 249, (n, 5, 64)), grid)
    tof = np.where(np.isnan(grid), -1.0, np.round(grid))
    thm = _demo_thermopiles(rng, ((view, tgt_centre), (_REST_VIEW, rst_centre)), subj)
    return dict(acc=acc, rot=q, thm=thm, tof=tof.reshape(n, 320), n=n, at_target=at_target,
                gesture_start=gesture_start)


def _demo_subjects(rng: np.random.Generator, n: int, used: set[int], n_upside_down: int) -> list[dict[str, Any]]:
    subjects = []
    while len(subjects) < n:
        sid = int(rng.integers(0, 65000))
        if sid in used:
            continue
        used.add(sid)
        adult = int(rng.random() < 0.6)
        age = int(rng.integers(18, 54)) if adult else int(rng.integers(10, 18))
        height = float(np.round(rng.uniform(150, 190.5) if adult else rng.uniform(135, 175), 1))
        wear = np.deg2rad(rng.normal(0, 10, 3))
        subjects.append(dict(
            subject=f"SUBJ_{sid:06d}", adult_child=adult, age=age, sex=int(rng.random() < 0.55),
            handedness=int(rng.random() > 0.12), height_cm=height,
            shoulder_to_wrist_cm=int(np.clip(round(height * 0.3 + rng.normal(0, 2)), 41, 71)),
            elbow_to_wrist_cm=float(np.clip(np.round(height * 0.15 + rng.normal(0, 1.5), 1), 18, 44)),
            tempo=rng.uniform(0.75, 1.3), amp=rng.uniform(0.6, 1.4),
            wear=quat_from_euler(*wear), rest_pose=np.array(_REST_POSE) + rng.normal(0, 10, 3),
            reach_habit=rng.normal(0, 6, 3), reach_vector=rng.normal(0, 0.15, 3) + np.array([0.0, 0.1, 0.35]),
            reach_scale=rng.uniform(0.65, 1.5), thm_gain=rng.uniform(0.3, 1.0),
            surface_as={"hair": "skin"} if rng.random() < 0.3 else {},
            motion_axes={m: rng.normal(0, 1, 3) for m in ("pulse", "osc", "write", "lift", "taps")},
            ambient=rng.uniform(23.0, 27.0), thm_offset=rng.normal(0, 0.3, 5),
            posture={o: _random_turn(rng, 0.7 * spread) for o, (_, _, spread) in _REAL_POSTURE.items()},
            upside_down=False))
    # The grid of what each sensor sees at a place is the place's geometry, shared by everyone up to
    # a turn of the device on the wrist: one table, each subject's rotated by their own wear angle.
    shared = {g: {s: float(np.random.default_rng(1000 + 7 * i + s).uniform(0, 2 * np.pi)) for s in range(1, 6)}
              for i, g in enumerate([*_DEMO_GESTURES, "rest"])}
    for subj in subjects:
        turn = rng.normal(0, 0.3)
        subj["tof_angles"] = {g: {s: a + turn for s, a in row.items()} for g, row in shared.items()}
    for subj in subjects[:n_upside_down]:
        subj["upside_down"] = True
    return subjects


def demo_settings(cfg: Config) -> dict[str, Any]:
    """The settings a generated demo dataset depends on (regenerated when any of them changes)."""
    return {"demo_version": DEMO_VERSION, **{k: getattr(cfg, k) for k in (
        "seed", "sample_rate_hz", "demo_train_subjects", "demo_test_subjects", "demo_pairs_per_subject")}}


UPSIDE_DOWN_RATE = 2 / 81  # the real training subjects who wore the device upside down


def demo_upside_down_count(n_train_subjects: int) -> int:
    """Training subjects who wear the device upside down: 2 of the 81 real ones, at least one in any
    demo of 10 or more subjects."""
    return 0 if n_train_subjects < 10 else max(1, round(n_train_subjects * UPSIDE_DOWN_RATE))


def _as_recorded(rng: np.random.Generator, s: dict[str, Any], subj: dict[str, Any],
                 imu_only_share: float) -> np.ndarray:
    """A canonical sequence's sensor matrix (SENSOR_COLS order) as the device stores it: mirrored for
    a left hand, turned for an upside-down wearer, rot_w >= 0, the dropouts of the real files,
    quantised."""
    x = np.hstack([s["acc"], s["rot"], s["thm"], s["tof"]])
    if subj["handedness"] == 0:  # a left hand: the mirror image of the motion
        x = mirror_sensors(x)
    if subj["upside_down"]:
        x = turn_upside_down(x)
    n = s["n"]
    rot = x[:, 3:7]
    rot[:] = as_stored(rot)
    # Dropouts at the real rates (train.csv: 0.6% of sequences without rotation, 0.64% of rows;
    # thermopile cells 2.1% and ToF cells 1.9% empty).
    if rng.random() < 0.006:
        rot[:] = np.nan  # a sequence without any rotation
    elif rng.random() < 0.02:
        k = int(rng.integers(0, n))
        rot[k: k + int(rng.integers(1, 4))] = np.nan
    if rng.random() < imu_only_share or rng.random() < 0.012:
        x[:, 7:] = np.nan  # no thermopile or ToF at all
    elif rng.random() < 0.03:
        s_missing = int(rng.integers(0, 5))  # one sensor head: its thermopile and its ToF grid
        x[:, 7 + s_missing] = np.nan
        x[:, 12 + s_missing * 64: 12 + (s_missing + 1) * 64] = np.nan
    # The device quantises acceleration to 1/256 m/s^2 and quaternions to 2^-15.
    x[:, :3] = np.round(x[:, :3] * 256) / 256
    x[:, 3:7] = np.round(x[:, 3:7] * 32768) / 32768
    return x.astype(np.float32)


DEMO_TEST_IMU_ONLY_SHARE = 0.5  # as in the hidden test set: about half its sequences carry the IMU alone


def _demo_rows(rng: np.random.Generator, subjects: list[dict[str, Any]], is_train: bool, cfg: Config,
               seq_iter: Iterator[int], imu_only_share: float = DEMO_TEST_IMU_ONLY_SHARE) -> pl.DataFrame:
    """Every sequence of `subjects` in the train.csv (or test.csv) schema; `imu_only_share` of the
    test sequences with thm/tof empty."""
    pairs = allowed_pairs()
    n_pairs = max(1, min(cfg.demo_pairs_per_subject, len(pairs)))
    imu_only_share = imu_only_share if not is_train else 0.0
    sensors, counters = [], []
    text: dict[str, list[str]] = {c: [] for c in ("row_id", "sequence_type", "sequence_id", "subject",
                                                  "orientation", "behavior", "phase", "gesture")}
    for subj in subjects:
        chosen = [pairs[i] for i in np.sort(rng.choice(len(pairs), n_pairs, replace=False))]
        for orientation, gesture in chosen:
            for behavior in START_BEHAVIORS:
                sid = f"SEQ_{next(seq_iter):06d}"
                s = _demo_sequence(rng, gesture, orientation, behavior, subj, cfg.sample_rate_hz)
                sensors.append(_as_recorded(rng, s, subj, imu_only_share))
                n = s["n"]
                counter = np.arange(n)
                counters.append(counter)
                text["row_id"] += [f"{sid}_{c:06d}" for c in counter]
                text["sequence_type"] += ["Target" if gesture in TARGET_GESTURES else "Non-Target"] * n
                text["sequence_id"] += [sid] * n
                text["subject"] += [subj["subject"]] * n
                text["orientation"] += [orientation] * n
                text["gesture"] += [gesture] * n
                text["phase"] += ["Transition"] * s["gesture_start"] + ["Gesture"] * (n - s["gesture_start"])
                text["behavior"] += ([behavior] * s["at_target"] + ["Hand at target location"]
                                     * (s["gesture_start"] - s["at_target"])
                                     + ["Performs gesture"] * (n - s["gesture_start"]))
    frame = pl.concat([pl.DataFrame({**text, "sequence_counter": np.concatenate(counters)}),
                       pl.DataFrame(np.vstack(sensors), schema=SENSOR_COLS, orient="row")], how="horizontal")
    # Missing values are empty cells in the competition CSVs, never the text "NaN".
    frame = frame.with_columns(pl.col("sequence_counter").cast(pl.Int64), pl.selectors.float().fill_nan(None))
    return frame.select(TRAIN_COLS if is_train else TEST_COLS)


def _demo_demographics(subjects: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame([{c: s[c] for c in DEMO_COLS} for s in subjects]).with_columns(
        pl.col("height_cm").cast(pl.Float64), pl.col("elbow_to_wrist_cm").cast(pl.Float64))


def generate_demo_dataset(out: Path, cfg: Config) -> Path:
    """Write train.csv, train_demographics.csv, test.csv, test_demographics.csv into `out`."""
    rng = np.random.default_rng(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    used: set[int] = set()
    train_subj = _demo_subjects(rng, cfg.demo_train_subjects, used, demo_upside_down_count(cfg.demo_train_subjects))
    # Test subjects wear the device upside down at the training rate, so a test set may have none.
    test_subj = _demo_subjects(rng, cfg.demo_test_subjects, used,
                               int(rng.binomial(cfg.demo_test_subjects, UPSIDE_DOWN_RATE)))
    seq_iter = iter(rng.permutation(np.arange(1, 65000)).tolist())
    _demo_rows(rng, train_subj, True, cfg, seq_iter).write_csv(out / "train.csv")
    _demo_demographics(train_subj).write_csv(out / "train_demographics.csv")
    _demo_rows(rng, test_subj, False, cfg, seq_iter).write_csv(out / "test.csv")
    _demo_demographics(test_subj).write_csv(out / "test_demographics.csv")
    write_json(out / DEMO_STAMP, {**demo_settings(cfg),
                                  "upside_down_subjects": [s["subject"] for s in train_subj if s["upside_down"]],
                                  "upside_down_test_subjects": [s["subject"] for s in test_subj if s["upside_down"]]})
    return out


def is_demo_folder(folder: Path) -> bool:
    return (Path(folder) / DEMO_STAMP).is_file()


def resolve_data_dir(cfg: Config) -> Path:
    """The data folder; (re)generates the demo dataset there when the config asks for demo data,
    only into an empty folder or one the generator wrote itself: real data is never overwritten."""
    if not cfg.demo or cfg.stage == "infer":  # an inference-only run never generates: it serves what is there
        return Path(cfg.data_dir)
    demo_dir = Path(cfg.data_dir)
    stamp = demo_dir / DEMO_STAMP
    if demo_dir.is_dir() and any(demo_dir.iterdir()) and not stamp.exists():
        held = [n for n in COMPETITION_FILES if (demo_dir / n).exists()] or sorted(p.name for p in demo_dir.iterdir())[:4]
        raise DataError(f"{demo_dir}: holds {held}, which the demo generator did not write, so it will not write "
                        f"demo data there. Fix: give --data-dir an empty or new folder for the demo, or leave out "
                        f"--demo to use the data in {demo_dir}.")
    wanted = demo_settings(cfg)
    stamped = json.loads(stamp.read_text()) if stamp.exists() else {}
    if not ({k: stamped.get(k) for k in wanted} == wanted and (demo_dir / "test_demographics.csv").exists()):
        t0 = time.perf_counter()
        generate_demo_dataset(demo_dir, cfg)
        print(f"demo data: generated {demo_dir} in {time.perf_counter() - t0:.1f}s")
    return demo_dir


# %% [markdown]
# ## 5. Loading and validation
#
# polars reads every sensor column as Float32 (half the memory of Float64). Columns that arrive
# as text (an all-empty column is inferred as String) are cast defensively. Malformed training
# data stops here, before any training, with the file, the column and the fix.

# %%
def _sensor_schema(columns: Iterable[str]) -> dict[str, pl.DataType]:
    sensor = set(SENSOR_COLS)
    return {c: pl.Float32 for c in columns if c in sensor}


def load_sensor_csv(path: Path, required: list[str]) -> pl.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found. Fix: point --data-dir at the folder holding the "
                        f"competition CSVs, or pass --demo to generate a demo dataset.")
    try:  # the header alone, as polars reads it (a byte-order mark skipped, quotes removed)
        header = pl.scan_csv(path, infer_schema=False).collect_schema().names()
    except pl.exceptions.PolarsError:
        header = []
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing[:8]}"
                        f"{' ...' if len(missing) > 8 else ''}. Fix: use the competition file "
                        f"unchanged (expected {len(required)} columns, found {len(header)}).")
    overrides = _sensor_schema(header)
    overrides["sequence_counter"] = pl.Int64
    try:
        frame = pl.read_csv(path, schema_overrides=overrides, infer_schema_length=10000)
    except pl.exceptions.ComputeError as err:
        # Find the offending column to name it: read as text and try each cast.
        raw = pl.read_csv(path, infer_schema=False)
        for c, dtype in overrides.items():
            bad = raw.filter(pl.col(c).cast(dtype, strict=False).is_null() & pl.col(c).is_not_null()
                             & (pl.col(c) != ""))
            if bad.height:
                raise DataError(f"{path}: column {c!r} holds non-numeric values such as "
                                f"{bad[c][0]!r} (row_id {bad['row_id'][0] if 'row_id' in bad.columns else '?'}). "
                                f"Fix: clean or drop those rows; {c} must be numeric.") from err
        raise DataError(f"{path}: could not be parsed ({err}).") from err
    if frame.height == 0:
        raise DataError(f"{path}: has a header but no data rows. Fix: use the complete competition "
                        f"file (an interrupted download or copy leaves it like this).")
    return frame


def demographic_value(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.String, strict=False).cast(pl.Float32, strict=False)


def demographic_ok(column: str) -> pl.Expr:
    """A readable value inside the column's range (a 0/1 code exactly 0 or 1)."""
    v, (low, high) = demographic_value(column), DEMOGRAPHIC_RANGES[column]
    ok = v.is_finite() & (v >= low) & (v <= high)
    return (ok & v.is_in([0.0, 1.0])) if column in DEMOGRAPHIC_CODES else ok


def demographic_problems(frame: pl.DataFrame) -> list[str]:
    """The demographics columns holding a value that is present but unreadable or out of range."""
    cols = [c for c in DEFAULT_DEMOGRAPHICS if c in frame.columns]
    bad = frame.select((pl.col(c).is_not_null() & ~demographic_ok(c).fill_null(False)).any().alias(c)
                       for c in cols).row(0, named=True) if cols and frame.height else {}
    return [c for c in cols if bad.get(c)]


def clean_demographics(frame: pl.DataFrame) -> pl.DataFrame:
    """Numeric demographics with defaults for missing columns or values (never raises)."""
    exprs = [pl.col("subject").cast(pl.String)] if "subject" in frame.columns else [pl.lit("?").alias("subject")]
    for c, default in DEFAULT_DEMOGRAPHICS.items():
        if c in frame.columns:
            exprs.append(pl.when(demographic_ok(c)).then(demographic_value(c)).otherwise(pl.lit(default))
                         .cast(pl.Float32).alias(c))
        else:
            exprs.append(pl.lit(default, dtype=pl.Float32).alias(c))
    # Not a demographic of the file: set per subject when the device is detected upside down (7.1).
    exprs.append((pl.col(UPSIDE_DOWN).cast(pl.Boolean, strict=False).fill_null(False) if UPSIDE_DOWN in frame.columns
                  else pl.lit(False)).alias(UPSIDE_DOWN))
    return frame.select(exprs)


def load_demographics(path: Path) -> pl.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found. Fix: the demographics CSV must sit next to the "
                        f"sensor CSV in --data-dir.")
    frame = pl.read_csv(path, infer_schema=False)
    missing = [c for c in DEMO_COLS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}. Fix: use the competition file.")
    for c in demographic_problems(frame):
        bad = frame.filter(pl.col(c).is_not_null() & ~demographic_ok(c).fill_null(False)).row(0, named=True)
        low, high = DEMOGRAPHIC_RANGES[c]
        allowed = "0 or 1" if c in DEMOGRAPHIC_CODES else f"a number from {low} to {high}"
        raise DataError(f"{path}: column {c!r} holds {bad[c]!r} for subject {bad['subject']!r}; it takes {allowed}. "
                        f"Fix: correct the value, or leave the cell empty for the default ({DEFAULT_DEMOGRAPHICS[c]}).")
    return clean_demographics(frame)


def validate_train(train: pl.DataFrame, demographics: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Stop early on data that would silently break training; returns the frame sorted."""
    # A label outside the known values would be read as class 0 (a lower-cased orientation, an empty
    # behaviour): the slot models then learn from wrong labels and still report a fine accuracy.
    for column, known in TRAIN_LABELS.items():
        unknown = sorted(set(train[column].drop_nulls().unique().to_list()) - set(known))
        if unknown:
            raise DataError(f"{path}: column {column!r} has {len(unknown)} unknown value(s), e.g. {unknown[:3]}. "
                            f"Fix: spell them exactly as the competition does (one of {known}); correct or drop "
                            f"those rows.")
    for column in (*TRAIN_LABELS, "subject"):
        if train[column].null_count():
            sid = train.filter(pl.col(column).is_null())["sequence_id"][0]
            raise DataError(f"{path}: column {column!r} has {train[column].null_count()} empty cells (e.g. in "
                            f"sequence {sid!r}). Fix: fill them, or drop those rows.")
    dup = train["row_id"].is_duplicated()
    if dup.any():
        raise DataError(f"{path}: column 'row_id' has duplicates, e.g. "
                        f"{train.filter(dup)['row_id'][0]!r}. Fix: drop the duplicated rows.")
    subjects = train.group_by("sequence_id").agg(pl.col("subject").unique().alias("s")).filter(pl.col("s").list.len() > 1)
    if subjects.height:
        raise DataError(f"{path}: sequence {subjects['sequence_id'][0]!r} has rows of several values in column "
                        f"'subject' ({subjects['s'][0].to_list()[:3]}; {subjects.height} sequences). Fix: one subject "
                        f"per sequence_id: correct the subject column, or give each subject's rows their own sequence_id.")
    if train["sequence_counter"].null_count():
        sid = train.filter(pl.col("sequence_counter").is_null())["sequence_id"][0]
        raise DataError(f"{path}: column 'sequence_counter' has {train['sequence_counter'].null_count()} empty cells "
                        f"(e.g. in sequence {sid!r}). Fix: number each sequence's rows 0..n-1.")
    bad_order = (train.group_by("sequence_id")
                 .agg((pl.col("sequence_counter").diff().drop_nulls() <= 0).any().alias("bad"))
                 .filter(pl.col("bad")))
    if bad_order.height:
        raise DataError(f"{path}: column 'sequence_counter' is not strictly increasing within "
                        f"sequence {bad_order['sequence_id'][0]!r} ({bad_order.height} sequences). "
                        f"Fix: sort rows by sequence_id, sequence_counter and drop repeats.")
    gaps = (train.group_by("sequence_id").agg(((pl.col("sequence_counter").min() != 0)
                                               | (pl.col("sequence_counter").max() != pl.len() - 1)).alias("bad"))
            .filter(pl.col("bad")))
    if gaps.height:
        raise DataError(f"{path}: column 'sequence_counter' does not run 0..n-1 in sequence {gaps['sequence_id'][0]!r} "
                        f"({gaps.height} sequences: rows missing, or counters of several recordings). Fix: number "
                        f"each sequence's rows 0..n-1, or drop the incomplete sequences.")
    labels = train.group_by("sequence_id").agg(pl.col("gesture").n_unique().alias("k")).filter(pl.col("k") > 1)
    if labels.height:
        raise DataError(f"{path}: sequence {labels['sequence_id'][0]!r} has more than one value in "
                        f"column 'gesture'. Fix: one gesture per sequence_id.")
    known = set(demographics["subject"].to_list())
    absent = sorted(set(train["subject"].unique().to_list()) - known)
    if absent:
        LOG.warning("%s: %d subject(s) missing from demographics (e.g. %s); using default "
                    "demographics for them.", path, len(absent), absent[0])
    return train.sort("sequence_id", "sequence_counter")


@dataclass
class Dataset:
    train: pl.DataFrame
    train_demographics: pl.DataFrame
    data_dir: Path


def require_data_files(data_dir: Path, stage: str) -> None:
    """Stop before any work when the folder lacks what the stage reads."""
    needed = COMPETITION_FILES if stage in ("all", "train") else COMPETITION_FILES[2:]
    missing = [n for n in needed if not (Path(data_dir) / n).is_file()]
    if missing:
        what = "training and serving" if stage == "all" else "training" if stage == "train" else "serving"
        raise DataError(f"{data_dir}: missing {missing}; {what} reads {list(needed)} from the data folder. "
                        f"Fix: pass --data-dir to the folder holding the competition files"
                        + (" (test.csv and test_demographics.csv for --stage infer)" if stage == "infer" else "")
                        + ", or run without --data-dir for the demo data.")


def load_training_data(data_dir: Path) -> Dataset:
    data_dir = Path(data_dir)
    t0 = time.perf_counter()
    train_path = data_dir / "train.csv"
    train = load_sensor_csv(train_path, TRAIN_COLS)
    demographics = load_demographics(data_dir / "train_demographics.csv")
    train = validate_train(train, demographics, train_path)
    n_seq = train["sequence_id"].n_unique()
    print(f"data: {train.height:,} rows, {n_seq:,} sequences, {train['subject'].n_unique()} subjects "
          f"from {data_dir} in {time.perf_counter() - t0:.1f}s")
    return Dataset(train, demographics, data_dir)


def sequence_labels(train: pl.DataFrame) -> pl.DataFrame:
    """One row per sequence: sequence_id, subject, gesture, orientation and the starting behaviour
    (its first row's), in sequence_id order."""
    first = train.sort("sequence_id", "sequence_counter")
    return (first.group_by("sequence_id", maintain_order=True)
            .agg(pl.col("subject").first(), pl.col("gesture").first(), pl.col("orientation").first(),
                 pl.col("behavior").first())
            .sort("sequence_id"))


# %% [markdown]
# ## 6. The competition metric
#
# score = 0.5 * binary F1 (target vs non-target) + 0.5 * macro F1 over the 8 targets plus one
# `non_target` class, with every non-target gesture collapsed into it (classes present in truth or
# prediction, zero_division=0). Every F1 comes from one confusion matrix of gesture indices: the
# blend-weight search (section 15) scores thousands of weight sets per fit, and sklearn's
# `f1_score`, which gives the very same numbers (tests/test_metric.py), spends 30x longer a call
# checking its inputs (docs/DECISIONS.md, "The metric").

# %%
def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """F1 = 2 tp / (2 tp + fp + fn) of each class 0..n_classes-1 of integer labels; 0 for a class with no
    true positive (sklearn's zero_division=0)."""
    cm = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = (cm.sum(1) + cm.sum(0)).astype(np.float64)
    return np.divide(2.0 * tp, denom, out=np.zeros(n_classes), where=denom > 0)


def metric_of_indices(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """The competition score and its halves for gesture-index arrays."""
    n = len(TARGET_GESTURES)
    t9, p9 = TARGET_INDEX_9[y_true], TARGET_INDEX_9[y_pred]  # the 9 scored classes, non_target last
    binary_f1 = float(f1_per_class((t9 < n).astype(np.int64), (p9 < n).astype(np.int64), 2)[1])
    present = (np.bincount(t9, minlength=n + 1) + np.bincount(p9, minlength=n + 1)) > 0
    macro_f1 = float(np.mean(f1_per_class(t9, p9, n + 1)[present])) if present.any() else 0.0
    return {"metric": 0.5 * binary_f1 + 0.5 * macro_f1, "binary_f1": binary_f1, "macro_f1": macro_f1}


def competition_metric(y_true: Iterable[str], y_pred: Iterable[str]) -> dict[str, float]:
    """The competition score and its halves for gesture-name arrays."""
    return metric_of_indices(label_index(y_true, GESTURES, strict="labels"),
                             label_index(y_pred, GESTURES, strict="predictions"))


def score_probabilities(y_true: Iterable[str], proba: np.ndarray) -> dict[str, float]:
    return metric_of_indices(label_index(y_true, GESTURES, strict="labels"), np.argmax(proba, axis=1))


# %% [markdown]
# ## 7. Features
#
# Everything here is a pure function of (sensor rows, demographics, sample rate), vectorised over
# the whole table with sequence boundaries handled explicitly, so one sequence alone and the full
# train table go through the very same code. `predict()` calls `build_features` too.
#
# Every model sees each wearer in one canonical frame: a left hand is mirrored, and a device worn
# upside down is turned back (`prepare_sequences`). Handedness comes with the demographics; who
# wears the device upside down is detected per subject (`UpsideDownCheck`: their sequences'
# gravity is likelier turned than worn as usual, weighed over the four postures) and marked beside
# the demographics, in training from all of a subject's sequences, at inference from their
# sequences so far.
#
# ### 7.1 Sequence-level signals

# %%
FEATURE_VERSION = 5  # bump when a feature changes: the on-disk cache keys on it
WELCH_CHANNELS = ["acc_mag", "lin_mag", "lin_world_x", "lin_world_y", "lin_world_z",
                  "ang_vel_mag", "jerk_mag"]
# Welch bands as fractions of the Nyquist frequency, so they follow --sample-rate-hz.
WELCH_BANDS = [(0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.0)]
MODALITY_PREFIXES = ("thm_", "tof_", "xmod_", "mod_present_")


def raw_sensor_matrix(frame: pl.DataFrame) -> np.ndarray:
    """Any incoming frame -> (n, len(SENSOR_COLS)) float32 in frame row order; missing columns and
    unparsable text become NaN, infinities stay (predict() counts them). Works column-block-wise (one
    numpy conversion), because per-column polars expressions are slow per call (docs/DECISIONS.md,
    serving speed)."""
    schema = frame.schema
    if all(schema.get(c) == pl.Float32 for c in SENSOR_COLS):  # the loaded-CSV case: one copy
        arr = frame.select(SENSOR_COLS).to_numpy()
        return arr if arr.flags.writeable else arr.copy()
    arr = np.full((frame.height, len(SENSOR_COLS)), np.nan, dtype=np.float32)
    nulls = frame.null_count().row(0, named=True) if frame.height else {}
    numeric, texty = [], []
    for i, c in enumerate(SENSOR_COLS):
        if c not in schema or nulls.get(c, 0) == frame.height:
            continue
        (numeric if schema[c].is_numeric() else texty).append((i, c))
    if numeric:
        arr[:, [i for i, _ in numeric]] = frame.select([c for _, c in numeric]).to_numpy().astype(np.float32)
    if texty:
        parsed = frame.select([pl.col(c).cast(pl.String, strict=False).str.strip_chars()
                               .cast(pl.Float64, strict=False) for _, c in texty])
        arr[:, [i for i, _ in texty]] = parsed.to_numpy().astype(np.float32)
    return arr


def _sensor_limits() -> tuple[np.ndarray, np.ndarray]:
    """Physical range of every SENSOR_COLS channel: accelerometer +-16 g, unit quaternion,
    thermopile -40..125 C (the sensor's rating), ToF -1 (no response) .. 254 mm."""
    bounds = {"acc_": (-16 * GRAVITY, 16 * GRAVITY), "rot_": (-1.0, 1.0), "thm_": (-40.0, 125.0),
              "tof_": (-1.0, 254.0)}
    pairs = [bounds[c[:4]] for c in SENSOR_COLS]
    return np.array([p[0] for p in pairs], np.float32), np.array([p[1] for p in pairs], np.float32)


SENSOR_LOW, SENSOR_HIGH = _sensor_limits()


@dataclass
class Sequences:
    """Sensor rows of one or many sequences, sorted by (sequence_id, sequence_counter).

    `meta` holds sequence_id, subject, sequence_counter (and demographics once attached);
    `sensors` is the (n, len(SENSOR_COLS)) float32 matrix, NaN where a value is missing;
    `repairs` names what sanitising had to repair in the incoming cells (predict() counts them)."""
    meta: pl.DataFrame
    sensors: np.ndarray
    repairs: tuple[str, ...] = ()

    def block(self, names: list[str]) -> np.ndarray:
        i = SENSOR_COLS.index(names[0])
        return self.sensors[:, i:i + len(names)]


def sanitize_sequences(frame: pl.DataFrame) -> Sequences:
    """Coerce any incoming frame to the test schema: sensors as float32 (NaN where missing,
    unparsable or non-finite), ids as text, rows sorted by sequence and counter."""
    cols = set(frame.columns)
    order = pl.int_range(pl.len(), dtype=pl.Int64).cast(pl.Float64)
    meta = frame.select(
        (pl.col("sequence_id").cast(pl.String, strict=False).fill_null("SEQ_UNKNOWN")
         if "sequence_id" in cols else pl.lit("SEQ_UNKNOWN")).alias("sequence_id"),
        (pl.col("subject").cast(pl.String, strict=False).fill_null("SUBJ_UNKNOWN")
         if "subject" in cols else pl.lit("SUBJ_UNKNOWN")).alias("subject"),
        (pl.col("sequence_counter").cast(pl.Float64, strict=False).fill_null(order)
         if "sequence_counter" in cols else order).alias("sequence_counter"))
    meta = meta.with_row_index("_row").sort("sequence_id", "sequence_counter", maintain_order=True)
    rows = meta["_row"].to_numpy()
    sensors = raw_sensor_matrix(frame)
    with np.errstate(invalid="ignore"):
        outside = (sensors < SENSOR_LOW) | (sensors > SENSOR_HIGH)
    infinite = np.isinf(sensors)
    repairs = tuple(text for text, found in (
        ("infinite sensor values; treated as missing", infinite.any()),
        ("sensor values outside their physical range; clipped to it", (outside & ~infinite).any()),
        ("every sensor cell empty; the answer rests on the demographics alone", np.isnan(sensors).all())) if found)
    sensors[infinite] = np.nan
    if not np.array_equal(rows, np.arange(len(rows))):
        sensors = sensors[rows]
    # Clipped to the physical ranges (NaN stays NaN): one absurd value such as 1e30 would
    # otherwise overflow the derived channels and turn a net's output into NaN.
    np.clip(sensors, SENSOR_LOW, SENSOR_HIGH, out=sensors)
    return Sequences(meta.drop("_row"), sensors, repairs)


def is_imu_only(sensors: np.ndarray) -> bool:
    """True when every thm/tof cell of a SENSOR_COLS matrix is empty, as in the IMU-only half of
    the test set (sanitised cells: unparsable or non-finite count as empty)."""
    return bool(np.isnan(sensors[:, len(ACC_COLS) + len(ROT_COLS):]).all())


@dataclass
class Segments:
    """Row layout of many sequences stored back to back (sorted by sequence_id)."""
    starts: np.ndarray   # first row of each sequence
    lengths: np.ndarray  # rows per sequence
    seg: np.ndarray      # sequence index of each row
    t: np.ndarray        # row index inside its sequence

    @classmethod
    def of(cls, seq_ids: np.ndarray) -> "Segments":
        first = np.ones(len(seq_ids), dtype=bool)
        first[1:] = seq_ids[1:] != seq_ids[:-1]
        starts = np.flatnonzero(first)
        lengths = np.diff(np.append(starts, len(seq_ids)))
        return cls(starts, lengths, np.repeat(np.arange(len(starts)), lengths),
                   np.arange(len(seq_ids)) - np.repeat(starts, lengths))

    @property
    def first(self) -> np.ndarray:
        """Whether each row is the first of its sequence."""
        return self.t == 0

    def sum(self, x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x, self.starts, axis=0)


def clean_quaternions(rot: np.ndarray, seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill missing rotations, make signs continuous (q and -q are one rotation), renormalise.

    Returns (n, 4) float64 quaternions and a (n,) missing flag. Missing rows are linearly
    interpolated inside their sequence (held at the ends); a sequence without any rotation gets
    the identity.
    """
    rot = np.asarray(rot, dtype=np.float64)
    norm = np.linalg.norm(rot, axis=1)
    valid = np.isfinite(rot).all(axis=1) & (norm > 1e-6)
    q = np.where(valid[:, None], rot / np.where(valid, norm, 1.0)[:, None], np.nan)
    # Sign continuity over the valid rows of each sequence: flip parity accumulates along it.
    vidx = np.flatnonzero(valid)
    if len(vidx) > 1:
        qv = q[vidx]
        same = seq_ids[vidx[1:]] == seq_ids[vidx[:-1]]
        flip = np.zeros(len(vidx), dtype=np.int64)
        flip[1:] = (np.einsum("ij,ij->i", qv[1:], qv[:-1]) < 0) & same
        parity = np.cumsum(flip)
        first_v = np.ones(len(vidx), dtype=bool)
        first_v[1:] = ~same
        start_parity = np.maximum.accumulate(np.where(first_v, np.arange(len(vidx)), 0))
        parity = parity - parity[start_parity]
        q[vidx] = qv * np.where(parity % 2 == 1, -1.0, 1.0)[:, None]
    filled = (pl.DataFrame({"s": seq_ids, "w": q[:, 0], "x": q[:, 1], "y": q[:, 2], "z": q[:, 3]})
              .with_columns([pl.col(c).fill_nan(None).interpolate().forward_fill().backward_fill()
                             .over("s") for c in "wxyz"]))
    q = filled.select("w", "x", "y", "z").to_numpy().astype(np.float64)
    q = np.where(np.isfinite(q).all(axis=1, keepdims=True), q, np.array([1.0, 0.0, 0.0, 0.0]))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, (~valid).astype(np.float32)


def _diff_in_sequence(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    d = np.zeros_like(x)
    d[1:] = x[1:] - x[:-1]
    d[first] = 0.0
    return d


def imu_channels(acc: np.ndarray, rot: np.ndarray, seq_ids: np.ndarray, fs: float) -> dict[str, np.ndarray]:
    """Physics channels from raw acc (n,3) and raw quaternions (n,4), all rows of many sequences."""
    first = Segments.of(seq_ids).first
    acc = np.nan_to_num(np.asarray(acc, dtype=np.float64), nan=0.0)
    q, rot_missing = clean_quaternions(rot, seq_ids)
    world = quat_rotate(q, acc)
    lin_world = world - np.array([0.0, 0.0, GRAVITY])
    gravity_dev = quat_rotate(quat_conjugate(q), np.broadcast_to([0.0, 0.0, 1.0], acc.shape))
    lin_dev = acc - GRAVITY * gravity_dev
    # Relative rotation between consecutive rows: angle and body-frame angular velocity.
    q_prev = np.empty_like(q)
    q_prev[1:] = q[:-1]
    q_prev[first] = q[first]
    dq = quat_multiply(quat_conjugate(q_prev), q)
    vec_norm = np.linalg.norm(dq[:, 1:], axis=1)
    angle = 2.0 * np.arctan2(vec_norm, np.abs(dq[:, 0]))
    axis = dq[:, 1:] * (np.sign(dq[:, :1]) + (dq[:, :1] == 0)) / np.maximum(vec_norm, 1e-12)[:, None]
    ang_vel = axis * (angle * fs)[:, None]
    jerk = _diff_in_sequence(lin_world, first) * fs
    ch = {
        "acc_x": acc[:, 0], "acc_y": acc[:, 1], "acc_z": acc[:, 2],
        "acc_mag": np.linalg.norm(acc, axis=1),
        "rot_w": q[:, 0], "rot_x": q[:, 1], "rot_y": q[:, 2], "rot_z": q[:, 3],
        "rot_angle": 2.0 * np.arccos(np.clip(np.abs(q[:, 0]), 0.0, 1.0)),
        "grav_x": gravity_dev[:, 0], "grav_y": gravity_dev[:, 1], "grav_z": gravity_dev[:, 2],
        "lin_x": lin_dev[:, 0], "lin_y": lin_dev[:, 1], "lin_z": lin_dev[:, 2],
        "lin_world_x": lin_world[:, 0], "lin_world_y": lin_world[:, 1], "lin_world_z": lin_world[:, 2],
        "lin_mag": np.linalg.norm(lin_world, axis=1),
        "ang_vel_x": ang_vel[:, 0], "ang_vel_y": ang_vel[:, 1], "ang_vel_z": ang_vel[:, 2],
        "ang_vel_mag": angle * fs, "ang_dist": angle,
        "jerk_mag": np.linalg.norm(jerk, axis=1),
        "rot_missing": rot_missing,
    }
    return {k: v.astype(np.float32) for k, v in ch.items()}


class _quiet_nan_warnings:
    """All-NaN rows (sensor missing) are expected: their mean is NaN, without a warning."""

    def __enter__(self) -> None:
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def thm_channels(thm: np.ndarray, seq_ids: np.ndarray, fs: float) -> dict[str, np.ndarray]:
    """Thermopile values, each sensor's difference to their mean, and the warming trend."""
    first = Segments.of(seq_ids).first
    thm = np.asarray(thm, dtype=np.float32)
    with np.errstate(invalid="ignore"), _quiet_nan_warnings():
        mean = np.nanmean(thm, axis=1)
    ch = {f"thm_{i + 1}": thm[:, i] for i in range(5)}
    ch.update({f"thm_{i + 1}_rel": thm[:, i] - mean for i in range(5)})
    ch["thm_mean"] = mean
    ch["thm_trend"] = (_diff_in_sequence(np.nan_to_num(mean), first) * fs).astype(np.float32)
    ch["thm_trend"][np.isnan(mean)] = np.nan
    return ch


def tof_channels(tof: np.ndarray) -> dict[str, np.ndarray]:
    """Per ToF sensor: share of pixels that answered, mean and min distance of those pixels
    (-1 = no response, not a distance), and the mean of each 4x4 quadrant."""
    n = len(tof)
    grid = np.asarray(tof, dtype=np.float32).reshape(n, 5, 64)
    present = ~np.isnan(grid).all(axis=2)  # (n, 5): the sensor reported this row
    answered = grid >= 0  # NaN compares False: a missing sensor answers nothing
    dist0 = np.where(answered, grid, 0.0)
    count = answered.sum(axis=2, dtype=np.float32)
    ch: dict[str, np.ndarray] = {}
    # Sums and counts rather than nanmean: the same numbers, without NaN-replacing copies.
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = count / 64.0
        mean = np.where(count > 0, dist0.sum(axis=2) / count, np.nan)
        mn = np.where(answered, grid, np.inf).min(axis=2)
        mn = np.where(np.isinf(mn), np.nan, mn).astype(np.float32)
        for s in range(5):
            ch[f"tof_{s + 1}_valid"] = np.where(present[:, s], frac[:, s], np.nan).astype(np.float32)
            ch[f"tof_{s + 1}_mean"] = mean[:, s].astype(np.float32)
            ch[f"tof_{s + 1}_min"] = mn[:, s]
        qsum = dist0.reshape(n, 5, 2, 4, 2, 4).sum(axis=(3, 5)).reshape(n, 5, 4)
        qcnt = answered.reshape(n, 5, 2, 4, 2, 4).sum(axis=(3, 5), dtype=np.float32).reshape(n, 5, 4)
        qmean = np.where(qcnt > 0, qsum / qcnt, np.nan).astype(np.float32)
        for s in range(5):
            for k in range(4):
                ch[f"tof_{s + 1}_q{k}"] = qmean[:, s, k]
    with _quiet_nan_warnings():
        ch["tof_min_all"] = np.nanmin(mn, axis=1)
    return ch


def prepare_sequences(frame: pl.DataFrame, demographics: pl.DataFrame) -> Sequences:
    """Sanitised rows in canonical right-hand form, with the subject's demographics attached."""
    seqs = sanitize_sequences(frame)
    demo = clean_demographics(demographics).unique("subject", keep="first")
    meta = seqs.meta.join(demo, on="subject", how="left", maintain_order="left")
    meta = meta.with_columns([pl.col(c).fill_null(v).cast(pl.Float32) for c, v in DEFAULT_DEMOGRAPHICS.items()])
    meta = meta.with_columns(pl.col(UPSIDE_DOWN).fill_null(False))
    left = (meta["handedness"] == 0).to_numpy()
    turned = meta[UPSIDE_DOWN].to_numpy()
    sensors = seqs.sensors
    if left.any() or turned.any():
        sensors = sensors.copy()
        sensors[left] = mirror_sensors(sensors[left])
        sensors[turned] = turn_upside_down(sensors[turned])
    return Sequences(meta, sensors, seqs.repairs)


@dataclass
class UpsideDownCheck:
    """Which subjects wear the device upside down, from the gravity their sequences report.

    Turned 180 degrees about the face normal, the device reports gravity with x and y negated. Lying
    down moves gravity on x just as far (docs/DATA.md), so one sequence proves little; what tells the
    two apart is the joint (x, y, z) direction over several of a subject's postures. Each sequence's
    mean gravity (canonical right-hand frame) is scored under two hypotheses, "worn as usual" and
    "turned", each a Gaussian mixture over the four orientations fitted on the training rows, where
    the orientation is known. Its evidence is the log-likelihood ratio, capped so that no single
    sequence decides; a subject is turned once the sum over their sequences is decisive: in training
    over all of them, at inference over their calls so far (docs/DECISIONS.md, upside-down fix)."""
    means: list[list[float]]             # (4, 3) mean gravity (g) per orientation, worn as usual
    covariances: list[list[list[float]]]  # (4, 3, 3)
    weights: list[float]                 # (4,) share of the training sequences per orientation

    CAP = 2.0        # the most one sequence's log-likelihood ratio counts, either way
    DECISIVE = 8.0   # log-odds a subject's summed evidence must pass: at least four sequences' worth
    PRIOR_SEQUENCES = 5.0  # pseudo-sequences that shrink a sparse orientation towards the pooled fit
    TURN = np.array([-1.0, -1.0, 1.0])  # what wearing the device upside down does to gravity

    @staticmethod
    def gravity(prepared: Sequences) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sequence id, subject, mean acc / g (n, 3)) per sequence, canonical frame; a sequence
        without acceleration reads (0, 0, 0), which is evidence of nothing."""
        sg = Segments.of(prepared.meta["sequence_id"].to_numpy())
        acc = prepared.block(ACC_COLS).astype(np.float64)
        seen = np.isfinite(acc)
        mean = sg.sum(np.where(seen, acc, 0.0)) / np.maximum(sg.sum(seen.astype(np.float64)), 1.0) / GRAVITY
        return (prepared.meta["sequence_id"].to_numpy()[sg.starts], prepared.meta["subject"].to_numpy()[sg.starts],
                mean)

    @classmethod
    def _fitted(cls, g: np.ndarray, orientation: np.ndarray) -> "UpsideDownCheck":
        pooled_mean, pooled_cov = g.mean(axis=0), np.cov(g.T) + 1e-3 * np.eye(3)
        k = cls.PRIOR_SEQUENCES
        means, covs, counts = [], [], []
        for o in range(len(ORIENTATIONS)):
            x = g[orientation == o]
            n = len(x)
            mean = (x.sum(axis=0) + k * pooled_mean) / (n + k)
            scatter = (x - mean).T @ (x - mean) if n else np.zeros((3, 3))
            means.append(mean.tolist())
            covs.append(((scatter + k * pooled_cov) / (n + k)).tolist())
            counts.append(n + 1.0)
        return cls(means, covs, (np.array(counts) / sum(counts)).tolist())

    @classmethod
    def fit(cls, prepared: Sequences, orientation: dict[str, str]) -> "UpsideDownCheck":
        """Fitted on the training rows (`orientation`: sequence_id -> orientation); refitted once
        without the subjects the first fit finds turned, so that they do not widen what usual is."""
        ids, subjects, g = cls.gravity(prepared)
        o = np.array(label_index([orientation.get(i, "") for i in ids], ORIENTATIONS))
        check = cls._fitted(g, o)
        turned = np.isin(subjects, cls._turned(subjects, check._capped(g)))
        return cls._fitted(g[~turned], o[~turned]) if turned.any() and not turned.all() else check

    def _log_density(self, g: np.ndarray) -> np.ndarray:
        """log p(g) under the usual-wear mixture, (n, 3) -> (n,)."""
        cov = np.asarray(self.covariances)
        d = g[:, None, :] - np.asarray(self.means)[None]
        mahalanobis = np.einsum("noi,oij,noj->no", d, np.linalg.inv(cov), d)
        component = np.log(self.weights) - 0.5 * (mahalanobis + np.linalg.slogdet(cov)[1] + 3 * np.log(2 * np.pi))
        return np.logaddexp.reduce(component, axis=1)

    def _capped(self, g: np.ndarray) -> np.ndarray:
        return np.clip(self._log_density(g * self.TURN) - self._log_density(g), -self.CAP, self.CAP)

    def evidence(self, prepared: Sequences) -> tuple[np.ndarray, np.ndarray]:
        """(subject, evidence) per sequence: the capped log-likelihood ratio, > 0 for upside down."""
        _, subjects, g = self.gravity(prepared)
        return subjects, self._capped(g)

    def is_valid(self) -> bool:
        """Finite parameters of the right shapes, positive weights, positive definite covariances
        (what a manifest must hold before serving reads it)."""
        try:
            means, cov, w = (np.asarray(v, dtype=np.float64) for v in (self.means, self.covariances, self.weights))
        except (TypeError, ValueError):
            return False
        k = len(ORIENTATIONS)
        return (means.shape == (k, 3) and cov.shape == (k, 3, 3) and w.shape == (k,)
                and all(np.isfinite(v).all() for v in (means, cov, w)) and bool((w > 0).all())
                and np.allclose(cov, cov.transpose(0, 2, 1)) and bool((np.linalg.eigvalsh(cov) > 1e-9).all()))

    @classmethod
    def decide(cls, evidence: Iterable[float]) -> bool:
        return float(np.sum(list(evidence))) > cls.DECISIVE

    @classmethod
    def _turned(cls, subjects: np.ndarray, evidence: np.ndarray) -> list[str]:
        sums = pl.DataFrame({"s": subjects, "score": evidence}).group_by("s").agg(pl.col("score").sum())
        return sorted(s for s, total in sums.iter_rows() if cls.decide([total]))

    def flagged(self, prepared: Sequences) -> list[str]:
        """Subjects whose sequences, all together, say upside down."""
        return self._turned(*self.evidence(prepared))


def mark_upside_down(demographics: pl.DataFrame, subjects: Iterable[str]) -> pl.DataFrame:
    """The demographics table with the upside-down flag set for `subjects` (and cleared for the rest)."""
    return clean_demographics(demographics).with_columns(pl.col("subject").is_in(list(subjects)).alias(UPSIDE_DOWN))


def sequence_channels(prepared: Sequences, fs: float) -> pl.DataFrame:
    """Per-row channels for every sequence in `prepared` (output of prepare_sequences)."""
    seq_ids = prepared.meta["sequence_id"].to_numpy()
    ch: dict[str, Any] = {"sequence_id": prepared.meta["sequence_id"]}
    ch.update(imu_channels(prepared.block(ACC_COLS), prepared.block(ROT_COLS), seq_ids, fs))
    ch.update(thm_channels(prepared.block(THM_COLS), seq_ids, fs))
    ch.update(tof_channels(prepared.block(TOF_COLS)))
    return pl.DataFrame(ch)


# %% [markdown]
# ### 7.2 Per-sequence aggregate table
#
# Statistics per channel (the test set has no `phase` column, so the gesture phase is approximated
# by the last 40% of the sequence), Welch band powers of the informative channels, cross-modal
# features only where both modalities exist, presence flags and demographics.

# %%
STATS = ("mean", "std", "min", "max", "q10", "q50", "q90", "first", "last", "slope", "tail_mean")
STAT_CHANNELS_SKIP = {"rot_missing"}
TAIL_START = 0.6  # the test set has no phase column: the last 40% of a sequence stands in for the gesture
STAT_BLOCK_CELLS = 9_000_000  # rows x channels per segment_stats call (its temporaries scale with it)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def segment_stats(x: np.ndarray, sg: Segments) -> dict[str, np.ndarray]:
    """STATS of each column of x (n, C) per sequence, ignoring NaN; NaN where nothing is left.

    Quantiles are linear-interpolated (numpy's default); std uses ddof=1; slope is per row index.
    """
    n = len(x)
    valid = ~np.isnan(x)
    cnt = sg.sum(valid.astype(np.float64))
    xz = np.where(valid, x, 0.0)
    mean = _ratio(sg.sum(xz), cnt)
    dev = np.where(valid, x - mean[sg.seg], 0.0)
    out = {"mean": mean, "std": np.sqrt(_ratio(sg.sum(dev ** 2), cnt - 1))}
    out["min"] = np.fmin.reduceat(x, sg.starts, axis=0)
    out["max"] = np.fmax.reduceat(x, sg.starts, axis=0)
    rows = np.arange(n)[:, None]
    first = np.minimum.reduceat(np.where(valid, rows, n), sg.starts, axis=0)
    last = np.maximum.reduceat(np.where(valid, rows, -1), sg.starts, axis=0)
    cols = np.arange(x.shape[1])[None, :]
    out["first"] = np.where(first < n, x[np.minimum(first, n - 1), cols], np.nan)
    out["last"] = np.where(last >= 0, x[np.maximum(last, 0), cols], np.nan)
    t = sg.t[:, None].astype(np.float64)
    t_mean = _ratio(sg.sum(np.where(valid, t, 0.0)), cnt)
    tc = np.where(valid, t - t_mean[sg.seg], 0.0)
    out["slope"] = _ratio(sg.sum(tc * dev), sg.sum(tc ** 2))
    tail = (sg.t >= TAIL_START * sg.lengths[sg.seg])[:, None] & valid
    out["tail_mean"] = _ratio(sg.sum(np.where(tail, x, 0.0)), sg.sum(tail.astype(np.float64)))
    # Quantiles: one sort of all columns at once. Each value becomes a key in [4*seq, 4*seq + 1]
    # (NaN at 4*seq + 2, so it sorts last inside its sequence); sorting the keys sorts every
    # sequence's values, which are read back from the keys (relative error ~1e-12 of the range).
    lo_v, hi_v = np.nanmin(np.where(valid, x, np.inf), axis=0), np.nanmax(np.where(valid, x, -np.inf), axis=0)
    span = np.where(hi_v > lo_v, hi_v - lo_v, 1.0)
    lo_v = np.where(np.isfinite(lo_v), lo_v, 0.0)
    base = 4.0 * sg.seg[:, None]
    srt = np.sort(np.where(valid, base + (x - lo_v) / span, base + 2.0), axis=0)
    srt = (srt - 4.0 * sg.seg[:, None]) * span + lo_v
    k = cnt.astype(np.int64)
    cols_idx = np.arange(x.shape[1])[None, :]
    for name, q in (("q10", 0.1), ("q50", 0.5), ("q90", 0.9)):
        pos = np.maximum(k - 1, 0) * q
        lo, hi = np.floor(pos).astype(np.int64), np.ceil(pos).astype(np.int64)
        frac = pos - lo
        v = srt[sg.starts[:, None] + lo, cols_idx] * (1 - frac) + srt[sg.starts[:, None] + hi, cols_idx] * frac
        out[name] = np.where(k > 0, v, np.nan)
    return out


def segment_corr(a: np.ndarray, b: np.ndarray, sg: Segments) -> np.ndarray:
    """Pearson correlation of a and b inside each sequence, over rows where both exist."""
    both = ~np.isnan(a) & ~np.isnan(b)
    cnt = sg.sum(both.astype(np.float64))
    ma = _ratio(sg.sum(np.where(both, a, 0.0)), cnt)
    mb = _ratio(sg.sum(np.where(both, b, 0.0)), cnt)
    da = np.where(both, a - ma[sg.seg], 0.0)
    db = np.where(both, b - mb[sg.seg], 0.0)
    return _ratio(sg.sum(da * db), np.sqrt(sg.sum(da ** 2) * sg.sum(db ** 2)))


def welch_psd(x: np.ndarray, sg: Segments, fs: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Welch power spectral density of every sequence, as scipy.signal.welch computes it (Hann
    window, 50% overlap, constant detrend, one-sided density), vectorised over all sequences
    that share a segment length: nperseg = min(64, len/4); shorter than 8 rows -> zero-padded to 8.

    Returns, per nperseg group: (sequence indices, frequencies, psd of shape (group, freqs, channels)).
    """
    lengths = np.maximum(sg.lengths, 8)
    nperseg = np.minimum(64, np.maximum(2, lengths // 4))
    short_row = (sg.lengths < 8)[sg.seg]
    if short_row.any():  # centre a short sequence on its own mean before zero-padding it
        x = np.where(short_row[:, None], x - (sg.sum(x) / sg.lengths[:, None])[sg.seg], x)
    out = []
    for m in np.unique(nperseg):
        group = np.flatnonzero(nperseg == m)
        step = m - m // 2
        n_win = (lengths[group] - m // 2) // step
        win_seq = np.repeat(np.arange(len(group)), n_win)
        win_start = np.arange(len(win_seq)) - np.repeat(np.cumsum(n_win) - n_win, n_win)
        rows = sg.starts[group][win_seq, None] + win_start[:, None] * step + np.arange(m)[None, :]
        valid = (rows - sg.starts[group][win_seq, None]) < sg.lengths[group][win_seq, None]
        seg = np.where(valid[..., None], x[np.minimum(rows, len(x) - 1)], 0.0)  # (windows, m, channels)
        seg = seg - seg.mean(axis=1, keepdims=True)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(m) / m)  # periodic Hann, as scipy
        spec = np.abs(np.fft.rfft(seg * window[None, :, None], axis=1)) ** 2 / (fs * (window ** 2).sum())
        spec[:, 1:(None if m % 2 else -1)] *= 2.0
        psd = np.add.reduceat(spec, np.cumsum(n_win) - n_win, axis=0) / n_win[:, None, None]
        out.append((group, np.fft.rfftfreq(m, 1 / fs), psd))
    return out


def welch_features(channels: pl.DataFrame, fs: float) -> tuple[list[str], np.ndarray]:
    """Band powers (relative), spectral centroid, entropy and log power per sequence for
    WELCH_CHANNELS: (feature names, array of one row per sequence). Bands are fractions of the
    Nyquist frequency, so they follow --sample-rate-hz."""
    sg = Segments.of(channels["sequence_id"].to_numpy())
    x = np.nan_to_num(channels.select(WELCH_CHANNELS).to_numpy().astype(np.float64))
    nyq = fs / 2.0
    c = len(WELCH_CHANNELS)
    feats = np.zeros((len(sg.starts), (len(WELCH_BANDS) + 3) * c))
    for group, f, p in welch_psd(x, sg, fs) if len(x) else []:
        total = p.sum(axis=1)
        safe = np.where(total > 0, total, 1.0)
        cols = []
        for lo, hi in WELCH_BANDS:
            band = (f > lo * nyq) & (f <= hi * nyq) if lo > 0 else (f <= hi * nyq)
            cols.append(p[:, band].sum(axis=1) / safe)
        cols.append((f[None, :, None] * p).sum(axis=1) / safe)
        pn = p / safe[:, None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(pn > 0, pn * np.log(pn), 0.0).sum(axis=1) / np.log(max(len(f), 2))
        cols.append(ent)
        cols.append(np.log1p(total))
        feats[group] = np.concatenate(cols, axis=1)
    names = [f"{ch}__welch_b{k}" for k in range(len(WELCH_BANDS)) for ch in WELCH_CHANNELS]
    names += [f"{ch}__welch_centroid" for ch in WELCH_CHANNELS]
    names += [f"{ch}__welch_entropy" for ch in WELCH_CHANNELS]
    names += [f"{ch}__welch_logpower" for ch in WELCH_CHANNELS]
    return names, feats


@dataclass
class FeatureTable:
    """One row per sequence, sorted by sequence_id. predict() uses the matrix directly: turning
    ~900 columns into a polars DataFrame costs more per call than computing them."""
    ids: np.ndarray
    names: list[str]
    values: np.ndarray  # float32 (n_sequences, n_features)

    def frame(self) -> pl.DataFrame:
        table = pl.from_numpy(self.values, schema=self.names, orient="row")
        return table.insert_column(0, pl.Series("sequence_id", self.ids, dtype=pl.String))

    def matrix(self, names: list[str]) -> np.ndarray:
        """Columns in the order `names`; a name this table lacks comes back as NaN."""
        pos = {c: i for i, c in enumerate(self.names)}
        out = np.full((len(self.ids), len(names)), np.nan, dtype=np.float32)
        take = [(j, pos[c]) for j, c in enumerate(names) if c in pos]
        if take:
            out[:, [j for j, _ in take]] = self.values[:, [i for _, i in take]]
        return out


def aggregate_features(prepared: Sequences, channels: pl.DataFrame, fs: float) -> FeatureTable:
    """One row per sequence from per-row channels (rows already sorted by sequence_id)."""
    seq_ids = channels["sequence_id"].to_numpy()
    sg = Segments.of(seq_ids)
    names = [c for c in channels.columns if c != "sequence_id" and c not in STAT_CHANNELS_SKIP]
    cols: dict[str, np.ndarray] = {"seq_len": sg.lengths.astype(np.float64)}
    col = lambda c: channels[c].to_numpy().astype(np.float64)  # noqa: E731
    cols["rot_missing_frac"] = sg.sum(col("rot_missing")) / sg.lengths
    thm_mean, tof_min = col("thm_mean"), col("tof_min_all")
    tof_any = np.column_stack([~np.isnan(col(f"tof_{s}_valid")) for s in range(1, 6)]).any(axis=1)
    has_thm = sg.sum((~np.isnan(thm_mean)).astype(np.float64)) > 0
    has_tof = sg.sum(tof_any.astype(np.float64)) > 0
    cols["mod_present_thm"] = has_thm.astype(np.float64)
    cols["mod_present_tof"] = has_tof.astype(np.float64)
    # Channel blocks bound the memory on the full train set (16 channels at ~575k rows); smaller
    # tables, down to one predict() sequence, take wider blocks and fewer numpy calls.
    width = max(16, STAT_BLOCK_CELLS // max(len(seq_ids), 1))
    for i in range(0, len(names), width):
        block = names[i:i + width]
        stats = segment_stats(channels.select(block).to_numpy().astype(np.float64), sg)
        for j, c in enumerate(block):
            for stat in STATS:
                cols[f"{c}__{stat}"] = stats[stat][:, j]
    # Cross-modal features: only where the modality exists (NaN otherwise, never 0).
    lin, ang, ang_dist = col("lin_mag"), col("ang_vel_mag"), col("ang_dist")
    thm_stats = segment_stats(thm_mean[:, None], sg)
    cols["xmod_corr_thm_lin"] = np.where(has_thm, segment_corr(thm_mean, lin, sg), np.nan)
    cols["xmod_thm_rise_per_rad"] = np.where(
        has_thm, (thm_stats["last"][:, 0] - thm_stats["first"][:, 0]) / (sg.sum(ang_dist) + 1e-3), np.nan)
    cols["xmod_corr_tof_angvel"] = np.where(has_tof, segment_corr(tof_min, ang, sg), np.nan)
    cols["xmod_corr_tof_thm"] = np.where(has_tof & has_thm, segment_corr(tof_min, thm_mean, sg), np.nan)
    for c in DEFAULT_DEMOGRAPHICS:
        cols[c] = prepared.meta[c].to_numpy()[sg.starts].astype(np.float64)
    cols["duration_s"] = sg.lengths / fs
    welch_names, welch = welch_features(channels, fs)
    return FeatureTable(seq_ids[sg.starts], [*cols, *welch_names],
                        np.column_stack([*cols.values(), welch]).astype(np.float32))


def derive(frame: pl.DataFrame, demographics: pl.DataFrame, cfg: Config) -> tuple[Sequences, pl.DataFrame]:
    """Raw rows -> (prepared sequences, per-row channels): the common start of every model's input."""
    prepared = prepare_sequences(frame, demographics)
    return prepared, sequence_channels(prepared, cfg.sample_rate_hz)


def build_features(frame: pl.DataFrame, demographics: pl.DataFrame, cfg: Config) -> pl.DataFrame:
    """Raw rows (train or test schema, any number of sequences) -> one feature row per sequence,
    as a polars DataFrame with a sequence_id column (for caching and analysis)."""
    return aggregate_features(*derive(frame, demographics, cfg), cfg.sample_rate_hz).frame()


def modality_masks(names: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks over `names` (feature columns or net channels): the values that exist only when
    thermopiles/ToF are present, and the presence flags. The one rule of what IMU-only blanks."""
    names = list(names)
    flags = np.array([c.startswith("mod_present_") for c in names], dtype=bool)
    values = np.array([c.startswith(MODALITY_PREFIXES) for c in names], dtype=bool) & ~flags
    return values, flags


def modality_columns(names: Iterable[str]) -> list[str]:
    """The columns an IMU-only sequence blanks (values and presence flags)."""
    names = list(names)
    values, flags = modality_masks(names)
    return [c for c, m in zip(names, values | flags) if m]


def blank_modalities(frame: pl.DataFrame) -> pl.DataFrame:
    """Raw rows with every thm/tof cell nulled: exactly what an IMU-only test sequence looks like."""
    present = [c for c in THM_COLS + TOF_COLS if c in frame.columns]
    return frame.with_columns([pl.lit(None, dtype=pl.Float32).alias(c) for c in present])


def blank_modality_values(x: np.ndarray, names: list[str]) -> np.ndarray:
    """Feature rows or a net's unscaled channels as an IMU-only sequence gives them: thm/tof values
    NaN, presence flags 0 (for the features this equals recomputing them from raw rows blanked by
    blank_modalities: a test checks it)."""
    values, flags = modality_masks(names)
    x = x.copy()
    x[:, values] = np.nan
    x[:, flags] = 0.0
    return x


# %% [markdown]
# ### 7.3 Feature cache
#
# Features are stored per (sequence_id, content hash): a rerun, a second view, or a later fold
# reuses them, and a sequence whose rows or demographics changed is recomputed, never served stale.

# %%
def sequence_content_hashes(frame: pl.DataFrame, demographics: pl.DataFrame) -> pl.DataFrame:
    """sequence_id -> uint64 hash of its sanitised rows and its subject's demographics."""
    prepared = prepare_sequences(frame, demographics)
    # One hash per row of its sensor bits (NaN patterns included) and the subject's demographics.
    bits = pl.DataFrame(np.ascontiguousarray(prepared.sensors).view(np.uint32))
    h = pl.concat([prepared.meta.select("sequence_counter", *DEFAULT_DEMOGRAPHICS, UPSIDE_DOWN), bits],
                  how="horizontal").hash_rows(seed=17).to_numpy()
    seq_ids = prepared.meta["sequence_id"].to_numpy()
    sg = Segments.of(seq_ids)
    starts, pos = sg.starts, sg.t.astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = h * (pos * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1))
        combined = np.add.reduceat(mixed, starts) if len(h) else np.zeros(0, np.uint64)
    return pl.DataFrame({"sequence_id": seq_ids[starts], "_content_hash": combined.astype(np.uint64)})


def feature_cache_key(cfg: Config) -> str:
    return short_hash(FEATURE_VERSION, cfg.sample_rate_hz, pl.__version__, n=12)


def cached_features(frame: pl.DataFrame, demographics: pl.DataFrame, cfg: Config,
                    cache_dir: Path | None, label: str = "features") -> pl.DataFrame:
    """build_features with an on-disk cache; same output, sorted by sequence_id."""
    if cache_dir is None:
        return build_features(frame, demographics, cfg)
    path = Path(cache_dir) / f"features_{feature_cache_key(cfg)}.parquet"
    keys = sequence_content_hashes(frame, demographics)
    cache = pl.read_parquet(path) if path.exists() else None
    if cache is not None:
        hits = keys.join(cache, on=["sequence_id", "_content_hash"], how="inner")
    else:
        hits = None
    done = set() if hits is None else set(hits["sequence_id"].to_list())
    todo = [s for s in keys["sequence_id"].to_list() if s not in done]
    parts = [] if hits is None else [hits]
    if todo:
        fresh = build_features(frame.filter(pl.col("sequence_id").is_in(todo)), demographics, cfg)
        fresh = fresh.join(keys, on="sequence_id", how="left").select(["sequence_id", "_content_hash", *fresh.columns[1:]])
        parts.append(fresh)
        merged = pl.concat([cache, fresh], how="diagonal_relaxed") if cache is not None else fresh
        merged = merged.unique(["sequence_id", "_content_hash"], keep="last")
        atomic_write(path, lambda p: merged.write_parquet(p))
    out = pl.concat(parts, how="diagonal_relaxed").drop("_content_hash").sort("sequence_id")
    print(f"{label}: {len(todo)} computed, {len(done)} from cache ({out.width - 1} columns)")
    return out


# %% [markdown]
# ### 7.4 Per-step inputs for the nets
#
# The nets read the per-row channels above plus two per-row presence flags, one array per sequence
# (section 11 scales them). Training, the CV views and predict() all build them here. With
# `--tof-grid` the raw pixels of the five 8x8 grids (canonical frame) follow, last: distances in
# mm, "no response" (-1) as a distance beyond the sensor's range, NaN where the sensor is missing.

# %%
@dataclass
class NetInputs:
    ids: np.ndarray              # sequence_id per sequence (sorted)
    names: list[str]             # channel names
    arrays: list[np.ndarray]     # (length, channels) float32 per sequence, unscaled, NaN = missing
    demographics: np.ndarray     # (n_sequences, 7) float32

    def subset(self, mask: np.ndarray) -> "NetInputs":
        idx = np.flatnonzero(mask)
        return NetInputs(self.ids[idx], self.names, [self.arrays[i] for i in idx], self.demographics[idx])


TOF_GRID_CHANNELS = [f"tof_{s}_px{p}" for s in range(1, 6) for p in range(64)]
TOF_NO_RESPONSE = 255.0  # beyond the largest distance a ToF pixel reports (249)


def net_inputs_from(prepared: Sequences, channels: pl.DataFrame, tof_grid: bool = False) -> NetInputs:
    """derive()'s output -> per-sequence channel arrays for the nets (same path in training and
    predict); `tof_grid` appends the raw ToF pixels (TOF_GRID_CHANNELS)."""
    names = [c for c in channels.columns if c != "sequence_id"]
    x = channels.select(names).to_numpy().astype(np.float32)
    tof_valid = [names.index(f"tof_{s}_valid") for s in range(1, 6)]
    flags = np.column_stack([~np.isnan(x[:, names.index("thm_mean")]), (~np.isnan(x[:, tof_valid])).any(axis=1)])
    parts = [x, flags.astype(np.float32)]
    names = names + ["mod_present_thm", "mod_present_tof"]
    if tof_grid:
        pixels = prepared.block(TOF_COLS).astype(np.float32)
        parts.append(np.where(pixels < 0, np.float32(TOF_NO_RESPONSE), pixels))
        names += TOF_GRID_CHANNELS
    x = np.hstack(parts)
    sg = Segments.of(channels["sequence_id"].to_numpy())
    arrays = np.split(x, sg.starts[1:]) if len(x) else []
    demo = prepared.meta.select(list(DEFAULT_DEMOGRAPHICS)).to_numpy().astype(np.float32)[sg.starts]
    return NetInputs(channels["sequence_id"].to_numpy()[sg.starts], names, arrays, demo)


# %% [markdown]
# ## 8. Cross-validation folds and training data
#
# Folds are grouped by subject (the test subjects are new people) and stratified by gesture.
# The training data holds, per CV view, the feature table of every sequence; a member that
# finds its fold already in the bundle (same data and config) skips training but still predicts
# its validation rows, so OOF never has holes.

# %%
def make_folds(labels: pl.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold
    n_subjects = labels["subject"].n_unique()
    if n_subjects < n_folds:
        raise DataError(f"train.csv: only {n_subjects} subjects for {n_folds} folds. Fix: lower --folds.")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(labels.height, -1, dtype=np.int64)
    y = labels["gesture"].to_numpy()
    for k, (_, valid) in enumerate(splitter.split(np.zeros(len(y)), y, labels["subject"].to_numpy())):
        folds[valid] = k
    return folds


class StopRequested(Exception):
    """The session's training budget ran out before any member had all its folds: nothing to serve
    yet; the bundle holds every finished fold and a rerun resumes from them."""


class OutOfBudget(Exception):
    """A fold that may not start, or go on, in this session; the message says why."""


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


class TrainingClock:
    """This session's training budget, kept fold by fold over every member. --stop-after-folds counts
    new fold models over all members; --time-budget-hours refuses a fold whose projected end lies
    past the budget. A fold is projected from its member's folds timed before (in this session, or
    by an earlier one, in the fold's meta file); a member's first fold from its own epochs, as they
    pass. Once one fold is refused no other starts, so the session ends soon after."""

    def __init__(self, cfg: Config, now: Callable[[], float] = time.perf_counter) -> None:
        self.now, self.max_folds = now, cfg.stop_after_folds
        self.budget_s = cfg.time_budget_hours * 3600.0 if cfg.time_budget_hours else math.inf
        self.start = self.fold_start = now()
        self.trained = 0
        self.refused: str | None = None  # why no new fold starts any more
        self.fold_seconds: dict[str, list[float]] = {}

    def left(self) -> float:
        return self.budget_s - (self.now() - self.start)

    def timed(self, member: str, seconds: float) -> None:
        """A fold of `member` took `seconds` (trained now, or by an earlier session)."""
        self.fold_seconds.setdefault(member, []).append(float(seconds))

    def projected(self, member: str) -> float | None:
        done = self.fold_seconds.get(member)
        return float(np.mean(done)) if done else None

    def _refuse(self, why: str) -> None:
        self.refused = self.refused or why
        raise OutOfBudget(self.refused)

    def start_fold(self, member: str) -> None:
        """Raise OutOfBudget unless a new fold model of `member` may start now."""
        if self.refused:
            self._refuse(self.refused)
        if self.max_folds and self.trained >= self.max_folds:
            self._refuse(f"--stop-after-folds {self.max_folds}: {self.trained} new fold models trained in this session")
        need, left = self.projected(member), self.left()
        if left <= 0 or (need is not None and need > left):
            self._refuse(f"the time budget: {hours(max(left, 0))} of {hours(self.budget_s)} left, and a {member} "
                         f"fold takes {hours(need) if need is not None else 'longer'}")
        self.fold_start = self.now()

    def epoch_done(self, member: str, epoch: int, epochs: int) -> None:
        """After epoch `epoch` (0-based) of `epochs`: raise OutOfBudget when the fold's epochs so far
        project its last one past the budget (early stopping may end it sooner; it is not counted on)."""
        rest = (self.now() - self.fold_start) / (epoch + 1) * (epochs - epoch - 1)
        if rest > self.left():
            self._refuse(f"the time budget: {hours(max(self.left(), 0))} of {hours(self.budget_s)} left, and "
                         f"this {member} fold needs {hours(rest)} more after epoch {epoch + 1} of {epochs}")

    def end_fold(self, member: str) -> float:
        """The fold model just trained is saved; returns its seconds."""
        seconds = self.now() - self.fold_start
        self.trained += 1
        self.timed(member, seconds)
        return seconds


@dataclass
class NetTargets:
    """What the nets learn besides the gesture: per sequence the body orientation and the starting
    behaviour, and per step whether the gesture is being performed (train.csv's phase column),
    aligned with NetInputs."""
    y: np.ndarray                # gesture index per sequence
    orientation: np.ndarray      # ORIENTATIONS index per sequence
    behavior: np.ndarray         # START_BEHAVIORS index per sequence
    phase: list[np.ndarray]      # (length,) float32 per sequence: 1 in the gesture phase, else 0

    def subset(self, mask: np.ndarray) -> "NetTargets":
        idx = np.flatnonzero(mask)
        return NetTargets(self.y[idx], self.orientation[idx], self.behavior[idx], [self.phase[i] for i in idx])


def net_targets(train: pl.DataFrame, y: np.ndarray) -> NetTargets:
    """The nets' targets from train.csv rows (sorted by sequence_id, sequence_counter, as every
    NetInputs is), with `y`, the gesture index per sequence (TrainingData.y)."""
    labels = sequence_labels(train)
    phase = (train["phase"] == "Gesture").fill_null(False).to_numpy().astype(np.float32)
    return NetTargets(y, label_index(labels["orientation"].to_list(), ORIENTATIONS),
                      label_index(labels["behavior"].to_list(), START_BEHAVIORS),
                      np.split(phase, Segments.of(train["sequence_id"].to_numpy()).starts[1:]))


@dataclass
class TrainingData:
    labels: pl.DataFrame          # sequence_id, subject, gesture, orientation (sorted by id)
    y: np.ndarray                 # gesture index per sequence
    folds: np.ndarray             # fold id per sequence
    views: dict[str, pl.DataFrame]  # feature table per CV view, rows aligned with labels
    fingerprint: str              # hash of the data, for resume and the manifest
    dataset: Dataset              # train_demographics flag the upside-down wearers (when detected)
    upside_down: UpsideDownCheck  # fitted on the training rows; predict() detects test wearers with it
    _inputs: dict[str, "NetInputs"] = field(default_factory=dict)
    _targets: NetTargets | None = None

    def net_targets(self) -> NetTargets:
        """The nets' targets (computed once, shared by every net member)."""
        if self._targets is None:
            self._targets = net_targets(self.dataset.train, self.y)
        return self._targets

    def net_inputs(self, view: str, cfg: Config) -> "NetInputs":
        """Per-timestep inputs of the nets for a CV view (computed once, shared by torch and keras)."""
        if view not in self._inputs:
            train = self.dataset.train if view == "full" else blank_modalities(self.dataset.train)
            inputs = net_inputs_from(*derive(train, self.dataset.train_demographics, cfg), tof_grid=cfg.tof_grid)
            assert inputs.ids.tolist() == self.labels["sequence_id"].to_list()
            self._inputs[view] = inputs
        return self._inputs[view]


def prepare_training_data(ds: Dataset, cfg: Config, out: Path) -> TrainingData:
    labels = sequence_labels(ds.train)
    as_worn = prepare_sequences(ds.train, ds.train_demographics)
    upside_down = UpsideDownCheck.fit(as_worn, dict(zip(labels["sequence_id"], labels["orientation"])))
    if cfg.upside_down_fix:
        turned = upside_down.flagged(as_worn)
        say(f"upside-down wearers: {len(turned)} of {labels['subject'].n_unique()} training subjects "
            f"({', '.join(turned) or 'none'}); their rows are turned back before every model")
        ds = dataclasses.replace(ds, train_demographics=mark_upside_down(ds.train_demographics, turned))
    cache_dir = feature_cache_dir(cfg)
    views = {"full": cached_features(ds.train, ds.train_demographics, cfg, cache_dir, "features, full view"),
             "imu_only": cached_features(blank_modalities(ds.train), ds.train_demographics, cfg, cache_dir,
                                         "features, IMU-only view")}
    for v in views.values():
        assert v["sequence_id"].to_list() == labels["sequence_id"].to_list()
    hashes = sequence_content_hashes(ds.train, ds.train_demographics)
    digest = hashlib.sha1(hashes["_content_hash"].to_numpy().tobytes())
    digest.update("".join(labels["gesture"].to_list()).encode())
    folds = make_folds(labels, cfg.folds, cfg.seed)
    y = label_index(labels["gesture"].to_list(), GESTURES)
    return TrainingData(labels, y, folds, views, digest.hexdigest()[:16], ds, upside_down)


def read_fold_meta(meta_path: Path) -> dict[str, Any]:
    """A fold's meta file (its fingerprint, seed, seconds...), or {} when missing or unreadable."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def bundle_file(member: str, k: int, suffix: str) -> str:
    """The one place bundle file names are made: fold k of a member, directly in the bundle folder
    (lgbm_fold0.txt, torch_fold0.pt, keras_fold0.weights.npz, each with its meta file
    <member>_fold<k>.json). No sub-folders: the kaggle CLI's default upload skips them."""
    return f"{member}_fold{k}{suffix}"


def fold_meta_path(path: Path) -> Path:
    """The meta file beside a fold file: torch_fold0.pt -> torch_fold0.json."""
    return path.parent / f"{path.name.split('.')[0]}.json"


def saved_fold_meta(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The meta file of a fold file in the bundle, when both are there and the meta file (written
    last) names this fingerprint; else None."""
    meta = read_fold_meta(fold_meta_path(path)) if path.exists() else {}
    return meta if meta.get("fingerprint") == fingerprint else None


def fold_splits(folds: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(k, the other folds, fold k) for every fold, in order: the one way every loop below splits."""
    for k in sorted(set(folds.tolist())):
        yield k, folds != k, folds == k


def held_out(folds: np.ndarray, fit_predict: Callable[[int, np.ndarray, np.ndarray], np.ndarray],
             dtype: Any = np.float32) -> np.ndarray:
    """For every fold k: fit on the other folds, predict fold k (`fit_predict(k, other, hold)`); the
    rows of all folds in place. The nested checks, the IMU reference and the slot models use it."""
    out: np.ndarray | None = None
    for k, other, hold in fold_splits(folds):
        part = np.asarray(fit_predict(k, other, hold))
        if out is None:
            out = np.zeros((len(folds), *part.shape[1:]), dtype=dtype)
        out[hold] = part
    assert out is not None
    return out


def settings_fingerprint(cfg: Config, kind: str | None, *parts: Any) -> str:
    """The hash of the Config fields that affect `kind` (a member kind; affected()), or with `kind`
    None of every field that affects anything trained, and of `parts` (data, input names, versions).
    Every field counts unless it opts out (NOTHING_TRAINED)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if (kind in affected(f) if kind else affected(f))}
    return short_hash(fields, recipe_of(kind), *parts)


@dataclass
class Fitted:
    """A fold just trained: what its member's save() writes, the facts for its meta file, and what
    it kept, in words (the fold's log line)."""
    model: Any
    meta: dict[str, Any]
    summary: str  # what the fold kept, in words (its log line)


class Member:
    """One ensemble member: a model family under one config (one --net-variants choice),
    trained fold by fold. The fold loop, the bundle, the proof and serving use only this interface:
    - `training_inputs(td, out)`: per CV view, what its models read of the training sequences
      (sets `names`, the input names the bundle records); `rows(inputs, mask)`: a subset of them;
    - `call_inputs(prepared, channels, cache)`: the same for one predict() call;
    - `fit(k, s, inputs, td, train_mask, valid_mask, log)`: train fold k with its seed s -> Fitted
      (`log`: the per-epoch callback of the nets, epoch_logger);
    - `save(model, path)` / `load(path)`: a fold file in the bundle;
    - `predict(fold, inputs, exact=False)`: every head's output of one fold: "gesture" (n, 18)
      probabilities, and "orientation" (n, 4) and "behavior" (n, 2) where the
      member has those heads; `exact` asks for the device-independent fp32 path (the bundle's proof).
    A member trains `seeds` models per fold (--net-seeds for the nets), one file each, averaged."""
    family = ""     # lgbm, torch or keras
    suffix = ""     # the fold file's suffix
    names_key = ""  # the manifest field that lists its input names

    def __init__(self, name: str, cfg: Config, names: list[str] | None = None) -> None:
        self.name, self.cfg, self.names = name, cfg, list(names or [])

    @property
    def kind(self) -> str:
        """What its fold fingerprint takes from the Config (a field's `affects`)."""
        return self.family

    @property
    def seeds(self) -> int:
        return 1

    def file(self, k: int, s: int = 0) -> str:
        """Fold k's file of seed s (seed 0 keeps the plain name, so a bundle of one seed per fold
        resumes into more seeds)."""
        return bundle_file(self.name, k, (f"_seed{s}" if s else "") + self.suffix)

    def seed(self, k: int, s: int) -> int:
        """The random seed of fold k's seed-s model."""
        return self.cfg.seed + k + 1000 * s

    def fingerprint(self, data_fingerprint: str) -> str:
        """What a saved fold depends on: the data, the input names and this member's settings only."""
        return settings_fingerprint(self.cfg, self.kind, data_fingerprint, self.names, FEATURE_VERSION)

    def check_names(self, bundle: Path, produced: dict[str, list[str]]) -> None:
        """The bundle's input names against what this code makes (produced_names); BundleError if off."""

    def report(self, paths: list[Path], out: Path) -> None:
        """Anything a member writes beside its fold files once all are trained (LightGBM: the importances)."""

    def training_inputs(self, td: "TrainingData", out: Path) -> dict[str, Any]:
        raise NotImplementedError

    def rows(self, inputs: Any, mask: np.ndarray) -> Any:
        raise NotImplementedError

    def call_inputs(self, prepared: Sequences, channels: pl.DataFrame, cache: dict[str, Any]) -> Any:
        raise NotImplementedError

    def fit(self, k: int, s: int, inputs: dict[str, Any], td: "TrainingData", tr: np.ndarray, va: np.ndarray,
            log: Callable[[dict[str, Any]], None]) -> Fitted:
        raise NotImplementedError

    def save(self, model: Any, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path) -> Any:
        raise NotImplementedError

    def predict(self, fold: Any, inputs: Any, exact: bool = False) -> dict[str, np.ndarray]:
        raise NotImplementedError


def epoch_logger(out: Path, family: str, k: int, s: int = 0,
                 after: Callable[[int], None] | None = None) -> Callable[[dict[str, Any]], None]:
    """Per-epoch record of a net: one JSON line in OUT/logs/<family>.jsonl and one printed line;
    then `after(epoch)` (the time budget's check)."""
    path = out / "logs" / f"{family}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    fold = f"{k} seed {s}" if s else str(k)

    def log(rec: dict[str, Any]) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps({"fold": k, "seed": s, **rec}) + "\n")
        loss = rec["loss"] if rec["loss"] is not None else float("nan")
        say(f"  {family} fold {fold} epoch {rec['epoch']:>3}: loss {loss:.3f} full {rec['full']:.4f} "
            f"imu_only {rec['imu_only']:.4f} lr {rec['lr']:.2e} ({rec['seconds']:.1f}s)")
        if after is not None:
            after(rec["epoch"])
    return log


def train_fold(member: Member, k: int, s: int, inputs: dict[str, Any], td: TrainingData, tr: np.ndarray,
               va: np.ndarray, path: Path, fp: str, out: Path, clock: TrainingClock) -> str:
    """Train seed `s` of fold k (when the clock allows: else OutOfBudget) and save it at `path`, its meta
    file last (a fold cut short has none and is retrained); returns its summary (Fitted.summary)."""
    clock.start_fold(member.name)
    fitted = member.fit(k, s, inputs, td, tr, va, epoch_logger(
        out, member.name, k, s, lambda epoch: clock.epoch_done(member.name, epoch, member.cfg.epochs)))
    member.save(fitted.model, path)
    seconds = clock.end_fold(member.name)
    write_json(fold_meta_path(path), {"fingerprint": fp, "seed": member.seed(k, s), **fitted.meta,
                                      "seconds": round(seconds, 2)})
    return fitted.summary


def run_folds(member: Member, td: TrainingData, bundle: Path, out: Path, clock: TrainingClock) -> dict[str, Any]:
    """The fold loop of every member: a fold file the bundle already holds for this data and these
    settings (trained earlier, or by a --workers process) is loaded, any other is trained
    (train_fold) and loaded back, so OOF always comes from the saved files, exactly as a resumed fold
    or predict() sees them, and never has holes. A fold's seeds are averaged. File weights follow
    each fold's validation score (mean of the two views), shared by its seeds. Returns the OOF
    gesture probabilities per view, every head's OOF per view ("heads") and the member's manifest
    entry (files, their weights, input names, fingerprint)."""
    cfg = member.cfg
    inputs = member.training_inputs(td, out)
    fp = member.fingerprint(td.fingerprint)
    bundle.mkdir(parents=True, exist_ok=True)
    heads: dict[str, dict[str, np.ndarray]] = {v: {} for v in VIEWS}
    files, fold_scores = [], []
    y_names = td.labels["gesture"].to_numpy()
    for k, tr, va in progress(fold_splits(td.folds), desc=f"{member.name} folds", total=cfg.folds):
        outputs: dict[str, list[dict[str, np.ndarray]]] = {v: [] for v in VIEWS}
        summaries = []
        for s in range(member.seeds):
            path = bundle / member.file(k, s)
            summary = "resumed from the bundle"
            saved = saved_fold_meta(path, fp)
            if saved is not None:
                if isinstance(saved.get("seconds"), (int, float)):
                    clock.timed(member.name, saved["seconds"])
            else:
                summary = train_fold(member, k, s, inputs, td, tr, va, path, fp, out, clock)
            model = member.load(path)
            for v in VIEWS:
                outputs[v].append(member.predict(model, member.rows(inputs[v], va)))
            files.append(member.file(k, s))
            summaries.append(summary)
        for v in VIEWS:
            for head in outputs[v][0]:
                part = np.mean([o[head] for o in outputs[v]], axis=0)
                heads[v].setdefault(head, np.zeros((len(td.y), part.shape[1]), dtype=np.float32))[va] = part
        scores = {v: score_probabilities(y_names[va], heads[v]["gesture"][va])["metric"] for v in VIEWS}
        fold_scores.append(0.5 * (scores["full"] + scores["imu_only"]))
        seeds = f" ({member.seeds} seeds averaged)" if member.seeds > 1 else ""
        say(f"{member.name} fold {k}: {'; '.join(dict.fromkeys(summaries))}{seeds}; full {scores['full']:.4f}  "
            f"imu_only {scores['imu_only']:.4f}")
    member.report([bundle / f for f in files], out)
    per_file = np.repeat(np.asarray(fold_scores), member.seeds)
    weights = per_file / max(float(np.sum(per_file)), 1e-12)
    entry = {"files": files, "fold_weights": weights.tolist(), member.names_key: member.names, "fingerprint": fp}
    return {"oof": {v: heads[v]["gesture"] for v in VIEWS}, "heads": heads, "entry": entry}


# %% [markdown]
# ## 9. Evaluation: two views of every model
#
# *full*: the validation fold as recorded. *imu_only*: the same fold with every raw thm/tof cell
# nulled (as in the IMU-only half of the test set), then the very feature path predict() runs.
# The expected leaderboard figure is their mean (about half of the hidden test is IMU-only).

# %%
def blend(probas: list[np.ndarray], weights: Iterable[float]) -> np.ndarray:
    """Weighted mean of class-probability tables: the folds of one model, or the models of the ensemble."""
    weights = np.asarray(list(weights), dtype=np.float64)
    out = sum(w * p.astype(np.float64) for w, p in zip(weights, probas))
    return (out / max(float(weights.sum()), 1e-12)).astype(np.float32)


def view_scores(y_true: list[str], proba: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    overall = score_probabilities(y_true, proba)
    y = np.asarray(y_true, dtype=object)
    per_fold = []
    for k in sorted(set(folds.tolist())):
        m = folds == k
        per_fold.append({"fold": int(k), **score_probabilities(y[m], proba[m])})
    return {**overall, "per_fold": per_fold}


def model_report(y_true: list[str], oof: dict[str, np.ndarray], folds: np.ndarray) -> dict[str, Any]:
    rep = {view: view_scores(y_true, oof[view], folds) for view in VIEWS}
    rep["expected_lb"] = 0.5 * (rep["full"]["metric"] + rep["imu_only"]["metric"])
    return rep


def print_cv_table(report: dict[str, Any]) -> None:
    rows = [("model", "view", "metric", "binary_f1", "macro_f1")]
    for name, rep in report["models"].items():
        for view in VIEWS:
            if view in rep:
                r = rep[view]
                rows.append((name, view, f"{r['metric']:.4f}", f"{r['binary_f1']:.4f}", f"{r['macro_f1']:.4f}"))
        if "expected_lb" in rep:
            rows.append((name, "expected LB", f"{rep['expected_lb']:.4f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows))


def print_fold_table(name: str, rep: dict[str, Any]) -> None:
    for view in VIEWS:
        folds = " ".join(f"{f['metric']:.3f}" for f in rep[view]["per_fold"])
        print(f"  {name:<12} {view:<9} folds [{folds}]  overall {rep[view]['metric']:.4f}")


# %% [markdown]
# ## 10. LightGBM
#
# Trained on the aggregate table. Modality dropout adds, for a share of training sequences, a copy
# with every thm/tof/cross-modal feature blanked and presence flags 0, exactly as an IMU-only test
# sequence arrives, so one model serves both halves of the test set. Early stopping watches the
# validation fold in both views.

# %%
class _NativeLogAtDebug:
    """LightGBM's native messages (e.g. a model file from a newer LightGBM naming a parameter this
    one does not know) go to the 'lightgbm' logger at DEBUG instead of straight to stdout."""

    def __init__(self) -> None:
        self.log = logging.getLogger("lightgbm")

    def info(self, message: str) -> None:
        if message.strip():
            self.log.debug(message.rstrip())

    warning = info


def lightgbm() -> Any:
    """lightgbm, imported on first use, its native log routed through Python logging."""
    import lightgbm as lgb
    if not isinstance(getattr(lgb.basic, "_LOGGER", None), _NativeLogAtDebug):
        lgb.register_logger(_NativeLogAtDebug())
    return lgb


def class_weights(y: np.ndarray, mode: str) -> np.ndarray:
    """Per-row weights: 1, or with "balanced" n / (classes present x class count) (scikit-learn's
    rule: a class absent from `y` takes no part, so the weights do not depend on how many classes
    the model could have)."""
    from sklearn.utils.class_weight import compute_sample_weight
    return np.ones(len(y), dtype=np.float64) if mode == "none" else compute_sample_weight("balanced", y)


def lgbm_params(cfg: Config, seed: int, n_rows: int, n_classes: int = len(GESTURES)) -> dict[str, Any]:
    threads = cfg.lgbm_threads or (1 if n_rows < 10_000 else int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    return dict(objective="multiclass", num_class=n_classes, learning_rate=cfg.lgbm_learning_rate,
                **LGBM_PARAMS, max_bin=cfg.lgbm_max_bin,
                seed=seed, deterministic=True,
                force_col_wise=True, num_threads=threads, verbose=-1)


def train_lgbm_fold(cfg: Config, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray,
                    y_va: np.ndarray, names: list[str], seed: int, n_classes: int = len(GESTURES)):
    lgb = lightgbm()
    rng = np.random.default_rng(seed)
    if cfg.lgbm_modality_dropout > 0:
        pick = rng.random(len(x_tr)) < cfg.lgbm_modality_dropout
        x_tr = np.vstack([x_tr, blank_modality_values(x_tr[pick], names)])
        y_tr = np.concatenate([y_tr, y_tr[pick]])
    w_tr = class_weights(y_tr, cfg.lgbm_class_weight)
    train_set = lgb.Dataset(x_tr, y_tr, weight=w_tr, feature_name=names, free_raw_data=True)
    valid_set = lgb.Dataset(x_va, y_va, reference=train_set)
    booster = lgb.train(lgbm_params(cfg, seed, len(x_tr), n_classes), train_set, num_boost_round=cfg.lgbm_rounds,
                        valid_sets=[valid_set],
                        callbacks=[lgb.early_stopping(LGBM_EARLY_STOPPING, verbose=False)])
    return booster


def feature_matrix(table: pl.DataFrame, names: list[str]) -> np.ndarray:
    have = set(table.columns)
    cols = [pl.col(c).cast(pl.Float32) if c in have else pl.lit(None, dtype=pl.Float32).alias(c) for c in names]
    return table.select(cols).to_numpy().astype(np.float32)


def call_table(prepared: Sequences, channels: pl.DataFrame, cache: dict[str, Any], fs: float) -> FeatureTable:
    """One call's aggregate feature table, made once for every reader of it (LightGBM, the slot models)."""
    if "table" not in cache:
        cache["table"] = aggregate_features(prepared, channels, fs)
    return cache["table"]


class LgbmMember(Member):
    """LightGBM on the aggregate table (section 7.2): one booster per fold, saved as its model text.
    Early stopping watches the validation fold in both views."""
    family, suffix, names_key = "lgbm", ".txt", "feature_names"

    def training_inputs(self, td: TrainingData, out: Path) -> dict[str, np.ndarray]:
        self.names = [c for c in td.views["full"].columns if c != "sequence_id"]
        return {v: feature_matrix(td.views[v], self.names) for v in VIEWS}

    def rows(self, inputs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return inputs[mask]

    def call_inputs(self, prepared: Sequences, channels: pl.DataFrame, cache: dict[str, Any]) -> np.ndarray:
        return call_table(prepared, channels, cache, self.cfg.sample_rate_hz).matrix(self.names)

    def fit(self, k: int, s: int, inputs: dict[str, np.ndarray], td: TrainingData, tr: np.ndarray,
            va: np.ndarray, log: Callable[[dict[str, Any]], None]) -> Fitted:
        t0 = time.perf_counter()
        x_va = np.vstack([inputs["full"][va], inputs["imu_only"][va]])
        booster = train_lgbm_fold(self.cfg, inputs["full"][tr], td.y[tr], x_va, np.concatenate([td.y[va], td.y[va]]),
                                  self.names, self.seed(k, s))
        return Fitted(booster, {"best_iteration": booster.best_iteration, "seconds": time.perf_counter() - t0},
                      f"trained {booster.best_iteration} rounds")

    def save(self, model: Any, path: Path) -> None:
        atomic_write(path, lambda p: model.save_model(str(p)))

    def load(self, path: Path) -> Any:
        booster = lightgbm().Booster(model_file=str(path))
        if self.names and booster.feature_name() != self.names:
            got, want = booster.feature_name(), self.names
            i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise BundleError(f"{path}: the booster's features differ from manifest.json's members.lgbm."
                              f"feature_names ({len(got)} vs {len(want)} names; first difference at position {i}). "
                              f"Fix: retrain the bundle, or restore the file and manifest written together.")
        return booster

    def predict(self, fold: Any, inputs: np.ndarray, exact: bool = False) -> dict[str, np.ndarray]:
        # A predict() call's single row gains nothing from threads (docs/DECISIONS.md, serving speed).
        threads = {"num_threads": 1} if len(inputs) < 64 else {}
        p = fold.predict(inputs, num_iteration=fold.best_iteration or None, **threads)
        return {"gesture": p.astype(np.float32)}

    def check_names(self, bundle: Path, produced: dict[str, list[str]]) -> None:
        unknown = [c for c in self.names if c not in set(produced["features"])]
        if unknown:
            raise BundleError(f"{bundle}/manifest.json: the {self.name} models expect features this code does not "
                              f"produce (e.g. {unknown[:2]}). Fix: retrain the bundle with this notebook version.")

    def report(self, paths: list[Path], out: Path) -> None:
        gain = np.mean([self.load(p).feature_importance("gain") for p in paths], axis=0)
        imp = pl.DataFrame({"feature": self.names, "gain": gain}).sort("gain", descending=True)
        atomic_write(out / "feature_importance.csv", lambda p: imp.write_csv(p))


def imu_feature_names(table: pl.DataFrame) -> list[str]:
    """The aggregate features that exist without thermopiles and ToF (what the slot models read)."""
    return [c for c in table.columns if c != "sequence_id" and c not in set(modality_columns(table.columns))]


# %% [markdown]
# ## 11. Sequence inputs for the neural nets
#
# The nets read the per-row channels of section 7 (IMU physics; thermopile and ToF summaries; with
# `--tof-grid` the raw ToF pixels too) plus two per-row presence flags, standardised with
# statistics fitted on the training folds only (they travel in the checkpoint) and with missing
# values set to 0 *after* scaling. Modality dropout nulls the unscaled thm/tof channels and zeroes
# the flags, which is exactly what raw IMU-only rows produce, so training, the imu_only CV view
# and predict() all see the same thing. The Keras twin
# reads the very same arrays. What a net reads travels with each fold in its `InputScaler`: the
# last `--max-len` steps (the gesture is at the end) and its channels: all of them, or for an
# IMU-only variant (`--net-variants imu`, members `torch_imu`, `keras_imu`) the IMU ones alone.

# %%
def last_steps(x: np.ndarray, max_len: int) -> np.ndarray:
    """The last `max_len` rows of a sequence (all when 0): the gesture sits at the end."""
    return x[-max_len:] if 0 < max_len < len(x) else x


def input_columns(names: list[str], variant: str) -> np.ndarray:
    """The channels a net of `variant` reads: all, or (imu) those that exist without thm/tof."""
    if variant == "all":
        return np.arange(len(names))
    if variant == "imu":
        values, flags = modality_masks(names)
        return np.flatnonzero(~values & ~flags)
    raise ValueError(f"--net-variants: unknown {variant!r}; choose from {NET_VARIANTS}")


TOF_GRID_DIM = 32  # per-step embedding of the five ToF grids (--tof-grid)


def tof_grid_pixels(cfg: Config) -> int:
    """How many trailing input channels of a net under `cfg` are raw ToF pixels (--tof-grid; an
    IMU-only variant reads none)."""
    return len(TOF_GRID_CHANNELS) if cfg.tof_grid and cfg.net_variants == ("all",) else 0


@dataclass
class InputScaler:
    """What a net reads of a sequence: its last `max_len` steps (0 = all), the channels `columns`
    (all, or the IMU ones for an IMU-only variant), standardised with statistics fitted on the
    training sequences; missing values become 0 after scaling. It travels with every fold."""
    mean: np.ndarray
    std: np.ndarray
    demo_mean: np.ndarray
    demo_std: np.ndarray
    columns: np.ndarray
    max_len: int = 0

    @classmethod
    def fit(cls, inputs: NetInputs, columns: np.ndarray, max_len: int) -> "InputScaler":
        x = np.vstack([last_steps(a, max_len)[:, columns] for a in inputs.arrays]).astype(np.float64)
        with _quiet_nan_warnings():
            mean, std = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
        mean, std = np.nan_to_num(mean), np.where(np.nan_to_num(std) > 1e-6, np.nan_to_num(std), 1.0)
        d = inputs.demographics.astype(np.float64)
        return cls(mean.astype(np.float32), std.astype(np.float32), d.mean(0).astype(np.float32),
                   np.where(d.std(0) > 1e-6, d.std(0), 1.0).astype(np.float32), np.asarray(columns), int(max_len))

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = last_steps(x, self.max_len)[:, self.columns]
        return np.nan_to_num((x - self.mean) / self.std, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    def transform_demographics(self, d: np.ndarray) -> np.ndarray:
        return np.nan_to_num((d - self.demo_mean) / self.demo_std).astype(np.float32)

    def state(self) -> dict[str, Any]:
        return {**{k: getattr(self, k).tolist() for k in ("mean", "std", "demo_mean", "demo_std", "columns")},
                "max_len": self.max_len}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "InputScaler":
        arrays = {k: np.asarray(state[k], dtype=np.float32) for k in ("mean", "std", "demo_mean", "demo_std")}
        return cls(**arrays, columns=np.asarray(state["columns"], dtype=np.int64),
                   max_len=int(np.asarray(state["max_len"])))


def pad_batch(arrays: list[np.ndarray], channels: int, min_len: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence: (batch, time, channels) float32 and lengths."""
    lengths = np.array([max(len(a), 1) for a in arrays], dtype=np.int64)
    out = np.zeros((len(arrays), max(int(lengths.max(initial=1)), min_len), channels), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return out, lengths


def scaled_batch(arrays: list[np.ndarray], demo: np.ndarray, scaler: InputScaler) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unscaled sequences -> what a net reads: (batch, time, channels) scaled and right-padded, the
    lengths, the scaled demographics. Training, OOF and predict() of both frameworks go through it."""
    x, lengths = pad_batch([scaler.transform(a) for a in arrays], len(scaler.mean))
    return x, lengths, scaler.transform_demographics(demo)


class NetFold(NamedTuple):
    """A net's fold as it predicts: the model (a torch module, or a Keras model in its tf.function)
    and the InputScaler it was trained with."""
    model: Any
    scaler: InputScaler


class NetMember(Member):
    """What the two nets share as members: per-step inputs (NetInputs, computed once per view for
    both), their channel names checked against this code's, the nets' targets, and --net-seeds."""
    names_key = "channel_names"

    @property
    def seeds(self) -> int:
        return self.cfg.net_seeds

    def training_inputs(self, td: "TrainingData", out: Path) -> dict[str, NetInputs]:
        inputs = {v: td.net_inputs(v, self.cfg) for v in VIEWS}
        self.names = inputs["full"].names
        return inputs

    def rows(self, inputs: NetInputs, mask: np.ndarray) -> NetInputs:
        return inputs.subset(mask)

    def call_inputs(self, prepared: Sequences, channels: pl.DataFrame, cache: dict[str, Any]) -> NetInputs:
        if "inputs" not in cache:
            cache["inputs"] = net_inputs_from(prepared, channels, self.cfg.tof_grid)
        return cache["inputs"]

    def heads(self, fold: NetFold, inputs: NetInputs, exact: bool) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def predict(self, fold: NetFold, inputs: NetInputs, exact: bool = False) -> dict[str, np.ndarray]:
        out = self.heads(fold, inputs, exact)
        return out if self.cfg.net_aux_heads else {"gesture": out["gesture"]}  # an untrained head says nothing

    def check_names(self, bundle: Path, produced: dict[str, list[str]]) -> None:
        if self.names != produced["channels"]:
            unknown = [c for c in self.names if c not in set(produced["channels"])] or self.names
            raise BundleError(f"{bundle}/manifest.json: the {self.name} models expect channel names this code "
                              f"does not produce in that order (e.g. {unknown[:2]}). Fix: retrain the bundle "
                              f"with this notebook version.")


def length_buckets(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of similar length (little padding); batch order shuffled when rng is given."""
    order = np.argsort(lengths + (rng.random(len(lengths)) * 8 if rng is not None else 0), kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def heads_in_buckets(inputs: NetInputs, batch_heads: Callable[[list[np.ndarray], np.ndarray], dict[str, np.ndarray]],
                     batch_size: int = 64) -> dict[str, np.ndarray]:
    """A net's per-sequence outputs for every sequence of `inputs`, computed in batches of similar
    length (both frameworks): `batch_heads(arrays, demographics)` gives {head: (batch, k)}."""
    lengths = np.array([len(a) for a in inputs.arrays])
    out: dict[str, np.ndarray] = {}
    for idx in length_buckets(lengths, batch_size, None):
        for k, v in batch_heads([inputs.arrays[i] for i in idx], inputs.demographics[idx]).items():
            out.setdefault(k, np.zeros((len(lengths), v.shape[1]), dtype=np.float32))[idx] = v
    return out


def training_buckets(lengths: np.ndarray, cfg: Config, rng: np.random.Generator) -> list[np.ndarray]:
    """One training epoch's batches (both frameworks), bucketed by the length a net reads."""
    return length_buckets(np.minimum(lengths, cfg.max_len or lengths.max(initial=1)), NET_RECIPE["batch_size"], rng)


# %% [markdown]
# ## 12. The nets' training recipe (both frameworks)
#
# What the two nets (section 13, PyTorch; section 14, the Keras twin) share, so that they differ in
# their framework and nothing else: how their heads combine into 18 gesture probabilities, the
# augmentations, the batches, the per-step phase targets, the learning-rate schedule and early
# stopping. AdamW, linear warmup then cosine decay stepped per batch, gradient clipping, label
# smoothing, a fixed number of epochs with the last (EMA) weights kept (or early stopping on the
# validation metric with `--net-patience N`), length-bucketed batches, and seeded augmentations each
# with its own probability. The augmentations keep the derived channels physically consistent: a
# turned device mount turns every device-frame vector and the orientation quaternion together
# (world-frame channels stay), accelerometer drift shows in the world frame too, and a time stretch
# divides the per-step rates. Both frameworks train on the very same batches (`training_batch`).

# %%
SEQUENCE_HEADS = ("orientation", "behavior")  # the nets' per-sequence heads besides the gesture
AUX_HEADS = (*SEQUENCE_HEADS, "phase")  # training_batch's targets after the gesture; --net-aux-weights' order
NET_LOGITS = ("y18", "y9", "y2", *SEQUENCE_HEADS)  # the PyTorch nets' per-sequence logits


def combine_heads(y18: np.ndarray, y9: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """18-class probabilities from the three heads (logits): each head's view of a gesture is
    spread over the 18 names in proportion to the main head, and the three are averaged."""
    from scipy.special import softmax
    p18 = softmax(y18, axis=1)
    p9 = softmax(y9, axis=1)
    pt = 1.0 / (1.0 + np.exp(-y2))[:, None]
    is_t = TARGET_MASK
    nt_share = np.where(is_t, 0.0, p18) / np.maximum(np.where(is_t, 0.0, p18).sum(1, keepdims=True), 1e-12)
    t_share = np.where(is_t, p18, 0.0) / np.maximum(np.where(is_t, p18, 0.0).sum(1, keepdims=True), 1e-12)
    from9 = np.where(is_t, p9[:, TARGET_INDEX_9], p9[:, [len(TARGET_GESTURES)]] * nt_share)
    from2 = np.where(is_t, pt * t_share, (1 - pt) * nt_share)
    out = (p18 + from9 + from2) / 3.0
    return (out / out.sum(1, keepdims=True)).astype(np.float32)


def net_outputs(logits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A PyTorch net's per-sequence logits -> what its member predicts: "gesture" (the three gesture
    heads combined), "orientation" and "behavior" probabilities."""
    from scipy.special import softmax
    return {"gesture": combine_heads(logits["y18"], logits["y9"], logits["y2"]),
            **{k: softmax(logits[k], axis=1) for k in SEQUENCE_HEADS}}


DEVICE_FRAME_TRIPLETS = [("acc_x", "acc_y", "acc_z"), ("lin_x", "lin_y", "lin_z"),
                         ("grav_x", "grav_y", "grav_z"), ("ang_vel_x", "ang_vel_y", "ang_vel_z")]


QUAT_CHANNELS = ["rot_w", "rot_x", "rot_y", "rot_z"]


# Per-step rates: a gesture played f times slower turns, warms and jerks f times slower.
RATE_CHANNELS = ["ang_vel_x", "ang_vel_y", "ang_vel_z", "ang_vel_mag", "ang_dist", "jerk_mag", "thm_trend"]


def _small_rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    """A unit quaternion about a random axis, angle ~ N(0, degrees)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    half = np.deg2rad(rng.normal(0, degrees)) / 2
    return np.array([np.cos(half), *(np.sin(half) * axis)])


def stretch_time(x: np.ndarray, names: list[str], factor: float) -> np.ndarray:
    """The sequence resampled to `factor` times its length (a slower or faster gesture), rate
    channels divided by the factor. NaN stays NaN where either neighbour is missing."""
    n, n_new = len(x), max(4, int(round(len(x) * factor)))
    src = np.linspace(0, n - 1, n_new)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = (src - lo)[:, None].astype(np.float32)
    x = x[lo] * (1 - frac) + x[hi] * frac
    rates = [names.index(c) for c in RATE_CHANNELS if c in names]
    x[:, rates] /= np.float32(n_new / n)
    return x


def turn_device_frame(x: np.ndarray, names: list[str], r: np.ndarray, drift: np.ndarray) -> np.ndarray:
    """The sequence as a device mounted turned by quaternion `r` (device' = r device) with an
    accelerometer bias `drift` (n, 3) reports it: device-frame vectors turn, the orientation becomes
    q r*, so every world-frame channel is unchanged except for the bias seen in the world."""
    x = x.copy()
    idx = {c: i for i, c in enumerate(names)}
    for trip in DEVICE_FRAME_TRIPLETS:
        cols = [idx[c] for c in trip]
        x[:, cols] = quat_rotate(r, x[:, cols].astype(np.float64))
    q = quat_multiply(x[:, [idx[c] for c in QUAT_CHANNELS]].astype(np.float64), quat_conjugate(r))
    x[:, [idx[c] for c in QUAT_CHANNELS]] = q
    x[:, idx["rot_angle"]] = 2.0 * np.arccos(np.clip(np.abs(q[:, 0]), 0.0, 1.0))
    acc, lin, world = ([idx[f"{p}_{a}"] for a in "xyz"] for p in ("acc", "lin", "lin_world"))
    x[:, acc] += drift
    x[:, lin] += drift
    x[:, world] += quat_rotate(q, drift.astype(np.float64))
    x[:, idx["acc_mag"]] = np.linalg.norm(x[:, acc], axis=1)
    x[:, idx["lin_mag"]] = np.linalg.norm(x[:, world], axis=1)
    return x


def augment_sequence(x: np.ndarray, names: list[str], cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """Augmentations on one unscaled sequence, each physically consistent across the derived
    channels: modality dropout, time stretch, a turned device mount with accelerometer drift. The
    ones that act on scaled batches live in augment_scaled_batch."""
    if rng.random() < NET_RECIPE["modality_dropout"]:
        x = blank_modality_values(x, names)
    if rng.random() < AUGMENTATIONS["time_stretch"] and len(x) > 4:
        x = stretch_time(x, names, rng.uniform(0.8, 1.2))
    if rng.random() < AUGMENTATIONS["rotation"]:
        drift = rng.normal(0, 0.3, 3) * np.linspace(0, 1, len(x))[:, None]
        x = turn_device_frame(x, names, _small_rotation(rng, 10.0), drift)
    return x.astype(np.float32)


def augment_scaled_batch(x: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian jitter, time masking and feature masking on a scaled (batch, time, ch) array, the
    padding kept at zero (both frameworks train on it)."""
    b, t, c = x.shape
    coin = lambda p: rng.random(b) < p  # noqa: E731
    jit = coin(AUGMENTATIONS["jitter"])
    if jit.any():
        x = x + (jit[:, None, None] * 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
    for i in np.flatnonzero(coin(AUGMENTATIONS["time_mask"])):
        span = max(1, int(lengths[i] * 0.1))
        start = int(rng.random() * max(lengths[i] - span, 1))
        x[i, start:start + span] = 0.0
    fm = coin(AUGMENTATIONS["feature_mask"])
    if fm.any():
        x = x * ~((rng.random((b, c)) < 0.1) & fm[:, None])[:, None, :]
    return (x * (np.arange(t)[None, :, None] < lengths[:, None, None])).astype(np.float32)


def mixup(rng: np.random.Generator, x: np.ndarray, lengths: np.ndarray, *rest: np.ndarray) -> list[np.ndarray]:
    """Mixup of a batch with a shuffled copy of itself (Beta(0.4, 0.4)): inputs, demographics and
    every target alike; the mixed sequence keeps the longer of the two lengths."""
    lam = float(rng.beta(0.4, 0.4))
    perm = rng.permutation(len(x))
    mix = lambda a: (lam * a + (1 - lam) * a[perm]).astype(np.float32)  # noqa: E731
    return [mix(x), np.maximum(lengths, lengths[perm]), *(mix(a) for a in rest)]


def soft_targets(y: np.ndarray, smoothing: float) -> np.ndarray:
    out = np.full((len(y), len(GESTURES)), smoothing / len(GESTURES), dtype=np.float32)
    out[np.arange(len(y)), y] += 1.0 - smoothing
    return out


def training_batch(tr: NetInputs, targets: NetTargets, idx: np.ndarray, scaler: InputScaler, cfg: Config,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """One augmented training batch: x, lengths, demographics and the soft targets (gesture,
    orientation, starting behaviour, per-step phase). The phase rides along as one more column through the per-sequence
    augmentations and the crop, so it stays aligned with the steps."""
    names = [*tr.names, "aux_phase"]
    arrays = [last_steps(augment_sequence(np.column_stack([tr.arrays[i], targets.phase[i]]), names, cfg, rng),
                         scaler.max_len) for i in idx]
    x, lengths, demo = scaled_batch([a[:, :-1] for a in arrays], tr.demographics[idx], scaler)
    phase = np.zeros(x.shape[:2], dtype=np.float32)
    for row, a in enumerate(arrays):
        phase[row, :len(a)] = a[:, -1]
    batch = [augment_scaled_batch(x, lengths, rng), lengths, demo,
             soft_targets(targets.y[idx], NET_RECIPE["label_smoothing"]),
             np.eye(len(ORIENTATIONS), dtype=np.float32)[targets.orientation[idx]],
             np.eye(len(START_BEHAVIORS), dtype=np.float32)[targets.behavior[idx]],
             phase]
    if rng.random() < AUGMENTATIONS["mixup"] and len(idx) > 1:
        batch = mixup(rng, *batch)
    return batch


def phase_targets(phase: np.ndarray, lengths: np.ndarray, stride: int, steps: int | None = None) -> np.ndarray:
    """Per-step phase targets (batch, steps) at a net's phase-head resolution, one step per `stride`
    input steps: the mean of the steps it covers, valid only when every one of them is (as the nets
    pool their padding masks); -1 marks the rest. `steps` (default: what `phase` covers) is longer
    when the net's input was padded further (Keras pads to KERAS_BUCKET). Both nets train on it."""
    steps = phase.shape[1] // stride if steps is None else steps
    p = np.full((len(phase), steps * stride), -1.0, dtype=np.float32)
    n = min(phase.shape[1], steps * stride)
    p[:, :n] = np.where(np.arange(n)[None, :] < lengths[:, None], phase[:, :n], -1.0)
    windows = p.reshape(len(p), steps, stride)
    return np.where((windows >= 0).all(-1), windows.mean(-1), -1.0).astype(np.float32)


def lr_factors(cfg: Config, steps_per_epoch: int) -> list[float]:
    """The learning rate of every optimiser step as a share of the peak, the one schedule of both
    frameworks: linear warmup over NET_RECIPE's warmup epochs (leaving at least the last epoch to the
    decay), then cosine to zero at the last step, which any later step keeps."""
    total = steps_per_epoch * cfg.epochs
    warmup = steps_per_epoch * min(NET_RECIPE["warmup_epochs"], max(cfg.epochs - 1, 0))
    return [(step + 1) / max(warmup, 1) if step < warmup else
            0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))
            for step in range(total + 1)]


class EarlyStopping:
    """The best epoch so far on the validation metric (with a snapshot of the model then), and
    whether patience has run out; with patience 0, simply the last epoch. The torch nets and the
    Keras twin share it."""

    def __init__(self, patience: int) -> None:
        self.patience, self.left = patience, patience
        self.score, self.epoch, self.snapshot = -1.0, -1, None

    def update(self, epoch: int, score: float, snapshot: Callable[[], Any]) -> bool:
        """Record an epoch's score; True when training should stop."""
        if self.patience <= 0:
            self.score, self.epoch, self.snapshot = score, epoch, snapshot()
            return False
        if score > self.score:
            self.score, self.epoch, self.snapshot = score, epoch, snapshot()
            self.left = self.patience
            return False
        self.left -= 1
        return self.left <= 0


def kept_epoch(cfg: Config, epoch: int) -> str:
    """What a fold kept, in words (the log line after its training)."""
    if cfg.net_patience <= 0:
        return f"trained {epoch + 1} epochs, kept the last"
    return f"trained, kept epoch {epoch + 1} (the best validation score; patience {cfg.net_patience})"


def view_metrics(views_va: dict[str, NetInputs], y_va: np.ndarray,
                 proba_of: Callable[[NetInputs], np.ndarray]) -> dict[str, float]:
    """The competition metric of a net on each CV view of the validation fold, and their mean."""
    names = [GESTURES[i] for i in y_va]
    scores = {view: score_probabilities(names, proba_of(va))["metric"] for view, va in views_va.items()}
    return {**scores, "score": float(np.mean(list(scores.values())))}


# %% [markdown]
# ## 13. PyTorch net: CNN-BiGRU-attention
#
# Residual Conv1D blocks with squeeze-excitation and max-pooling, a bidirectional GRU fed through
# `pack_padded_sequence` (padding never enters the recurrence), masked attention pooling (padding
# gets zero weight), a demographics embedding, and three gesture heads: 18 gestures (main),
# 9 classes (8 targets + non-target) and target-vs-not, combined by learnable uncertainty
# weights (Kendall & Gal 2018). Auxiliary heads learn what train.csv says beyond the gesture: per
# sequence the body orientation and the starting behaviour (the per-subject assignment of 15.1 can
# read both), and, on the BiGRU output, the gesture phase (per step); with
# `--torch-phase-pool` that phase head also weights two extra pools (gesture steps, transition
# steps) beside the attention pool, as the 2nd place solution did. Padding is re-zeroed after every
# convolution, so a sequence's output does not depend on how much padding its batch adds. With
# `--tof-grid` a `GridEncoder` first turns each valid step's five raw 8x8 ToF grids into a small
# embedding (two 3x3 convolutions with max-pooling, shared across steps), in place of the pixels.

# %%
# Busy-waiting OpenMP threads slow LightGBM and torch ~100x when another process holds a core: the
# policy must be in place before the first OpenMP runtime loads, and importing torch loads one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import torch  # noqa: E402


from torch import nn  # noqa: E402


from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402


def cuda_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a PyTorch build with kernels for `arch_list` (torch.cuda.get_arch_list(), e.g.
    ['sm_75', 'sm_80', 'compute_90']) runs on a GPU of compute `capability`: a cubin runs on its
    major version with an equal or higher minor, PTX (compute_XY) on any GPU at or above it."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


@functools.cache
def torch_device() -> str:
    """The one place that picks the device, once: CUDA when present and supported by the installed
    build, else CPU. A build without kernels for the GPU (Kaggle's current builds have none for the
    P100, sm_60) would fail at the first CUDA call, so the nets then train and serve on the CPU and
    say so once."""
    if torch.cuda.is_available():
        cap, archs = torch.cuda.get_device_capability(0), torch.cuda.get_arch_list()
        if cuda_supported(cap, archs):
            return "cuda"
        LOG.warning("torch: GPU %s (compute %d.%d) is not supported by this PyTorch build "
                    "(kernels for %s); the nets run on the CPU. Fix: on Kaggle choose the "
                    "T4 x2 accelerator (the P100 has no kernels in current builds).",
                    torch.cuda.get_device_name(0), cap[0], cap[1], ", ".join(archs) or "none")
    return "cpu"


def torch_precision(cfg: Config, device: str) -> str:
    """fp16 autocast (+GradScaler) on CUDA; on CPU fp32 unless bf16 is asked for (docs/DECISIONS.md,
    precision)."""
    if cfg.torch_precision != "auto":
        return cfg.torch_precision
    return "fp16" if device == "cuda" else "fp32"


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, reduction: int = 8) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(ch, max(ch // reduction, 4)), nn.ReLU(),
                                nn.Linear(max(ch // reduction, 4), ch), nn.Sigmoid())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(1).to(x.dtype)
        pooled = (x * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return x * self.fc(pooled).unsqueeze(-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, dropout: float) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(cin, cout, kernel, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, kernel, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.short = nn.Conv1d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.se = SqueezeExcite(cout)
        self.pool = nn.MaxPool1d(2)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.unsqueeze(1).to(x.dtype)
        h = torch.relu(self.bn1(self.conv1(x))) * m                 # (batch, cout, time)
        h = self.bn2(self.conv2(h)) * m
        h = torch.relu(self.se(h, mask) + self.short(x)) * m
        h = self.pool(h)                                             # (batch, cout, time // 2)
        mask = mask[:, : h.shape[-1] * 2 : 2] & mask[:, 1 : h.shape[-1] * 2 : 2]  # valid when both were
        return self.drop(h) * mask.unsqueeze(1).to(h.dtype), mask


class MaskedAttentionPool(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.Tanh(), nn.Linear(dim // 2, 1))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.score(h).squeeze(-1).float().masked_fill(~mask, float("-inf"))  # (batch, time)
        w = torch.softmax(s, dim=1).to(h.dtype)
        return (h * w.unsqueeze(-1)).sum(1)                                      # (batch, dim)


class Heads(nn.Module):
    """+ demographics embedding -> dense trunk -> 18 / 9 / binary gesture logits and the
    orientation / behaviour logits."""

    def __init__(self, dim: int, n_demo: int, dropout: float) -> None:
        super().__init__()
        self.demo = nn.Sequential(nn.Linear(n_demo, 16), nn.ReLU())
        self.trunk = nn.Sequential(nn.Linear(dim + 16, 256), nn.ReLU(), nn.Dropout(dropout))
        self.head18 = nn.Linear(256, len(GESTURES))
        self.head9 = nn.Linear(256, len(TARGET_GESTURES) + 1)
        self.head2 = nn.Linear(256, 1)
        self.head_orientation = nn.Linear(256, len(ORIENTATIONS))
        self.head_behavior = nn.Linear(256, len(START_BEHAVIORS))

    def forward(self, z: torch.Tensor, demo: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.cat([z, self.demo(demo.to(z.dtype))], dim=1)      # (batch, dim + 16)
        z = self.trunk(z)                                           # (batch, 256)
        # logits: y18 (batch, 18), y9 (batch, 9), y2 (batch,), orientation (batch, 4), behavior (batch, 2)
        return {"y18": self.head18(z), "y9": self.head9(z), "y2": self.head2(z).squeeze(-1),
                "orientation": self.head_orientation(z), "behavior": self.head_behavior(z)}


def time_mask(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None].to(x.device)


class GridEncoder(nn.Module):
    """--tof-grid: the last `pixels` input channels (five 8x8 ToF grids) of every valid step
    through a small 2D CNN shared across steps, replaced by its TOF_GRID_DIM embedding; the other
    channels pass through. Padded steps stay zero. Without pixels it is the identity."""

    def __init__(self, in_ch: int, pixels: int) -> None:
        super().__init__()
        self.pixels = pixels
        self.out_ch = in_ch - pixels + (TOF_GRID_DIM if pixels else 0)
        if pixels:
            self.cnn = nn.Sequential(nn.Conv2d(pixels // 64, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Flatten(), nn.Linear(128, TOF_GRID_DIM), nn.ReLU())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.pixels:
            return x
        plain, grid = x[..., :-self.pixels], x[..., -self.pixels:]
        e = self.cnn(grid[mask].reshape(-1, self.pixels // 64, 8, 8)).to(plain.dtype)
        out = plain.new_zeros(*mask.shape, TOF_GRID_DIM)
        out[mask] = e
        return torch.cat([plain, out], dim=-1)


class GestureNet(nn.Module):
    """CNN -> packed BiGRU -> masked attention (+ phase-weighted pools) -> heads, and a per-step
    phase head on the BiGRU output (one step per `phase_stride` input steps)."""

    def __init__(self, in_ch: int, n_demo: int, conv: tuple[int, ...], hidden: int, dropout: float,
                 phase_pool: bool, grid_pixels: int = 0) -> None:
        super().__init__()
        self.frame = GridEncoder(in_ch, grid_pixels)
        chans = [self.frame.out_ch, *conv]
        self.blocks = nn.ModuleList([ResBlock(a, b, 3, dropout) for a, b in zip(chans[:-1], chans[1:])])
        self.gru = nn.GRU(chans[-1], hidden, batch_first=True, bidirectional=True)
        self.pool = MaskedAttentionPool(2 * hidden)
        self.phase_head = nn.Linear(2 * hidden, 1)
        self.phase_pool = phase_pool
        self.phase_stride = 2 ** len(conv)
        self.heads = Heads(2 * hidden * (3 if phase_pool else 1), n_demo, dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, demo: torch.Tensor,
                packed: bool = True) -> dict[str, torch.Tensor]:
        mask = time_mask(x, lengths)                          # x (batch, time, in_ch), mask (batch, time)
        x = self.frame(x, mask)                               # (batch, time, frame.out_ch)
        h = x.transpose(1, 2) * mask.unsqueeze(1).to(x.dtype)
        for block in self.blocks:
            h, mask = block(h, mask)                          # (batch, conv[i], time / 2^(i+1))
        h = h.transpose(1, 2)                                 # (batch, steps, conv[-1])
        lens = mask.sum(1).clamp(min=1)
        mask = time_mask(h, lens)
        # Packing only matters when some row is padded (a single sequence never is).
        if packed and bool((lens < h.shape[1]).any()):
            pk = pack_padded_sequence(h, lens.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.gru(pk)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])
        else:
            out, _ = self.gru(h)                              # (batch, steps, 2 * hidden)
        phase = self.phase_head(out).squeeze(-1)              # (batch, steps) logits
        z = self.pool(out, mask)                              # (batch, 2 * hidden)
        if self.phase_pool:  # mean over the steps the phase head calls gesture, and over the rest
            p = torch.sigmoid(phase.float()) * mask
            parts = [z]
            for w in (p, (1 - p) * mask):
                parts.append((out.float() * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-3))
            z = torch.cat([parts[0], parts[1].to(z.dtype), parts[2].to(z.dtype)], dim=1)  # (batch, 6 * hidden)
        return {**self.heads(z, demo), "phase": phase, "phase_mask": mask}


class UncertaintyWeights(nn.Module):
    """loss = sum_i exp(-s_i) L_i + s_i with learnable, clamped s_i (Kendall & Gal 2018)."""

    def __init__(self, n: int, clamp: float = 4.0) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(n))
        self.clamp = clamp

    def forward(self, losses: list[torch.Tensor]) -> torch.Tensor:
        s = self.s.clamp(-self.clamp, self.clamp)
        return sum(torch.exp(-s[i]) * l + s[i] for i, l in enumerate(losses))


def build_torch_model(cfg: Config, in_ch: int) -> Any:
    return GestureNet(in_ch, len(DEFAULT_DEMOGRAPHICS), cfg.net_conv, cfg.net_hidden, NET_RECIPE["dropout"],
                      cfg.torch_phase_pool, tof_grid_pixels(cfg))


# %% [markdown]
# ### 13.1 Training a PyTorch fold
#
# The recipe of section 12 in PyTorch. `train_torch_fold` is the whole fold on one screen: the epoch
# loop and, inside it, the step: autocast in the fold's precision, the uncertainty-weighted gesture
# losses plus the weighted auxiliary ones, GradScaler, clipping, the schedule and the EMA of the
# weights. A non-finite loss skips its step and is counted; after a few the fold falls back to fp32
# and says so.

# %%
def to_torch(batch: Iterable[np.ndarray], device: str) -> list[Any]:
    """numpy batch -> tensors on `device`; integer arrays (the lengths) stay on the CPU, where
    pack_padded_sequence wants them."""
    return [torch.from_numpy(a) if a.dtype.kind == "i" else torch.from_numpy(a).to(device) for a in batch]


def torch_batch(arrays: list[np.ndarray], demo: np.ndarray, scaler: InputScaler, device: str) -> list[Any]:
    """(x, lengths, demographics) tensors of a batch of unscaled sequences, for inference."""
    return to_torch(scaled_batch(arrays, demo, scaler), device)


def torch_heads(fold: NetFold, inputs: NetInputs, batch_size: int = 64, packed: bool = True,
                fp32: bool = False) -> dict[str, np.ndarray]:
    """One fold's heads for every sequence of `inputs`: "gesture" (n, 18) from the three gesture
    heads, "orientation" (n, 4), "behavior" (n, 2). Eval mode, no grad; fp16
    autocast on CUDA unless `fp32`, which the bundle's proof uses so that it holds on any device."""
    model, scaler = fold
    device = next(model.parameters()).device.type
    model.eval()

    def batch_heads(arrays: list[np.ndarray], demo: np.ndarray) -> dict[str, np.ndarray]:
        xb, lb, db = torch_batch(arrays, demo, scaler, device)
        with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=device == "cuda" and not fp32):
            o = model(xb, lb, db, packed=packed)
        return net_outputs({k: o[k].float().cpu().numpy() for k in NET_LOGITS})
    return heads_in_buckets(inputs, batch_heads, batch_size)


def head_losses(o: dict[str, Any], yb: Any, to9: Any, is_target: Any,
                aux: dict[str, Any] | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Cross-entropy of the 18-class and 9-class heads and the target-vs-not BCE against soft
    targets; with the auxiliary targets `aux` (AUX_HEADS), the orientation and behaviour
    cross-entropies and the per-step phase BCE against phase_targets() (its -1 steps, padding, left
    out). Returns (the three gesture losses, the auxiliary losses by head)."""
    func = torch.nn.functional
    soft_ce = lambda logits, target: -(target * torch.log_softmax(logits.float(), 1)).sum(1).mean()  # noqa: E731
    l2 = func.binary_cross_entropy_with_logits(o["y2"].float(), (yb * is_target).sum(1).clamp(0, 1))
    gesture = [soft_ce(o["y18"], yb), soft_ce(o["y9"], yb @ to9), l2]
    extra = {k: soft_ce(o[k], aux[k]) for k in SEQUENCE_HEADS} if aux else {}
    if aux and "phase" in o:
        m = (aux["phase"] >= 0).float()
        per_step = func.binary_cross_entropy_with_logits(o["phase"].float(), aux["phase"].clamp(min=0.0), reduction="none")
        extra["phase"] = (per_step * m).sum() / m.sum().clamp(min=1.0)
    return gesture, extra


def ema_average(decay: float) -> Callable[[list[Any], list[Any], Any], None]:
    """The EMA update for torch's AveragedModel (its `multi_avg_fn`, over parameters and buffers):
    ema <- d * ema + (1 - d) * model with d = min(decay, (1 + n) / (10 + n)) after n updates, so
    early on the average does not lag far behind; integer buffers (BatchNorm's counter) are copied."""
    def update(averaged: list[Any], current: list[Any], n_averaged: Any) -> None:
        if not averaged[0].dtype.is_floating_point:
            for a, c in zip(averaged, current):
                a.copy_(c)
            return
        n = float(n_averaged)
        d = min(decay, (1 + n) / (10 + n)) if decay > 0 else 0.0
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, current, alpha=1 - d)
    return update


def torch_optimizer(cfg: Config, model: Any, weighting: Any, steps_per_epoch: int) -> tuple[Any, Any]:
    """AdamW (no weight decay on the loss weights, which learn 10x faster) and its schedule, stepped
    per batch (lr_factors)."""
    groups = [{"params": list(model.parameters()), "weight_decay": NET_RECIPE["weight_decay"]},
              {"params": list(weighting.parameters()), "weight_decay": 0.0, "lr": NET_RECIPE["lr"] * 10}]
    opt = torch.optim.AdamW(groups, lr=NET_RECIPE["lr"])
    factors = lr_factors(cfg, steps_per_epoch)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factors[min(step, len(factors) - 1)])


def train_torch_fold(cfg: Config, tr: NetInputs, targets: NetTargets, views_va: dict[str, NetInputs],
                     y_va: np.ndarray, seed: int, log: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Train one fold; returns the kept (EMA) state, the scaler, its score and epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch_device()
    scaler = InputScaler.fit(tr, input_columns(tr.names, net_variant(cfg)), cfg.max_len)
    model = build_torch_model(cfg, len(scaler.columns)).to(device)
    # The average lives in a net of its own (built like the model, so the seeded random stream that
    # follows is the same whatever the EMA settings) and starts as a copy of the model's initial weights.
    ema = torch.optim.swa_utils.AveragedModel(build_torch_model(cfg, len(scaler.columns)).to(device),
                                              multi_avg_fn=ema_average(NET_RECIPE["ema"]), use_buffers=True)
    ema.update_parameters(model)
    ema.module.eval()
    weighting = UncertaintyWeights(3).to(device)
    lengths = np.array([len(a) for a in tr.arrays])
    opt, sched = torch_optimizer(cfg, model, weighting, math.ceil(len(lengths) / NET_RECIPE["batch_size"]))
    precision = torch_precision(cfg, device)
    grad_scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    is_target = torch.tensor(TARGET_MASK, device=device)
    to9 = torch.nn.functional.one_hot(torch.tensor(TARGET_INDEX_9, device=device), 9).float()
    aux_weights = dict(zip(AUX_HEADS, cfg.net_aux_weights))
    bad_steps = 0
    stopper = EarlyStopping(cfg.net_patience)
    evaluated = ema.module if NET_RECIPE["ema"] > 0 else model
    stride = getattr(model, "phase_stride", 1)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        losses = []
        for idx in training_buckets(lengths, cfg, rng):
            *batch, phase = training_batch(tr, targets, idx, scaler, cfg, rng)
            xb, lb, db, yb, *rest = to_torch([*batch, phase_targets(phase, batch[1], stride)], device)
            aux = dict(zip(AUX_HEADS, rest)) if cfg.net_aux_heads else None
            with torch.autocast(device, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                                enabled=precision in ("fp16", "bf16")):
                gesture, extra = head_losses(model(xb, lb, db), yb, to9, is_target, aux)
                loss = weighting(gesture) + sum(aux_weights[k] * v for k, v in extra.items())
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):  # skipped and counted; after a few, the fold continues in fp32
                bad_steps += 1
                if bad_steps >= NET_RECIPE["max_bad_steps"] and precision != "fp32":
                    precision = "fp32"
                    grad_scaler = torch.amp.GradScaler(device, enabled=False)
                    print(f"torch: {bad_steps} non-finite losses; this fold continues in fp32")
                continue
            grad_scaler.scale(loss).backward()
            grad_scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            grad_scaler.step(opt)
            grad_scaler.update()
            sched.step()
            ema.update_parameters(model)
            losses.append(float(loss.detach()))
        scores = view_metrics(views_va, y_va, lambda va: torch_heads(NetFold(evaluated, scaler), va)["gesture"])
        log({"epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": float(np.mean(losses)) if losses else None,
             **scores, "bad_steps": bad_steps, "precision": precision, "seconds": time.perf_counter() - t0})
        if stopper.update(epoch, scores["score"],
                          lambda: {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}):
            break
    return {"score": stopper.score, "state": stopper.snapshot, "epoch": stopper.epoch, "scaler": scaler,
            "bad_steps": bad_steps, "uncertainty_s": weighting.s.detach().cpu().tolist()}


def load_torch_checkpoint(path: Path, device: str) -> tuple[Any, InputScaler, dict[str, Any]]:
    ckpt = torch.load(path, map_location=device, weights_only=True)
    cfg = config_from(ckpt["config"])
    model = build_torch_model(cfg, ckpt["in_ch"]).to(device)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, InputScaler.from_state(ckpt["scaler"]), ckpt


class TorchMember(NetMember):
    """The PyTorch net of one --net-variants choice (member torch or torch_imu): a checkpoint per fold
    (in_ch, config, scaler, state_dict), per-epoch log in OUT/logs/<member>.jsonl."""
    family, suffix = "torch", ".pt"

    def training_inputs(self, td: "TrainingData", out: Path) -> dict[str, NetInputs]:
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        return super().training_inputs(td, out)

    def fit(self, k: int, s: int, inputs: dict[str, NetInputs], td: "TrainingData", tr: np.ndarray,
            va: np.ndarray, log: Callable[[dict[str, Any]], None]) -> Fitted:
        res = train_torch_fold(self.cfg, inputs["full"].subset(tr), td.net_targets().subset(tr),
                               {v: inputs[v].subset(va) for v in VIEWS}, td.y[va], self.seed(k, s), log)
        # The settings that shape the net, not where or how the run was scheduled: a fold trained by a
        # --workers process, or into another folder, is the same file.
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in RUN_FIELDS}
        ckpt = {"in_ch": len(res["scaler"].columns), "config": settings,
                "channel_names": self.names, "scaler": res["scaler"].state(), "state_dict": res["state"]}
        return Fitted(ckpt, {"best_epoch": res["epoch"], "best_score": res["score"], "bad_steps": res["bad_steps"],
                             "uncertainty_s": res["uncertainty_s"]}, kept_epoch(self.cfg, res["epoch"]))

    def save(self, model: dict[str, Any], path: Path) -> None:
        def save(tmp: Path) -> None:  # through a file object: the archive is named "archive", not after the
            with open(tmp, "wb") as f:  # temporary file, so one model's file has the same bytes in every run
                torch.save(model, f)
        atomic_write(path, save)

    def load(self, path: Path) -> NetFold:
        return NetFold(*load_torch_checkpoint(path, torch_device())[:2])

    def heads(self, fold: NetFold, inputs: NetInputs, exact: bool) -> dict[str, np.ndarray]:
        return torch_heads(fold, inputs, fp32=exact)


# %% [markdown]
# ## 14. Keras 3 CNN-BiGRU-attention twin
#
# The BiGRU net again in Keras 3 (TensorFlow backend), for framework diversity in the blend: residual
# Conv1D blocks with squeeze-excitation, `Bidirectional(GRU)` with an explicit padding mask, masked
# temporal attention pooling, and the orientation, behaviour and per-step phase heads (and,
# with `--tof-grid`, the same per-frame grid CNN, `TofGridEncoder`). It reads the very same inputs and scaler (section
# 11) and trains on the same augmented batches, phase targets, schedule and early stopping (section
# 12). Its own recipe differs from the PyTorch net's in four points: one 18-class gesture head (no
# 9-class and target-vs-not heads, so no uncertainty weighting), no phase-weighted pooling, no EMA
# of the weights, and per-variable gradient clipping. All four were ported and measured at
# realistic volume: the port scored lower, so the twin keeps its own recipe (docs/DECISIONS.md,
# the Keras twin's recipe). A fold is saved as its weight arrays and scaler (`*.weights.npz`) and
# rebuilt from the config, so it loads under other Keras versions. Mixed precision
# (`mixed_float16`, float32 output) is used on GPU only (docs/DECISIONS.md, precision). Inference
# avoids `model.predict`, whose overhead per call dwarfs one sequence's work: the model runs inside
# one `tf.function` with a (batch, time, channels) signature, inputs padded to fixed length buckets.

# %%
KERAS_BUCKET = 32  # time axis padded to a multiple of this: few shapes, no retracing


@functools.cache
def keras_framework() -> tuple[Any, Any]:
    """keras and tensorflow, imported once, on first use: the import takes seconds, prints native
    start-up notices, and needs KERAS_BACKEND set before it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with native_notices_hidden():
        import keras
        import tensorflow as tf
        tf.get_logger().setLevel("ERROR")
        # TensorFlow maps almost all GPU memory at start; the torch nets share the device.
        for gpu in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # the device was initialised before: too late, and harmless
                pass
    return keras, tf


class KerasLayers(NamedTuple):
    """The Keras twin's own layers, loss and schedule (keras_layers() defines them)."""
    MaskedResBlock: Any
    MaskedAttentionPool: Any
    TofGridEncoder: Any
    PhaseSteps: Any
    masked_phase_loss: Any
    StepRates: Any


@functools.cache
def keras_layers() -> KerasLayers:
    """The twin's custom layers, defined once after keras_framework()'s import (a Keras layer class
    needs keras to subclass), each registered as serializable."""
    keras, _ = keras_framework()
    ops = keras.ops

    def downsample_mask(m: Any, steps: Any) -> Any:
        return ops.minimum(m[:, 0:steps * 2:2], m[:, 1:steps * 2:2])

    @keras.saving.register_keras_serializable(package="cmi")
    class MaskedResBlock(keras.layers.Layer):
        """conv-BN-ReLU x2 + shortcut + squeeze-excitation, max-pool /2; padding re-zeroed after
        every convolution so the output never depends on how much padding follows."""

        def __init__(self, filters: int, kernel: int = 3, dropout: float = 0.3, **kw: Any) -> None:
            super().__init__(**kw)
            self.filters, self.kernel, self.dropout = filters, kernel, dropout
            self.conv1 = keras.layers.Conv1D(filters, kernel, padding="same", use_bias=False)
            self.bn1 = keras.layers.BatchNormalization()
            self.conv2 = keras.layers.Conv1D(filters, kernel, padding="same", use_bias=False)
            self.bn2 = keras.layers.BatchNormalization()
            self.short = keras.layers.Conv1D(filters, 1, use_bias=False)
            self.se1 = keras.layers.Dense(max(filters // 8, 4), activation="relu")
            self.se2 = keras.layers.Dense(filters, activation="sigmoid")
            self.pool = keras.layers.MaxPooling1D(2)
            self.drop = keras.layers.Dropout(dropout)

        def build(self, x_shape: Any, mask_f_shape: Any = None) -> None:
            feat = (None, None, self.filters)
            self.conv1.build(x_shape)
            self.bn1.build(feat)
            self.conv2.build(feat)
            self.bn2.build(feat)
            self.short.build(x_shape)
            self.se1.build((None, self.filters))
            self.se2.build((None, max(self.filters // 8, 4)))
            self.built = True

        def call(self, x: Any, mask_f: Any, training: bool = False) -> tuple[Any, Any]:
            m = ops.expand_dims(ops.cast(mask_f, x.dtype), -1)
            h = ops.relu(self.bn1(self.conv1(x), training=training)) * m
            h = self.bn2(self.conv2(h), training=training) * m
            pooled = ops.sum(h * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1.0)
            h = h * ops.expand_dims(self.se2(self.se1(pooled)), 1)
            h = ops.relu(h + self.short(x)) * m
            h = self.pool(h)
            mask_f = downsample_mask(mask_f, ops.shape(h)[1])
            return self.drop(h, training=training) * ops.expand_dims(ops.cast(mask_f, h.dtype), -1), mask_f

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "filters": self.filters, "kernel": self.kernel, "dropout": self.dropout}

    @keras.saving.register_keras_serializable(package="cmi")
    class MaskedAttentionPool(keras.layers.Layer):
        """Attention over time; padded steps get exactly zero weight."""

        def __init__(self, units: int = 64, **kw: Any) -> None:
            super().__init__(**kw)
            self.units = units
            self.hidden = keras.layers.Dense(units, activation="tanh")
            self.score = keras.layers.Dense(1)
            self.supports_masking = True  # it consumes the BiGRU's mask; its own output has no time axis

        def build(self, h_shape: Any, mask_f_shape: Any = None) -> None:
            self.hidden.build(h_shape)
            self.score.build((None, None, self.units))
            self.built = True

        def compute_mask(self, *args: Any, **kwargs: Any) -> None:
            return None

        def call(self, h: Any, mask_f: Any) -> Any:
            s = ops.squeeze(self.score(self.hidden(h)), -1)
            s = ops.cast(s, "float32") + (1.0 - ops.cast(mask_f, "float32")) * -1e9
            w = ops.cast(ops.softmax(s, axis=1), h.dtype)
            return ops.sum(h * ops.expand_dims(w, -1), axis=1)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "units": self.units}

    @keras.saving.register_keras_serializable(package="cmi")
    class StepRates(keras.optimizers.schedules.LearningRateSchedule):
        """The learning rate of each optimiser step from a table (lr_factors, the torch net's schedule
        step for step); past its end, the last rate."""

        def __init__(self, rates: list[float]) -> None:
            self.rates = [float(r) for r in rates]

        def __call__(self, step: Any) -> Any:
            table = ops.convert_to_tensor(self.rates, dtype="float32")
            return ops.take(table, ops.minimum(ops.cast(step, "int32"), len(self.rates) - 1))

        def get_config(self) -> dict[str, Any]:
            return {"rates": self.rates}

    @keras.saving.register_keras_serializable(package="cmi")
    class TofGridEncoder(keras.layers.Layer):
        """The torch GridEncoder's twin: the last `pixels` channels (five 8x8 ToF grids) of every
        step through a small 2D CNN shared across steps, replaced by its embedding; padded steps
        are zeroed, so the first convolution never sees them."""

        def __init__(self, pixels: int, **kw: Any) -> None:
            super().__init__(**kw)
            self.pixels = pixels
            self.conv1 = keras.layers.Conv2D(16, 3, padding="same", activation="relu")
            self.conv2 = keras.layers.Conv2D(32, 3, padding="same", activation="relu")
            self.pool = keras.layers.MaxPooling2D(2)
            self.dense = keras.layers.Dense(TOF_GRID_DIM, activation="relu")

        def build(self, x_shape: Any, mask_f_shape: Any = None) -> None:
            self.conv1.build((None, 8, 8, self.pixels // 64))
            self.conv2.build((None, 4, 4, 16))
            self.dense.build((None, 128))
            self.built = True

        def call(self, x: Any, mask_f: Any) -> Any:
            b, t = ops.shape(x)[0], ops.shape(x)[1]
            grid = ops.transpose(ops.reshape(x[..., -self.pixels:], (-1, self.pixels // 64, 8, 8)), (0, 2, 3, 1))
            e = self.dense(ops.reshape(self.pool(self.conv2(self.pool(self.conv1(grid)))), (-1, 128)))
            e = ops.reshape(e, (b, t, TOF_GRID_DIM)) * ops.expand_dims(ops.cast(mask_f, e.dtype), -1)
            return ops.concatenate([ops.cast(x[..., :-self.pixels], e.dtype), e], axis=-1)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "pixels": self.pixels}

    @keras.saving.register_keras_serializable(package="cmi")
    class PhaseSteps(keras.layers.Layer):
        """Per-step gesture-phase probability (batch, steps) from the BiGRU output; the padding mask
        is consumed here (masked_phase_loss leaves padded steps out)."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.dense = keras.layers.Dense(1, activation="sigmoid", dtype="float32")
            self.supports_masking = True

        def build(self, shape: Any) -> None:
            self.dense.build(shape)
            self.built = True

        def call(self, h: Any, mask: Any = None) -> Any:
            return ops.squeeze(self.dense(h), -1)

        def compute_mask(self, inputs: Any, mask: Any = None) -> None:
            return None

    @keras.saving.register_keras_serializable(package="cmi")
    def masked_phase_loss(y_true: Any, y_pred: Any) -> Any:
        """Per-step BCE of the phase head over the valid steps (targets of padded steps are -1)."""
        valid = ops.cast(y_true >= 0, "float32")
        p = ops.clip(ops.cast(y_pred, "float32"), 1e-6, 1 - 1e-6)
        t = ops.maximum(ops.cast(y_true, "float32"), 0.0)
        bce = -(t * ops.log(p) + (1 - t) * ops.log(1 - p))
        return ops.sum(bce * valid, axis=-1) / ops.maximum(ops.sum(valid, axis=-1), 1.0)

    return KerasLayers(MaskedResBlock, MaskedAttentionPool, TofGridEncoder, PhaseSteps, masked_phase_loss,
                       StepRates)


def keras_policy() -> str:
    """mixed_float16 on GPU; float32 on CPU (docs/DECISIONS.md, precision)."""
    _, tf = keras_framework()
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


def build_keras_model(cfg: Config, in_ch: int, policy: str | None = None) -> Any:
    """The Keras twin under `policy` (default: keras_policy(), mixed precision on a GPU for training)."""
    keras, layers = keras_framework()[0], keras_layers()
    keras.mixed_precision.set_global_policy(policy or keras_policy())
    x_in = keras.Input((None, in_ch), name="x")
    m_in = keras.Input((None,), name="mask")
    d_in = keras.Input((len(DEFAULT_DEMOGRAPHICS),), name="demo")
    h, m = x_in, m_in
    pixels = tof_grid_pixels(cfg)
    if pixels:
        h = layers.TofGridEncoder(pixels, name="tof_grid")(h, m)
    for i, filters in enumerate(cfg.net_conv):
        h, m = layers.MaskedResBlock(filters, 3, NET_RECIPE["dropout"], name=f"res{i}")(h, m)
    seq = keras.layers.Bidirectional(keras.layers.GRU(cfg.net_hidden, return_sequences=True), name="bigru")(
        h, mask=keras.ops.cast(m, "bool"))
    z = layers.MaskedAttentionPool(64, name="attention")(seq, m)
    z = keras.layers.Concatenate()([z, keras.layers.Dense(16, activation="relu", name="demo_embed")(d_in)])
    z = keras.layers.Dropout(NET_RECIPE["dropout"])(keras.layers.Dense(256, activation="relu")(z))
    out = {"gesture": keras.layers.Dense(len(GESTURES), activation="softmax", dtype="float32", name="gesture")(z)}
    if cfg.net_aux_heads:  # the torch net's auxiliary heads: orientation, behaviour; phase per BiGRU step
        for head, n in (("orientation", len(ORIENTATIONS)), ("behavior", len(START_BEHAVIORS))):
            out[head] = keras.layers.Dense(n, activation="softmax", dtype="float32", name=head)(z)
        out["phase"] = layers.PhaseSteps(dtype="float32", name="phase")(seq)
    return keras.Model({"x": x_in, "mask": m_in, "demo": d_in}, out, name="gesture_net_keras")


def keras_batch(x: np.ndarray, lengths: np.ndarray, demo: np.ndarray) -> dict[str, np.ndarray]:
    """A scaled batch (scaled_batch) as Keras inputs: right-padded to a multiple of KERAS_BUCKET
    steps (few traced shapes), with a float padding mask."""
    t = int(math.ceil(x.shape[1] / KERAS_BUCKET) * KERAS_BUCKET)
    x = np.pad(x, ((0, 0), (0, t - x.shape[1]), (0, 0)))
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    return {"x": x, "mask": mask, "demo": demo}


def keras_inputs(arrays: list[np.ndarray], demo: np.ndarray, scaler: InputScaler) -> dict[str, np.ndarray]:
    """Unscaled sequences -> Keras inputs, for OOF and predict()."""
    return keras_batch(*scaled_batch(arrays, demo, scaler))


class KerasPredictor:
    """A saved fold wrapped in one tf.function (traced once per input rank, not per call) that returns
    its per-sequence heads: "gesture", and "orientation" and "behavior" where the net has
    them (not the per-step phase)."""

    def __init__(self, model: Any, channels: int) -> None:
        _, tf = keras_framework()
        self.model = model
        spec = {"x": tf.TensorSpec([None, None, channels], tf.float32), "mask": tf.TensorSpec([None, None], tf.float32),
                "demo": tf.TensorSpec([None, len(DEFAULT_DEMOGRAPHICS)], tf.float32)}
        self.fn = tf.function(lambda inp: {k: v for k, v in model(inp, training=False).items() if k != "phase"},
                              input_signature=[spec], reduce_retracing=True)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.numpy().astype(np.float32) for k, v in self.fn(inputs).items()}


def keras_heads(fold: NetFold, inputs: NetInputs, batch_size: int = 64) -> dict[str, np.ndarray]:
    """One fold's heads for every sequence of `inputs`: "gesture" (n, 18), and "orientation" (n, 4),
    "behavior" (n, 2) when the net has those heads."""
    predictor, scaler = fold
    return heads_in_buckets(inputs, lambda arrays, demo: predictor(keras_inputs(arrays, demo, scaler)), batch_size)


def keras_learning_rate(optimizer: Any) -> float:
    """The current learning rate, whether the optimizer holds a float, a variable or a schedule."""
    keras, _ = keras_framework()
    lr = optimizer.learning_rate
    if callable(lr) and not hasattr(lr, "numpy"):
        lr = lr(optimizer.iterations)
    return float(keras.ops.convert_to_numpy(lr))


def train_keras_fold(cfg: Config, tr: NetInputs, targets: NetTargets, views_va: dict[str, NetInputs],
                     y_va: np.ndarray, seed: int, log: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One fold with the torch recipe: the same augmented batches (training_batch: label smoothing,
    mixup, every augmentation), warmup + cosine, EarlyStopping (patience 0 = the last epoch)."""
    keras, layers = keras_framework()[0], keras_layers()
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    scaler = InputScaler.fit(tr, input_columns(tr.names, net_variant(cfg)), cfg.max_len)
    model = build_keras_model(cfg, len(scaler.columns))
    lengths = np.array([len(a) for a in tr.arrays])
    steps = math.ceil(len(lengths) / NET_RECIPE["batch_size"])
    opt = keras.optimizers.AdamW(layers.StepRates([NET_RECIPE["lr"] * f for f in lr_factors(cfg, steps)]),
                                 weight_decay=NET_RECIPE["weight_decay"], clipnorm=1.0)
    if keras_policy() == "mixed_float16":
        opt = keras.mixed_precision.LossScaleOptimizer(opt)
    weights_of = {"gesture": 1.0, **dict(zip(AUX_HEADS, cfg.net_aux_weights))}
    losses_of = {k: keras.losses.CategoricalCrossentropy() for k in weights_of} | {"phase": layers.masked_phase_loss}
    outputs = list(weights_of) if cfg.net_aux_heads else ["gesture"]
    model.compile(optimizer=opt, loss={k: losses_of[k] for k in outputs}, loss_weights={k: weights_of[k] for k in outputs})
    stride = 2 ** len(cfg.net_conv)
    stopper = EarlyStopping(cfg.net_patience)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        losses = []
        for idx in training_buckets(lengths, cfg, rng):
            x, lb, demo, y, *aux = training_batch(tr, targets, idx, scaler, cfg, rng)
            batch = keras_batch(x, lb, demo)
            y_all = {"gesture": y, **dict(zip(AUX_HEADS, aux))}
            y_all["phase"] = phase_targets(y_all["phase"], lb, stride, steps=batch["x"].shape[1] // stride)
            res = model.train_on_batch(batch, {k: y_all[k] for k in outputs}, return_dict=True)
            losses.append(float(res["loss"]))
        fold = NetFold(KerasPredictor(model, len(scaler.mean)), scaler)
        scores = view_metrics(views_va, y_va, lambda va: keras_heads(fold, va)["gesture"])
        log({"epoch": epoch, "lr": keras_learning_rate(model.optimizer), "loss": float(np.mean(losses)),
             **scores, "seconds": time.perf_counter() - t0})
        if stopper.update(epoch, scores["score"], model.get_weights):
            break
    model.set_weights(stopper.snapshot)
    return {"score": stopper.score, "epoch": stopper.epoch, "model": model, "scaler": scaler}


def save_keras_fold(path: Path, model: Any, scaler: InputScaler) -> None:
    """A fold as plain arrays: the weights in model order plus the scaler. The architecture is
    rebuilt from this notebook's code and config when loading, because a `.keras` file stores
    layer configs that other Keras 3 versions reject (3.15's files fail under Kaggle's 3.8-3.13)."""
    arrays = {f"w{i:03d}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"scaler_{k}": np.asarray(v, np.float32) for k, v in scaler.state().items()})
    atomic_write(path, lambda p: np.savez(p, **arrays))


def load_keras_fold(path: Path, cfg: Config) -> tuple[Any, InputScaler]:
    """The net of `cfg` (the config it was trained with) rebuilt in float32, with the saved weights set:
    one sequence per call gains nothing from mixed precision, and float32 answers do not depend on the device."""
    with np.load(path, allow_pickle=False) as z:
        scaler = InputScaler.from_state({k[len("scaler_"):]: z[k] for k in z.files if k.startswith("scaler_")})
        weights = [z[k] for k in sorted(k for k in z.files if k.startswith("w"))]
    model = build_keras_model(cfg, len(scaler.mean), policy="float32")
    model.set_weights(weights)  # checks every shape against the rebuilt architecture
    return model, scaler


class KerasMember(NetMember):
    """The Keras twin of one --net-variants (member keras or keras_imu): a fold is its weight arrays
    and scaler (save_keras_fold), rebuilt from the config when loaded."""
    family, suffix = "keras", ".weights.npz"

    def fit(self, k: int, s: int, inputs: dict[str, NetInputs], td: "TrainingData", tr: np.ndarray,
            va: np.ndarray, log: Callable[[dict[str, Any]], None]) -> Fitted:
        res = train_keras_fold(self.cfg, inputs["full"].subset(tr), td.net_targets().subset(tr),
                               {v: inputs[v].subset(va) for v in VIEWS}, td.y[va], self.seed(k, s), log)
        return Fitted((res["model"], res["scaler"]), {"best_epoch": res["epoch"], "best_score": res["score"]},
                      kept_epoch(self.cfg, res["epoch"]))

    def save(self, model: tuple[Any, InputScaler], path: Path) -> None:
        save_keras_fold(path, *model)

    def load(self, path: Path) -> NetFold:
        model, scaler = load_keras_fold(path, self.cfg)
        return NetFold(KerasPredictor(model, len(scaler.mean)), scaler)

    def heads(self, fold: NetFold, inputs: NetInputs, exact: bool) -> dict[str, np.ndarray]:
        return keras_heads(fold, inputs)  # always float32 at serving: exact on any device


# %% [markdown]
# ## 15. Ensemble and reports
#
# Each family's OOF probabilities are blended with weights chosen on OOF (one set per view);
# the report holds every model, every view and the ensemble, overall and per fold.

# %%
def fit_blend_weights(y_true: list[str], probas: list[np.ndarray], step: float = 0.1) -> list[float]:
    """Non-negative weights summing to 1 that maximise the metric on OOF (coarse simplex grid)."""
    k = len(probas)
    if k == 1:
        return [1.0]
    ticks = int(round(1 / step))
    best, best_w = -1.0, [1.0 / k] * k
    y = label_index(y_true, GESTURES, strict="labels")  # once, not per weight set

    def grid(n: int, left: int) -> Iterable[list[int]]:
        if n == 1:
            yield [left]
            return
        for i in range(left + 1):
            for rest in grid(n - 1, left - i):
                yield [i, *rest]

    for combo in grid(k, ticks):
        w = [c / ticks for c in combo]
        s = metric_of_indices(y, np.argmax(blend(probas, w), axis=1))["metric"]
        if s > best + 1e-9:
            best, best_w = s, w
    return best_w


def nested_blend_scores(y_true: list[str], probas: list[np.ndarray], folds: np.ndarray) -> dict[str, Any]:
    """The honest ensemble figure: weights fitted on the other folds, scored on fold k."""
    y = np.asarray(y_true, dtype=object)
    weights: dict[int, list[float]] = {}

    def fit_predict(k: int, fit: np.ndarray, hold: np.ndarray) -> np.ndarray:
        weights[k] = fit_blend_weights(list(y[fit]), [p[fit] for p in probas])
        return blend([p[hold] for p in probas], weights[k])
    blended = held_out(folds, fit_predict)
    per_fold = [{"fold": int(k), "weights": w, **score_probabilities(y[folds == k], blended[folds == k])}
                for k, w in weights.items()]
    return {**score_probabilities(y, blended), "per_fold": per_fold}


TARGET_SCALES = (1.0, 0.5, 0.67, 0.8, 1.25, 1.5, 2.0)  # 1.0 first: a tie keeps the plain blend


def target_scaled(proba: np.ndarray, scale: float) -> np.ndarray:
    """Probabilities with the 8 target gestures' mass multiplied by `scale`, renormalised: moves the
    target vs non-target decision (the binary half of the metric) without reordering either group."""
    q = np.asarray(proba, dtype=np.float64).copy()
    q[:, TARGET_MASK] *= scale
    return (q / q.sum(1, keepdims=True)).astype(np.float32)


def fit_target_scale(y_true: Iterable[str], proba: np.ndarray) -> float:
    scores = [score_probabilities(y_true, target_scaled(proba, s))["metric"] for s in TARGET_SCALES]
    return float(TARGET_SCALES[int(np.argmax(scores))])


def target_scale_check(y_true: list[str], proba: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """Class-prior adjustment of target vs non-target, kept only if it helps out of sample: the
    scale is fitted on the other folds and scored on fold k (nested), like the blend weights."""
    y = np.asarray(y_true, dtype=object)
    adjusted = held_out(folds, lambda k, fit, hold: target_scaled(proba[hold], fit_target_scale(y[fit], proba[fit])))
    base = score_probabilities(y, proba)["metric"]
    nested = score_probabilities(y, adjusted)["metric"]
    scale = fit_target_scale(y, proba)
    return {"scale": scale, "base": base, "nested": nested, "gain": nested - base,
            "enabled": bool(nested > base and scale != 1.0)}


def ensemble_ablation(y_true: list[str], oof: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """What each member adds: the expected LB of the blend refitted without it (in-sample, like
    the ensemble figure it is compared with)."""
    out = {}
    for drop in (oof if len(oof) > 1 else []):
        rest = [n for n in oof if n != drop]
        views = {}
        for v in VIEWS:
            probas = [oof[n][v] for n in rest]
            views[v] = score_probabilities(y_true, blend(probas, fit_blend_weights(y_true, probas)))["metric"]
        out[drop] = {**views, "expected_lb": 0.5 * (views["full"] + views["imu_only"])}
    return out


# %% [markdown]
# ### 15.1 Serving rules: per-subject assignment over the study's slots
#
# Each subject performs each allowed (orientation, gesture) pair once per starting behaviour: 102
# slots, each used at most once. predict() keeps, per subject, the probability rows of every
# sequence seen so far and labels the current one by one of four serving rules:
# - `argmax`: the most probable of the 18 gestures;
# - `argmax9`: the decision over the 9 scored classes (a target only when it beats the summed
#   non-target mass), since all non-targets count as one class;
# - `gesture_capacity`: an assignment (Hungarian algorithm on -log p) of the subject's sequences
#   to gestures, each gesture used at most 2 x (its allowed orientations) times;
# - `slots`: an assignment to the 102 (orientation, gesture, behaviour) slots, capacity 1. The slot
#   probability comes from one of two sources: `lgbm`, p(gesture) x p(orientation) x p(behaviour)
#   with the last two from two light LightGBM models on the IMU features (the slot models); `heads`,
#   the same product with the nets' own orientation and behaviour heads (the last to train: short
#   runs leave them behind the slot models, 30 epochs ahead). In each, p(gesture) (the served blend)
#   enters with a weight
#   (its inverse temperature against the slot context, chosen per view). A single temperature on
#   the whole slot table would change nothing: every row takes exactly one slot, so scaling all
#   costs, or adding a constant per row, leaves the assignment as it is.
# Every rule, source and weight is replayed on the OOF predictions exactly as predict() runs it
# (each subject's sequences in a random order, several seeds); the bundle serves the plan with the
# best replayed expected LB, and the report gives its nested figure (the plan picked on the other
# folds, scored on this one).

# %%
GESTURE_CAPACITY = np.array([2 * sum(1 for _, g in allowed_pairs() if g == name) for name in GESTURES])
ASSIGNMENT_MAX_ROWS = int(GESTURE_CAPACITY.sum())  # beyond this many sequences: plain argmax
SERVING_RULES = ("argmax", "argmax9", "gesture_capacity", "slots")
SLOT_MODEL_TARGETS = {"orientation": ORIENTATIONS, "behavior": START_BEHAVIORS}  # what the slot models predict
# The slot sources, with the gesture weights the replay tries for each (the first wins a tie).
SLOT_SOURCES = {"lgbm": (1.0, 0.5, 2.0), "heads": (1.0, 0.5, 2.0)}
SLOT_INPUTS = {"lgbm": ("lgbm",), "heads": ("orientation", "behavior")}  # what each reads
# What a slot source reads for a call it has no answer for: uniform probabilities.
UNIFORM_SLOT_INPUTS = {
    "lgbm": np.concatenate([np.full(len(v), 1.0 / len(v)) for v in SLOT_MODEL_TARGETS.values()])[None, :],
    "orientation": np.full((1, len(ORIENTATIONS)), 1.0 / len(ORIENTATIONS)),
    "behavior": np.full((1, len(START_BEHAVIORS)), 1.0 / len(START_BEHAVIORS))}
UNIFORM_SLOTS = np.full(len(SLOTS), 1.0 / len(SLOTS))


def serving_plan(rule: str, source: str = "", weights: dict[str, float] | None = None) -> dict[str, Any]:
    """How predict() labels a call: the rule, and for `slots` the slot source and the gesture weight
    per view (the manifest's "serving" entry)."""
    return {"rule": rule, "slot_source": source if rule == "slots" else "",
            "gesture_weight": {v: float((weights or {}).get(v, 1.0)) for v in VIEWS}}


def plan_name(plan: dict[str, Any]) -> str:
    return plan["rule"] + (f"/{plan['slot_source']}" if plan["slot_source"] else "")


def argmax9(probs: np.ndarray) -> np.ndarray:
    """Per row: the most probable target gesture when it beats the summed non-target mass, else
    the most probable non-target (which one does not matter to the metric)."""
    best_t = np.where(TARGET_MASK, probs, -1.0).argmax(1)
    best_nt = np.where(~TARGET_MASK, probs, -1.0).argmax(1)
    rows = np.arange(len(probs))
    return np.where(probs[rows, best_t] >= probs[:, ~TARGET_MASK].sum(1), best_t, best_nt)


def assign_labels(probs: np.ndarray) -> np.ndarray:
    """Gesture index per row maximising the summed log-probability, each gesture used at most
    GESTURE_CAPACITY times."""
    from scipy.optimize import linear_sum_assignment
    if len(probs) > ASSIGNMENT_MAX_ROWS or len(probs) == 0:
        return probs.argmax(axis=1)
    slots = np.repeat(np.arange(len(GESTURES)), GESTURE_CAPACITY)
    cost = -np.log(np.clip(probs[:, slots], 1e-9, 1.0))
    rows, cols = linear_sum_assignment(cost)
    out = probs.argmax(axis=1)
    out[rows] = slots[cols]
    return out


def net_slot_inputs(heads: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The nets' orientation and behaviour heads, each the plain mean over the members that
    have it: the same for training's OOF replay and one predict() call."""
    got: dict[str, list[np.ndarray]] = {}
    for member in heads:
        for head in SEQUENCE_HEADS:
            if head in member:
                got.setdefault(head, []).append(member[head])
    return {head: np.mean(outs, axis=0) for head, outs in got.items()}


def slot_probabilities(source: str, probs: np.ndarray, slot_inputs: dict[str, np.ndarray],
                       weight: float = 1.0) -> np.ndarray:
    """(n, 102) probability of each (orientation, gesture, behaviour) slot from `source` (15.1):
    p(gesture)^weight x p(orientation) x p(behaviour), renormalised. `slot_inputs` holds per row
    what the sources read: "lgbm" (the slot models' 4 orientation then 2 behaviour probabilities), or
    "orientation" and "behavior" (the nets' heads)."""
    n_o = len(ORIENTATIONS)
    orient_behav = (slot_inputs["lgbm"] if source == "lgbm" else
                    np.hstack([slot_inputs["orientation"], slot_inputs["behavior"]]))
    orient_behav = np.log(np.clip(orient_behav.astype(np.float64), 1e-12, 1.0))
    log_p = weight * np.log(np.clip(probs[:, SLOT_GESTURE].astype(np.float64), 1e-12, 1.0))
    log_p += orient_behav[:, SLOT_ORIENTATION] + orient_behav[:, n_o + SLOT_BEHAVIOR]
    p = np.exp(log_p - log_p.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def assign_slots(probs: np.ndarray, slot_p: np.ndarray) -> np.ndarray:
    """Gesture index per row from the assignment of rows to the 102 slots (each used once) that
    maximises the summed log slot probability (`slot_p`, slot_probabilities); gesture capacity
    when there are more rows than slots."""
    from scipy.optimize import linear_sum_assignment
    if len(probs) > len(SLOTS) or len(probs) == 0:
        return assign_labels(probs)
    rows, cols = linear_sum_assignment(-np.log(np.clip(slot_p, 1e-12, 1.0)))
    out = probs.argmax(axis=1)
    out[rows] = SLOT_GESTURE[cols]
    return out


def serve_labels(rule: str, probs: np.ndarray, slot_p: np.ndarray | None = None) -> np.ndarray:
    """Labels of one subject's sequences so far under `rule` (predict() keeps the last one); `slot_p`
    is what the slots rule assigns on."""
    if rule == "argmax9":
        return argmax9(probs)
    if rule == "gesture_capacity":
        return assign_labels(probs)
    if rule == "slots":
        return assign_slots(probs, slot_p)
    return probs.argmax(axis=1)


def replay_order(subjects: np.ndarray, seed: int) -> list[np.ndarray]:
    """Per subject, the row indices in the random order the replay presents them."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(subjects == subj)) for subj in np.unique(subjects)]


def replay_rule(rule: str, probs: np.ndarray, slot_p: np.ndarray | None, subjects: np.ndarray, seed: int) -> np.ndarray:
    """Online labels as predict() gives them: each subject's sequences arrive in a random order and
    each is labelled by the rule over the sequences seen so far."""
    if rule in ("argmax", "argmax9"):  # per-row rules: the order does not matter
        return serve_labels(rule, probs)
    out = probs.argmax(axis=1)
    for idx in replay_order(subjects, seed):
        for t in range(len(idx)):
            seen = idx[: t + 1]
            out[idx[t]] = serve_labels(rule, probs[seen], None if slot_p is None else slot_p[seen])[-1]
    return out


def serving_candidates(rules: Iterable[str],
                       slot_inputs: dict[str, dict[str, np.ndarray]]) -> list[tuple[str, str, float]]:
    """(rule, slot source, gesture weight) for every rule, and for `slots` every source whose inputs
    both views have, with each of its weights."""
    out = []
    for rule in rules:
        if rule != "slots":
            out.append((rule, "", 1.0))
            continue
        for source, weights in SLOT_SOURCES.items():
            if all(p in slot_inputs[v] for v in VIEWS for p in SLOT_INPUTS[source]):
                out += [(rule, source, w) for w in weights]
    return out


def serving_rule_check(y_true: list[str], ens: dict[str, np.ndarray], slot_inputs: dict[str, dict[str, np.ndarray]],
                       subjects: np.ndarray, folds: np.ndarray, rules: Iterable[str] = SERVING_RULES,
                       seeds: int = 3) -> dict[str, Any]:
    """Every rule (and for `slots` every slot source and gesture weight) replayed on the ensemble OOF
    of both views (mean over seeds); the plan with the best expected LB (the weight chosen per view);
    and the nested figure of that choice: for each fold, the plan that wins on the other folds,
    scored on this one. `slot_inputs[view]` holds what the slot sources read (slot_probabilities)."""
    y = label_index(y_true, GESTURES, strict="labels")
    candidates = serving_candidates(rules, slot_inputs)
    labels = {c: {v: [replay_rule(c[0], ens[v],
                                  slot_probabilities(c[1], ens[v], slot_inputs[v], c[2]) if c[1] else None,
                                  subjects, s) for s in range(seeds)] for v in VIEWS} for c in candidates}

    def score(c: tuple[str, str, float], v: str, rows: np.ndarray) -> float:
        return float(np.mean([metric_of_indices(y[rows], lab[rows])["metric"] for lab in labels[c][v]]))

    def pick(scored: dict[tuple[str, str, float], dict[str, float]]) -> dict[str, Any]:
        """The plan that wins on the rows `scored` was scored on: the (rule, source) of the best
        expected LB, each view's weight its best."""
        best: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
        for (rule, source, w), by_view in scored.items():
            for v, sc in by_view.items():
                if sc > best.setdefault((rule, source), {}).get(v, (-1.0, 0.0))[0] + 1e-12:
                    best[(rule, source)][v] = (sc, w)
        (rule, source), views = max(best.items(), key=lambda kv: np.mean([kv[1][v][0] for v in VIEWS]))
        return serving_plan(rule, source, {v: views[v][1] for v in VIEWS})

    def key(plan: dict[str, Any], v: str) -> tuple[str, str, float]:
        return plan["rule"], plan["slot_source"], plan["gesture_weight"][v] if plan["slot_source"] else 1.0

    def scored_on(rows: np.ndarray) -> dict[tuple[str, str, float], dict[str, float]]:
        return {c: {v: score(c, v, rows) for v in VIEWS} for c in candidates}

    everything = scored_on(np.ones(len(y), dtype=bool))
    table = [{"rule": r, "slot_source": src, "gesture_weight": w, **everything[(r, src, w)]} for r, src, w in candidates]
    for row in table:
        row["expected_lb"] = 0.5 * (row["full"] + row["imu_only"])
    chosen = pick(everything)
    served = {v: everything[key(chosen, v)][v] for v in VIEWS}
    per_fold = {k: pick(scored_on(other)) for k, other, _ in fold_splits(folds)}
    nested = {}
    for v in VIEWS:
        nested[v] = float(np.mean([metric_of_indices(y, held_out(
            folds, lambda k, other, hold: labels[key(per_fold[k], v)][v][s][hold], dtype=np.int64))["metric"]
            for s in range(seeds)]))
    nested["expected_lb"] = 0.5 * (nested["full"] + nested["imu_only"])
    rules_table = {}  # the best weight of each rule / source, per view: the one-line summary
    for row in table:
        name = plan_name(serving_plan(row["rule"], row["slot_source"]))
        got = rules_table.setdefault(name, {v: -1.0 for v in VIEWS})
        for v in VIEWS:
            got[v] = max(got[v], row[v])
    for got in rules_table.values():
        got["expected_lb"] = 0.5 * (got["full"] + got["imu_only"])
    return {"candidates": table, "rules": rules_table, "chosen": plan_name(chosen), "plan": chosen,
            "served": {**served, "expected_lb": 0.5 * (served["full"] + served["imu_only"])},
            "nested": nested, "nested_plans": {str(k): p for k, p in per_fold.items()}}


def slot_model_labels(labels: pl.DataFrame) -> dict[str, np.ndarray]:
    """Orientation and starting-behaviour index per sequence (unknown text counts as the first)."""
    return {t: label_index(labels[t].to_list(), names) for t, names in SLOT_MODEL_TARGETS.items()}


def slot_model_config(cfg: Config) -> Config:
    """The slot models' LightGBM settings: small and fast (they only break ties between slots)."""
    return dataclasses.replace(cfg, lgbm_modality_dropout=0.0, lgbm_class_weight="none", lgbm_rounds=min(cfg.lgbm_rounds, 300),
                               lgbm_learning_rate=max(cfg.lgbm_learning_rate, 0.1), lgbm_max_bin=63)


def train_slot_models(cfg: Config, td: TrainingData, bundle: Path) -> dict[str, Any]:
    """LightGBM per fold for orientation and starting behaviour on the IMU features (the same in
    both views): their OOF probabilities (n, 4 + 2) and the fold files."""
    names = imu_feature_names(td.views["imu_only"])
    x = feature_matrix(td.views["imu_only"], names)
    y = slot_model_labels(td.labels)
    bundle.mkdir(parents=True, exist_ok=True)
    oof, files = [], []
    for target, classes in SLOT_MODEL_TARGETS.items():
        def fit_predict(k: int, tr: np.ndarray, va: np.ndarray) -> np.ndarray:
            booster = train_lgbm_fold(slot_model_config(cfg), x[tr], y[target][tr], x[va], y[target][va], names,
                                      cfg.seed + k, n_classes=len(classes))
            files.append(bundle_file(f"slot_model_{target}", k, ".txt"))
            atomic_write(bundle / files[-1], lambda p: booster.save_model(str(p)))
            return booster.predict(x[va], num_iteration=booster.best_iteration)
        part = held_out(td.folds, fit_predict)
        atomic_write(Path(cfg.out_dir) / "oof" / f"oof_slot_model_{target}.npy", lambda p, a=part: np.save(p, a))
        accuracy = float((part.argmax(1) == y[target]).mean())
        say(f"slot model {target}: OOF accuracy {accuracy:.3f} ({len(classes)} classes)")
        oof.append(part)
    return {"oof": np.hstack(oof), "files": files, "feature_names": names}


def slot_model_proba(boosters: dict[str, list[Any]], x: np.ndarray) -> np.ndarray:
    """(n, 4 + 2) orientation and behaviour probabilities, the mean over folds."""
    return np.hstack([blend([b.predict(x, num_iteration=b.best_iteration or None, num_threads=1) for b in fold_models],
                            np.ones(len(fold_models))) for fold_models in boosters.values()])


# %% [markdown]
# ### 15.2 Plots
#
# PNG files in `OUT/plots/` (shown inline when run as a notebook): the ensemble's confusion matrix,
# per-gesture F1 in both views, the nets' training curves, ensemble weights and LightGBM's top
# features. Figures are drawn with matplotlib's object API (no pyplot, so the session's backend is
# never touched) and, in a Jupyter kernel, the saved PNG is displayed: that works whichever
# matplotlib and ipykernel are installed and whether pyplot was imported before or not (with
# matplotlib 3.7 under ipykernel 7, `plt.show()` in the cell that first imports pyplot shows
# nothing). A plotting failure is logged and never stops training.

# %%
def show_png(path: Path) -> None:
    """Display a PNG file in the notebook's output (no-op outside a Jupyter kernel)."""
    if "ipykernel" not in sys.modules:
        return
    from IPython.display import Image, display
    display(Image(filename=str(path)))


class PlotFolder:
    """Figures saved as PNG into one folder (and shown inline in a notebook)."""

    def __init__(self, folder: Path) -> None:
        from matplotlib.figure import Figure
        self.folder, self.Figure, self.written = folder, Figure, []
        folder.mkdir(parents=True, exist_ok=True)

    def figure(self, nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (8, 5)) -> tuple[Any, Any]:
        fig = self.Figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols)

    def save(self, fig: Any, name: str) -> None:
        path = self.folder / name
        fig.tight_layout()
        atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
        show_png(path)
        self.written.append(path)


def plot_confusion(plots: PlotFolder, y: np.ndarray, ens: dict[str, np.ndarray]) -> None:
    """The ensemble OOF confusion of both CV views side by side: colours row-normalised (the share of
    each true gesture), the counts written in the cells."""
    fig, axes = plots.figure(1, len(VIEWS), figsize=(20, 9.5))
    for ax, view in zip(axes, VIEWS, strict=True):
        counts = np.zeros((len(GESTURES), len(GESTURES)), dtype=int)
        np.add.at(counts, (y, ens[view].argmax(1)), 1)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(GESTURES)), GESTURES, rotation=75, ha="right", fontsize=8)
        ax.set_yticks(range(len(GESTURES)), GESTURES, fontsize=8)
        ax.axhline(len(TARGET_GESTURES) - 0.5, color="red", lw=0.8)
        ax.axvline(len(TARGET_GESTURES) - 0.5, color="red", lw=0.8)
        ax.set_xlabel("predicted gesture")
        ax.set_ylabel("true gesture")
        ax.set_title(f"Ensemble OOF, {view} view (counts; colour = share of the row; targets above/left of red)",
                     fontsize=9)
    fig.colorbar(im, ax=axes[-1], fraction=0.04)
    plots.save(fig, "confusion_matrix.png")


def plot_per_gesture_f1(plots: PlotFolder, y: np.ndarray, ens: dict[str, np.ndarray]) -> None:
    fig, ax = plots.figure(figsize=(11, 5))
    width = 0.4
    for j, view in enumerate(VIEWS):
        f1 = f1_per_class(y, ens[view].argmax(1), len(GESTURES))
        ax.bar(np.arange(len(GESTURES)) + (j - 0.5) * width, f1, width, label=view)
    ax.set_xticks(range(len(GESTURES)), GESTURES, rotation=75, ha="right", fontsize=8)
    ax.set_ylabel("F1 (18-class)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Per-gesture F1 of the ensemble OOF")
    plots.save(fig, "per_gesture_f1.png")


def plot_training_curves(plots: PlotFolder, logs: Path) -> None:
    """One figure per net family: training loss and validation metric per epoch and fold."""
    from matplotlib.ticker import MaxNLocator
    for log in sorted(logs.glob("*.jsonl")):
        family = log.stem
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        fig, axes = plots.figure(1, 2, figsize=(11, 4))
        for k in sorted({r["fold"] for r in recs}):
            rk = [r for r in recs if r["fold"] == k]
            color = f"C{k % 10}"
            axes[0].plot([r["epoch"] for r in rk], [r["loss"] for r in rk], color=color, label=f"fold {k}")
            axes[1].plot([r["epoch"] for r in rk], [r["full"] for r in rk], color=color)
            axes[1].plot([r["epoch"] for r in rk], [r["imu_only"] for r in rk], color=color, ls="--")
        axes[0].set_title(f"{family}: training loss")
        axes[1].set_title(f"{family}: validation metric (solid full, dashed IMU-only)")
        axes[0].set_ylabel("training loss (mean over batches)")
        axes[1].set_ylabel("competition metric, validation fold")
        for a in axes:
            a.set_xlabel("epoch")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].legend(fontsize=7)
        plots.save(fig, f"training_curves_{family}.png")


def plot_ensemble_weights(plots: PlotFolder, weights: dict[str, dict[str, float]]) -> None:
    if not weights:
        return
    names = list(next(iter(weights.values())))
    fig, ax = plots.figure(figsize=(6, 3.5))
    for j, view in enumerate(VIEWS):
        ax.bar(np.arange(len(names)) + (j - 0.5) * 0.4, [weights[view][n] for n in names], 0.4, label=view)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("blend weight")
    ax.legend()
    ax.set_title("Ensemble weights per view")
    plots.save(fig, "ensemble_weights.png")


def plot_feature_importance(plots: PlotFolder, path: Path) -> None:
    if not path.exists():
        return
    imp = pl.read_csv(path).head(30)
    fig, ax = plots.figure(figsize=(8, 8))
    ax.barh(imp["feature"].to_list()[::-1], imp["gain"].to_list()[::-1])
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("LightGBM top-30 features (gain, mean over folds)")
    plots.save(fig, "lgbm_feature_importance.png")


def make_plots(out: Path, y_true: list[str], ens: dict[str, np.ndarray], report: dict[str, Any]) -> list[Path]:
    try:
        plots = PlotFolder(out / "plots")
    except Exception as err:
        LOG.warning("plots skipped: matplotlib unavailable (%s)", err)
        return []
    y = label_index(y_true, GESTURES)
    for name, draw in [("confusion", lambda: plot_confusion(plots, y, ens)),
                       ("per-gesture F1", lambda: plot_per_gesture_f1(plots, y, ens)),
                       ("curves", lambda: plot_training_curves(plots, out / "logs")),
                       ("weights", lambda: plot_ensemble_weights(plots, report.get("ensemble_weights", {}))),
                       ("importance", lambda: plot_feature_importance(plots, out / "feature_importance.csv"))]:
        try:
            draw()
        except Exception as err:  # a plot is never worth a lost training run
            LOG.warning("plot %s failed: %s", name, err)
    return plots.written


def write_run_summary(out: Path, cfg: Config, watch: Stopwatch, extra: dict[str, Any] | None = None,
                      continues: bool = True, show: bool = True) -> dict[str, Any]:
    """OUT/run_summary.json: wall time per stage, peak memory, versions, device, config.
    `continues`: add to the summary on disk (serving after training in one run), else start anew;
    `show`: print it (once per run, at its end)."""
    try:
        import resource
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        peak_mb = None
    path = out / "run_summary.json"
    summary = json.loads(path.read_text()) if continues and path.exists() else {}
    stages = {**summary.get("stage_seconds", {}), **{k: round(v, 2) for k, v in watch.seconds.items()}}
    device = torch_device()
    summary = {**summary, "stage_seconds": stages, "total_seconds": round(sum(stages.values()), 2),
               "peak_rss_mb": peak_mb, "device": device, "versions": library_versions(),
               "config": dataclasses.asdict(cfg), **(extra or {})}
    write_json(path, summary)
    if show:
        print("run summary: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items())
              + f"; total {summary['total_seconds']:.1f}s; peak RSS {peak_mb or float('nan'):.0f} MB; device {device}")
    return summary


# %% [markdown]
# ## 16. Command line and profiles
#
# The harness starts here: everything above is the model. Every Config field is a `--flag` and a
# `CMI_<FIELD>` variable, checked before anything runs; a profile fills only the fields left unset.

# %%
# The smoke profile is the full one in miniature: the same members (lgbm, torch, torch_imu, keras,
# keras_imu), tiny. The quick profile leaves out the IMU-only variants to keep the default run short.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(models=("lgbm", "torch", "keras"), net_variants=("all", "imu"), net_seeds=1, folds=2, epochs=2,
                  net_conv=(16, 32), net_hidden=16, demo_train_subjects=6, demo_test_subjects=2,
                  demo_pairs_per_subject=10, lgbm_learning_rate=0.2, lgbm_rounds=40, lgbm_max_bin=31),
    "quick": dict(models=("lgbm", "torch", "keras"), net_variants=("all",), net_seeds=1, folds=3, epochs=8,
                  net_conv=(32, 64), net_hidden=48, demo_train_subjects=16, demo_test_subjects=4,
                  demo_pairs_per_subject=51, lgbm_learning_rate=0.15, lgbm_rounds=300, lgbm_max_bin=63),
    "full": dict(models=("lgbm", "torch", "keras"), net_variants=("all", "imu"), net_seeds=1, folds=5, epochs=60,
                 net_conv=(64, 128), net_hidden=128, demo_train_subjects=40, demo_test_subjects=8,
                 demo_pairs_per_subject=51, lgbm_learning_rate=0.03, lgbm_rounds=2000, lgbm_max_bin=255),
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the option, the value given, what is allowed
    and the fix. Raised while parsing, before any data is read."""


# The Config's sections (the `# ---` comments in the class), each from its first field on: --help groups.
CONFIG_SECTIONS = {"where things are": "data_dir", "what to run": "profile", "demo data": "demo_train_subjects",
                   "features": "upside_down_fix", "LightGBM": "lgbm_learning_rate",
                   "the nets (both frameworks)": "net_conv", "PyTorch only": "torch_phase_pool",
                   "inference": "subject_assignment"}
JUPYTER_KERNEL_FLAGS = ("-f", "--f")  # ipykernel's `-f connection.json`: not ours, ignored
# ...and traitlets settings such as nbclient's --HistoryManager.hist_file=:memory: (ours are lower case)
JUPYTER_TRAITLET = re.compile(r"--[A-Z]\w*\.\w+(=.*)?")


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    return f"CMI_{name.upper()}"


def allowed_values(f: dataclasses.Field) -> str:
    """What a field accepts, in words (for errors and --help)."""
    meta, kind = f.metadata, str(f.type)
    if meta.get("choices"):
        return ("one or more of " if meta["many"] else "one of ") + ", ".join(meta["choices"]) + (
            " (comma-separated)" if meta["many"] else "")
    if meta.get("items"):
        typ, count = meta["items"]
        return f"{count or 'one or more'} comma-separated {'integers' if typ == 'int' else 'numbers'}"
    if "bool" in kind:
        return "true or false"
    number = "an integer" if "int" in kind else "a number" if "float" in kind else "text"
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"{number} from {low:g} to {high:g}"
    return f"{number} >= {low:g}" if low is not None else number


def _config_error(name: str, where: str, problem: str, f: dataclasses.Field) -> ConfigError:
    return ConfigError(f"{where}: {problem}; {flag_of(name)} (or {env_of(name)}) takes {allowed_values(f)}. "
                       f"Fix: give an allowed value, or leave it unset for the profile's or the Config's default.")


def _parse_value(text: str, f: dataclasses.Field, where: str) -> Any:
    kind = str(f.type)
    if f.metadata.get("many") or f.metadata.get("items"):
        return text  # a comma-separated list: checked_value splits and checks it
    if "bool" in kind:
        if text.lower() in ("1", "true", "yes", "on", ""):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise _config_error(f.name, where, "not a boolean", f)
    try:
        return int(text) if "int" in kind else float(text) if "float" in kind else text
    except ValueError:
        raise _config_error(f.name, where, f"not {'an integer' if 'int' in kind else 'a number'}", f) from None


def checked_value(f: dataclasses.Field, value: Any, where: str) -> Any:
    """`value` as the field holds it, if the field allows it, else ConfigError: a list field's text
    (or list) becomes a tuple of its items, parsed once, here."""
    meta = f.metadata
    if value is None:
        return None
    listed = list(value) if isinstance(value, (list, tuple)) else [x.strip() for x in str(value).split(",")]
    if meta.get("choices"):
        items = listed if meta["many"] else [value]
        if not all(items) or any(x not in meta["choices"] for x in items) or len(items) != len(set(items)):
            raise _config_error(f.name, where, "not among the choices", f)
        return tuple(items) if meta["many"] else value
    if meta.get("items"):
        typ, count = meta["items"]
        try:
            parsed = [int(x) if typ == "int" else float(x) for x in listed]
            whole = typ != "int" or all(float(x) == int(x) for x in listed if not isinstance(x, str))
        except (TypeError, ValueError):
            parsed, whole = [], False
        if (not parsed or not whole or (count and len(parsed) != count) or not all(map(math.isfinite, parsed))
                or min(parsed) < 0 or (typ == "int" and min(parsed) < 1)):
            raise _config_error(f.name, where, "not a list it can use", f)
        return tuple(parsed)
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)):
        raise _config_error(f.name, where, "out of range", f)
    return value


def as_text(value: Any) -> Any:
    """A value as its flag takes it: a list field's items comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _closest(name: str, candidates: Iterable[str]) -> str:
    near = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else "."


def _metavar(f: dataclasses.Field) -> str:
    meta, kind = f.metadata, str(f.type)
    if meta.get("choices"):
        return ",".join(meta["choices"][:2]) + ",..." if meta["many"] else "{" + ",".join(meta["choices"]) + "}"
    if meta.get("items"):
        return ",".join(["N"] * (meta["items"][1] or 2))
    if f.name in PATH_FIELDS:
        return "PATH"
    return "N" if "int" in kind else "X" if "float" in kind else "TEXT"


def config_parser(fields: dict[str, dataclasses.Field]) -> argparse.ArgumentParser:
    """Every Config field as a flag, grouped by the Config's sections, with what it takes and its
    default per profile."""
    parser = argparse.ArgumentParser(
        prog="notebook.py", usage="%(prog)s [--option VALUE ...]   (every option below, also as CMI_<FIELD>)",
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="CMI - Detect Behavior with Sensor Data: train, cross-validate and serve, one notebook.\n"
                    "  train and serve on demo data:  python notebook.py\n"
                    "  competition data:              python notebook.py --data-dir DIR\n"
                    "  serve a bundle only:           python notebook.py --stage infer --model-path DIR --data-dir DIR",
        epilog="Every option is also an environment variable CMI_<FIELD>: --folds 5 is CMI_FOLDS=5 (in a "
               "Kaggle notebook: %env CMI_FOLDS=5). A flag wins over the variable. A profile fills only "
               "the options left unset, whether by flag, variable or an edit of the Config cell.")
    starts = {first: title for title, first in CONFIG_SECTIONS.items()}
    group = parser
    for name, f in fields.items():
        if name in starts:
            group = parser.add_argument_group(starts[name])
        if any(name in p for p in PROFILES.values()):
            default = "per profile: " + ", ".join(f"{p} {as_text(PROFILES[p][name])}" for p in PROFILES)
        else:
            default = {"profile": "quick, full on Kaggle"}.get(name, as_text(f.default))
        facts = [allowed_values(f)] if allowed_values(f) != "text" else []
        facts += [f"default: {default}"] if default is not None else []
        text = f"{f.metadata['doc']} [{'; '.join(facts)}]" if facts else f.metadata["doc"]
        text = text.replace("%", "%%")
        if "bool" in str(f.type):  # --flag alone means true; --flag false turns it off
            group.add_argument(flag_of(name), dest=name, nargs="?", const="true", default=None, help=text,
                               metavar="true|false")
        else:
            group.add_argument(flag_of(name), dest=name, default=None, help=text, metavar=_metavar(f))
    return parser


def given_settings(argv: list[str], environ: dict[str, str],
                   fields: dict[str, dataclasses.Field]) -> tuple[dict[str, Any], dict[str, str]]:
    """The values set by CMI_ variables and flags (a flag wins), and where each came from. Unknown
    names are errors that suggest the closest valid one."""
    explicit, where = {}, {}
    for key, text in environ.items():
        if not key.startswith("CMI_"):
            continue
        name = key[4:].lower()
        if name not in fields:
            raise ConfigError(f"{key}: no such setting{_closest(key, map(env_of, fields))} Fix: use one of the "
                              f"CMI_<FIELD> names that `python notebook.py --help` lists, or unset {key}.")
        where[name] = f"{key}={text!r}"
        explicit[name] = _parse_value(text, fields[name], where[name])
    flags = [t.split("=", 1)[0] for t in argv if t.startswith("--")]
    twice = sorted({f for f in flags if flags.count(f) > 1 and f[2:].replace("-", "_") in fields})
    if twice:
        raise ConfigError(f"{', '.join(twice)}: given more than once ({' '.join(argv)}). Fix: give each option once.")
    known, unknown = config_parser(fields).parse_known_args(argv)
    rest = list(unknown)
    while rest:
        token = rest.pop(0)
        if token in JUPYTER_KERNEL_FLAGS:
            rest = rest[1:]
        elif not (token.startswith("--f=") or JUPYTER_TRAITLET.fullmatch(token)):
            option = token.split("=", 1)[0]
            raise ConfigError(f"{token!r}: no such option{_closest(option, map(flag_of, fields))} Fix: see "
                              f"`python notebook.py --help` for every option.")
    for name, value in vars(known).items():
        if value is not None:
            where[name] = f"{flag_of(name)} {value!r}"
            explicit[name] = _parse_value(value, fields[name], where[name])
    return explicit, where


def parse_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Build the Config from CMI_* environment variables and flags, the Config's own defaults, and the
    profile for what is still unset. Every value is checked here, before any data is read; only
    Jupyter's own kernel arguments are ignored."""
    environ = dict(os.environ if environ is None else environ)
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(Config)}
    explicit, where = given_settings(argv, environ, fields)
    cfg = dataclasses.replace(Config(), **explicit)
    profile = checked_value(fields["profile"], cfg.profile, where.get("profile", "Config.profile")) or (
        "full" if on_kaggle() else "quick")
    # A profile fills only the fields left unset (None): a value given by flag, by CMI_ variable or
    # by editing a default in the Config cell above always wins.
    for name, value in PROFILES[profile].items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
            where[name] = f"profile {profile}: {name}={value!r}"
    cfg.profile = profile
    if cfg.time_budget_hours is None:
        cfg.time_budget_hours = KAGGLE_TIME_BUDGET_HOURS if on_kaggle() else 0.0
        where["time_budget_hours"] = f"default {'on Kaggle' if on_kaggle() else 'here'}: {cfg.time_budget_hours:g}"
    for name, f in fields.items():
        setattr(cfg, name, checked_value(f, getattr(cfg, name), where.get(name, f"Config.{name} = {getattr(cfg, name)!r}")))
    if is_competition_rerun():
        cfg.stage = "infer"  # never train inside the scoring rerun
    if cfg.out_dir is None:
        cfg.out_dir = str(KAGGLE_WORKING if on_kaggle() else Path("working"))
    # Every path is made absolute here, once: the evaluation gateway runs in another working
    # directory, and a relative path read after that would point somewhere else.
    for name in PATH_FIELDS:
        if getattr(cfg, name):
            setattr(cfg, name, os.path.abspath(os.path.expanduser(getattr(cfg, name))))
    if cfg.data_dir is None:  # the competition folder when attached, else the demo folder
        if not cfg.demo and KAGGLE_DATA_DIR.exists():
            cfg.data_dir = str(KAGGLE_DATA_DIR)
        else:
            # Beside the out folder; on Kaggle outside /kaggle/working (the notebook's saved output).
            # An inference-only run never generates data: it serves the folder's test files or stops.
            cfg.data_dir = str(Path(tempfile.gettempdir()) / "cmi-demo-data" if on_kaggle()
                               else Path(cfg.out_dir).parent / "demo_data")
            cfg.demo = cfg.demo or cfg.stage != "infer"
    if cfg.demo and cfg.stage != "infer" and cfg.demo_train_subjects < cfg.folds:
        raise ConfigError(f"{where.get('demo_train_subjects', 'demo_train_subjects')} with "
                          f"{where.get('folds', 'folds')}: folds are grouped by subject, so the demo needs at "
                          f"least as many training subjects as folds. Fix: raise --demo-train-subjects or "
                          f"lower --folds.")
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise ConfigError(f"--out-dir (or CMI_OUT_DIR) {cfg.out_dir!r}: a file, not a folder. Fix: name a folder "
                          f"(it is created if missing), or move the file away.")
    return cfg


# %% [markdown]
# ## 17. Model bundle
#
# `OUT/bundle` holds the manifest, the model files and `dataset-metadata.json`, so
# `kaggle datasets create -p OUT/bundle` publishes it as is for an inference-only submission.
# The manifest lists every model file with its size and SHA-256 and the fingerprint of the run
# that produced it; loading checks them before any file reaches LightGBM, torch or Keras (a
# truncated LightGBM file aborts the whole process inside LightGBM's parser). A training run whose
# settings or data differ from the bundle's removes the old manifest before it writes any fold,
# so a retrain killed half-way never leaves a bundle that mixes two runs and still loads.

# %%
BUNDLE_FORMAT = 9  # the layout read_manifest accepts; raised whenever a bundle written before could not serve
def file_digest(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}


def verify_bundle_files(bundle: Path, files: list[str], listed: dict[str, dict[str, Any]]) -> None:
    """Raise BundleError unless each file exists with the size and SHA-256 the manifest lists."""
    for name in files:
        path, want = bundle / name, listed.get(name)
        if want is None:
            raise BundleError(f"{path}: not listed in manifest.json. Fix: retrain the bundle with this "
                              f"notebook version (manifest format {BUNDLE_FORMAT}).")
        if not path.is_file():
            raise BundleError(f"{path}: missing. Fix: publish every file of the bundle folder with manifest.json "
                              f"(`kaggle datasets create -p working/bundle`, or attach the training notebook's output).")
        got = file_digest(path)
        if got["bytes"] != want["bytes"]:
            raise BundleError(f"{path}: {got['bytes']:,} bytes where the manifest lists {want['bytes']:,} "
                              f"(truncated by an interrupted copy or upload?). Fix: copy or upload the bundle again.")
        if got["sha256"] != want["sha256"]:
            raise BundleError(f"{path}: content differs from the manifest's SHA-256 (written by another "
                              f"training run?). Fix: retrain into an empty folder, or restore the bundle as it was.")


def run_fingerprint(cfg: Config, data_fingerprint: str) -> str:
    """What a bundle's models as a whole depend on: every setting that affects a member or which
    members there are (the Config's `affects`), and the data."""
    return settings_fingerprint(cfg, None, data_fingerprint, FEATURE_VERSION, BUNDLE_FORMAT)


UNFINISHED = "training_unfinished.json"  # in a bundle folder whose manifest a run removed and has not rewritten


def invalidate_stale_manifest(bundle: Path, fingerprint: str) -> None:
    """Remove a manifest written by a run with other settings or data, before any fold changes."""
    path = bundle / "manifest.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text()).get("run_fingerprint")
    except (OSError, ValueError, AttributeError):
        old = None
    if old != fingerprint:
        write_json(bundle / UNFINISHED, {"manifest_removed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         "why": "a training run with other settings or data started here"})
        path.unlink()
        say(f"bundle: removed {path}: this run's settings or data differ from the bundle's, so it cannot "
            f"serve until this run writes its own manifest at the end")


def kaggle_username() -> str:
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    creds = Path.home() / ".kaggle" / "kaggle.json"
    try:
        return json.loads(creds.read_text())["username"]
    except (OSError, ValueError, KeyError):
        return "YOUR_KAGGLE_USERNAME"


MEMBER_CLASSES: dict[str, type[Member]] = {"lgbm": LgbmMember, "torch": TorchMember, "keras": KerasMember}


def member_from_manifest(bundle: Path, name: str, entry: dict[str, Any], manifest: dict[str, Any]) -> Member:
    """The member a manifest entry describes, under the config it was trained with (narrowed to the
    member's architecture and variant), with its input names."""
    family = member_family(name)
    if family not in MEMBER_CLASSES:
        raise BundleError(f"{bundle}/manifest.json: unknown member {name!r} (family {family!r}). Fix: retrain the "
                          f"bundle with this notebook version.")
    cfg = dataclasses.replace(config_from(manifest["config"]), net_variants=(member_variant(name),))
    return MEMBER_CLASSES[family](name, cfg, entry.get(MEMBER_CLASSES[family].names_key))


@dataclass
class LoadedMember:
    """A member's fold models as the bundle serves them, with their fold weights."""
    member: Member
    folds: list[Any]
    weights: np.ndarray

    def fold_outputs(self, prepared: Sequences, channels: pl.DataFrame, cache: dict[str, Any],
                     exact: bool = False) -> list[dict[str, np.ndarray]]:
        """Every fold's heads for prepared sequences; `cache` keeps the inputs several members read."""
        inputs = self.member.call_inputs(prepared, channels, cache)
        return [self.member.predict(fold, inputs, exact) for fold in self.folds]

    def heads(self, prepared: Sequences, channels: pl.DataFrame, cache: dict[str, Any]) -> dict[str, np.ndarray]:
        """Every head's output, fold-weighted, as served: "gesture" (n, 18) probabilities, and the
        nets' "orientation" and "behavior" where the member has them."""
        outputs = self.fold_outputs(prepared, channels, cache)
        return {head: blend([o[head] for o in outputs], self.weights) for head in outputs[0]}


def load_member(bundle: Path, name: str, entry: dict[str, Any], manifest: dict[str, Any],
                produced: dict[str, list[str]]) -> LoadedMember:
    """One member's fold models, after checking its inputs and its files against the manifest."""
    member = member_from_manifest(bundle, name, entry, manifest)
    member.check_names(bundle, produced)
    verify_bundle_files(bundle, entry["files"], manifest.get("files", {}))
    if member.family == "torch":
        torch.set_num_threads(1)  # one short sequence per call: threads only add overhead
    return LoadedMember(member, [member.load(bundle / f) for f in entry["files"]],
                        np.asarray(entry["fold_weights"], dtype=np.float64))


def produced_names(cfg: Config) -> dict[str, list[str]]:
    """Feature and channel names the current code makes (from a tiny synthetic sequence)."""
    n = 12
    frame = pl.DataFrame({"sequence_id": ["SEQ_CHECK"] * n, "sequence_counter": list(range(n)),
                          "subject": ["SUBJ_CHECK"] * n,
                          **{c: np.linspace(0.1, 1.0, n, dtype=np.float32) for c in SENSOR_COLS}})
    prepared, channels = derive(frame, pl.DataFrame({"subject": ["SUBJ_CHECK"]}), cfg)
    return {"features": aggregate_features(prepared, channels, cfg.sample_rate_hz).names,
            "channels": net_inputs_from(prepared, channels, cfg.tof_grid).names}


def call_sequences(sequence: pl.DataFrame, demographics: pl.DataFrame, turned: bool = False) -> Sequences:
    """One call's rows prepared as every model reads them: the sequence and its one demographics row tied
    by a fixed subject key, whatever they say (turned back first when the wearer is upside down)."""
    seq = sequence.with_columns(pl.lit("SUBJ_CALL").alias("subject"))
    demo = demographics.head(1).with_columns(pl.lit("SUBJ_CALL").alias("subject"))
    return prepare_sequences(seq, mark_upside_down(demo, ["SUBJ_CALL"]) if turned else demo)


# How a call is answered, in serving and in the bundle's proof alike: what serving counts, what it
# remembers per subject, and the decision from the members' probabilities.
class ServingStats:
    """What serving did, for the summary line and run_summary.json: calls, which members served each
    view, reduced blends, fallbacks, turned wearers, and each input problem counted (logged once)."""

    def __init__(self) -> None:
        self.calls = 0
        self.problems: Counter[str] = Counter()
        self.served: dict[str, Counter[str]] = {v: Counter() for v in VIEWS}  # view -> member -> calls
        self.reduced = 0  # calls blended from fewer members than the bundle's blend weights name
        self.fallbacks = 0  # calls answered with the fallback gesture
        self.streak = 0  # consecutive calls answered by the fallback
        self.turned = 0  # calls whose rows were turned back (an upside-down wearer)

    def note(self, problem: str, detail: str = "") -> None:
        if not self.problems[problem]:
            LOG.warning("predict: %s%s (logged once; counted in the summary)", problem, f": {detail}" if detail else "")
        self.problems[problem] += 1


class SubjectState:
    """What serving remembers per subject across calls: each sequence's gesture and slot
    probabilities (the per-subject rules), and each sequence's upside-down score. A sequence seen
    again replaces its entry."""

    def __init__(self) -> None:
        self.history: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.wear_scores: dict[str, dict[str, float]] = {}

    def upside_down(self, bundle: ServedBundle, fix: bool, prepared: Sequences, subject: str | None,
                    sequence_id: str) -> bool:
        """Whether this subject wears the device upside down, judged on their sequences so far (this
        one included) as in training; never when the bundle was trained without the check or `fix`
        (--upside-down-fix) is off."""
        spec = bundle.manifest.get("upside_down") or {}
        if not (spec.get("enabled") and fix):
            return False
        _, score = UpsideDownCheck(**spec["check"]).evidence(prepared)
        seen = self.wear_scores.setdefault(subject, {}) if subject else {}
        seen.pop(sequence_id, None)
        seen[sequence_id] = float(score[0])
        return UpsideDownCheck.decide(list(seen.values()))

    def choose(self, rule: str, p: np.ndarray, subject: str | None, slot_p: np.ndarray | None, sequence_id: str) -> int:
        """The gesture index under `rule` (15.1) from this call's gesture probabilities `p` (18,) and
        slot probabilities `slot_p` (102,; the slots rule); a per-subject rule runs over this
        subject's sequences so far, each once (a call without a subject gets the per-sequence argmax)."""
        if rule in ("gesture_capacity", "slots") and subject:
            rows = self.history.setdefault(subject, {})
            rows.pop(sequence_id, None)  # seen again: its new entry replaces the old, and is the last
            rows[sequence_id] = (p, slot_p if slot_p is not None else UNIFORM_SLOTS)
            return int(serve_labels(rule, np.vstack([r[0] for r in rows.values()]),
                                    np.vstack([r[1] for r in rows.values()]))[-1])
        return int(serve_labels(rule if rule == "argmax9" else "argmax", p[None, :])[0])


def blend_answers(manifest: dict[str, Any], probas: dict[str, np.ndarray], view: str,
                  stats: ServingStats) -> np.ndarray | None:
    """The bundle's blend for `view` over the members that answered (weights renormalised; when only
    zero-weight members answered, they count equally), with the view's target scale."""
    if not probas:
        return None
    weights = dict(zip(manifest["members"], manifest["blend_weights"][view]))
    if any(weights[n] > 0 and n not in probas for n in weights):
        stats.reduced += 1
    stats.served[view].update([n for n in probas if weights.get(n, 0.0) > 0] or list(probas))
    w = np.array([weights.get(n, 0.0) for n in probas], dtype=np.float64)
    p = target_scaled(blend(list(probas.values()), w if w.sum() > 0 else np.ones(len(probas))),
                      manifest["target_scale"][view])[0]
    if not np.isfinite(p).all():
        stats.note("non-finite blend; the answering members averaged with equal weights")
        p = blend(list(probas.values()), np.ones(len(probas)))[0]
    return p


def decide(manifest: dict[str, Any], plan: dict[str, Any], subjects: SubjectState, stats: ServingStats,
           probas: dict[str, np.ndarray], view: str, slot_inputs: dict[str, np.ndarray], subject: str | None,
           sequence_id: str) -> str | None:
    """One call's answer from its members' (1, 18) probabilities and what the slot sources read
    (`slot_inputs`): the bundle's blend, then the serving plan over this subject's sequences so far. None when
    no member answered. predict() and the bundle's proof both decide here."""
    p = blend_answers(manifest, probas, view, stats)
    if p is None:
        stats.note("no member gave finite probabilities")
        return None
    slot_p = None
    if plan["rule"] == "slots":
        source = plan["slot_source"]
        if any(k not in slot_inputs for k in SLOT_INPUTS[source]):
            stats.note(f"the {source} slot source has no answer for this call; uniform slot context")
        slot_p = slot_probabilities(source, p[None, :], {**UNIFORM_SLOT_INPUTS, **slot_inputs},
                                    plan["gesture_weight"][view])[0]
    return str(GESTURES[subjects.choose(plan["rule"], p, subject, slot_p, sequence_id)])


# The bundle's proof: reference calls made by the demo generator (never competition rows: bundles are
# published as datasets), every member's per-fold heads on them (and the slot models' outputs when the
# plan reads them), the answers served from those, and a copy of the plan, stored at training and
# replayed at load through the steps predict() runs.
PROOF_SEED = 4242
PROOF_CALLS, PROOF_OUTPUTS = "proof_calls.parquet", "proof_outputs.npz"
PROOF_TOLERANCE = 1e-3  # largest probability difference a member may show (library versions, devices)
SLOT_OUTPUT = "slot_models"  # the proof's outputs key of the slot models' (calls, 6) probabilities
# What serving decides by besides the model files. The proof keeps a copy: an edit of one of them (a rule
# tried by hand, a weight) would change answers that no replay of 8 calls need show, so it is refused.
PLAN_FIELDS = ("serving", "blend_weights", "target_scale", "fallback_gesture", "upside_down")


def plan_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's plan fields and each member's fold weights, as the proof copies them."""
    return {**{k: manifest[k] for k in PLAN_FIELDS},
            "members": {n: {"fold_weights": f["fold_weights"]} for n, f in manifest["members"].items()}}


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The path (e.g. `serving.rule`, `blend_weights.full[2]`) of the first value where two JSON values
    differ; None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else where


def load_slot_models(path: Path, manifest: dict[str, Any],
                     produced: dict[str, list[str]]) -> tuple[dict[str, list[Any]], list[str]]:
    """The slot models (orientation / behaviour -> fold boosters) and their feature names; BundleError
    when they cannot load."""
    spec = manifest["slot_models"]
    missing = [c for c in spec["feature_names"] if c not in set(produced["features"])]
    if missing:
        raise BundleError(f"slot models expect features this code does not make, e.g. {missing[:2]}")
    verify_bundle_files(path, spec["files"], manifest.get("files", {}))
    boosters = {}
    for target in SLOT_MODEL_TARGETS:
        names = {bundle_file(f"slot_model_{target}", k, ".txt") for k in range(len(spec["files"]))}
        boosters[target] = [lightgbm().Booster(model_file=str(path / f)) for f in spec["files"] if f in names]
        if not boosters[target]:
            raise BundleError(f"{path}: no {target} slot model among the manifest's slot_models files "
                              f"{spec['files']}. Fix: retrain the bundle with this notebook version.")
    return boosters, spec["feature_names"]


def proof_calls(cfg: Config) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Eight reference calls in the test schema: four demo subjects (the first left-handed) with two
    sequences each, every second one IMU-only (thm/ToF empty); and their demographics."""
    rng = np.random.default_rng(PROOF_SEED)
    subjects = _demo_subjects(rng, 4, set(), 0)
    subjects[0]["handedness"] = 0
    rows = _demo_rows(rng, subjects, False, dataclasses.replace(cfg, demo_pairs_per_subject=1),
                      iter(range(990001, 990100)), imu_only_share=0.0)
    imu_only = rows["sequence_id"].unique(maintain_order=True).to_list()[1::2]
    rows = rows.with_columns(pl.when(pl.col("sequence_id").is_in(imu_only)).then(None).otherwise(pl.col(c)).alias(c)
                             for c in THM_COLS + TOF_COLS)
    return rows, _demo_demographics(subjects)


def replay_proof(models: dict[str, LoadedMember], calls: pl.DataFrame, demographics: pl.DataFrame, cfg: Config,
                 slot_models: dict[str, list[Any]] | None = None, slot_names: list[str] = ()
                 ) -> tuple[dict[str, np.ndarray], list[str], list[tuple[str, str]]]:
    """The reference calls, one at a time as predict() prepares them (no upside-down turn): each
    member's per-fold heads, "<member>.<head>" (folds, calls, k), and with `slot_models` their
    (calls, 6) probabilities under SLOT_OUTPUT; each call's view and its (subject, sequence_id)."""
    out: dict[str, list[np.ndarray]] = {}
    views, keys = [], []
    for _, seq in calls.group_by("sequence_id", maintain_order=True):
        subject = str(seq["subject"][0])
        prepared = call_sequences(seq.with_columns(pl.lit("SEQ_CALL").alias("sequence_id")),
                            demographics.filter(pl.col("subject") == subject))
        channels = sequence_channels(prepared, cfg.sample_rate_hz)
        views.append("imu_only" if is_imu_only(prepared.sensors) else "full")
        keys.append((subject, str(seq["sequence_id"][0])))
        cache: dict[str, Any] = {}
        for name, loaded in models.items():
            folds = loaded.fold_outputs(prepared, channels, cache, exact=True)
            for head in folds[0]:
                out.setdefault(f"{name}.{head}", []).append(np.stack([o[head] for o in folds]).astype(np.float32))
        if slot_models:
            table = call_table(prepared, channels, cache, cfg.sample_rate_hz)
            out.setdefault(SLOT_OUTPUT, []).append(slot_model_proba(slot_models, table.matrix(slot_names)).astype(np.float32))
    return {k: np.concatenate(v, axis=-2) for k, v in out.items()}, views, keys


def proof_answers(outputs: dict[str, np.ndarray], manifest: dict[str, Any], plan: dict[str, Any], views: list[str],
                  keys: list[tuple[str, str]], members: list[str]) -> list[str]:
    """What predict() answers the reference calls, in their order, from these outputs of `members`:
    each member's heads fold-weighted, then decide() under `plan` over each subject's calls so far."""
    subjects, stats, answers = SubjectState(), ServingStats(), []
    for i, (view, (subject, sequence_id)) in enumerate(zip(views, keys)):
        heads = [{k.split(".", 1)[1]: blend(list(v[:, i:i + 1]), np.asarray(manifest["members"][n]["fold_weights"]))
                  for k, v in outputs.items() if k.startswith(f"{n}.")} for n in members]
        slot_inputs = net_slot_inputs(heads)
        if SLOT_OUTPUT in outputs:
            slot_inputs["lgbm"] = outputs[SLOT_OUTPUT][i:i + 1]
        answers.append(decide(manifest, plan, subjects, stats, {n: h["gesture"] for n, h in zip(members, heads)},
                              view, slot_inputs, subject, sequence_id) or manifest["fallback_gesture"])
    return answers


def record_proof(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the proof files into the bundle; returns the manifest's "proof" entry (the files are then
    listed with their digests like every model file)."""
    cfg = config_from(manifest["config"])
    produced = produced_names(cfg)
    models = {name: load_member(bundle, name, entry, manifest, produced) for name, entry in manifest["members"].items()}
    plan = manifest["serving"]
    reads_slot_models = "lgbm" in SLOT_INPUTS.get(plan["slot_source"], ())
    slot_models, slot_names = load_slot_models(bundle, manifest, produced) if reads_slot_models else ({}, [])
    calls, demographics = proof_calls(cfg)
    outputs, views, keys = replay_proof(models, calls, demographics, cfg, slot_models, slot_names)
    atomic_write(bundle / PROOF_CALLS, lambda p: calls.write_parquet(p))
    atomic_write(bundle / PROOF_OUTPUTS, lambda p: np.savez(p, **outputs))
    return {"calls": PROOF_CALLS, "outputs": PROOF_OUTPUTS, "demographics": demographics.to_dicts(),
            "views": views, "answers": proof_answers(outputs, manifest, plan, views, keys, list(models)),
            "plan": plan_of(manifest), "tolerance": PROOF_TOLERANCE, "versions": library_versions()}


def write_bundle(bundle: Path, cfg: Config, td: TrainingData, results: dict[str, dict[str, Any]],
                 blend_weights: dict[str, list[float]], target_scale: dict[str, float],
                 report: dict[str, Any], slot_models: dict[str, Any], plan: dict[str, Any]) -> None:
    prior = np.bincount(td.y, minlength=len(GESTURES)) / len(td.y)
    manifest = {
        "format_version": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "class_names": GESTURES,
        "feature_version": FEATURE_VERSION,
        "run_fingerprint": run_fingerprint(cfg, td.fingerprint),
        "members": {name: result["entry"] for name, result in results.items()},
        "files": {f: file_digest(bundle / f) for entry in [*(m["entry"] for m in results.values()), slot_models]
                  for f in entry["files"]},
        "slot_models": {k: slot_models[k] for k in ("files", "feature_names")},
        "serving": plan,
        "blend_weights": blend_weights,
        "target_scale": target_scale,
        "upside_down": {"enabled": cfg.upside_down_fix, "check": dataclasses.asdict(td.upside_down),
                        "training_subjects": sorted(td.dataset.train_demographics.filter(pl.col(UPSIDE_DOWN))["subject"])},
        "fallback_gesture": GESTURES[int(np.argmax(prior))],
        "data_fingerprint": td.fingerprint,
        "config": dataclasses.asdict(cfg),
        "versions": library_versions(),
        "cv": {name: {v: rep[v]["metric"] for v in VIEWS if v in rep}
               for name, rep in report["models"].items()},
        "expected_lb": report.get("expected_lb"),
    }
    manifest["proof"] = record_proof(bundle, manifest)
    manifest["files"].update({f: file_digest(bundle / f) for f in (PROOF_CALLS, PROOF_OUTPUTS)})
    write_json(bundle / "manifest.json", manifest)
    (bundle / UNFINISHED).unlink(missing_ok=True)
    username = kaggle_username()
    write_json(bundle / "dataset-metadata.json", {
        "title": "CMI BFRB model bundle", "id": f"{username}/cmi-bfrb-bundle", "licenses": [{"name": "CC0-1.0"}]})
    if username == "YOUR_KAGGLE_USERNAME":
        say(f"bundle: before `kaggle datasets create -p {bundle}`, edit {bundle / 'dataset-metadata.json'}: "
            f"replace YOUR_KAGGLE_USERNAME by your Kaggle username (no KAGGLE_USERNAME or ~/.kaggle/kaggle.json here)")


MANIFEST_FIELDS = {"format_version": (int, str), "class_names": list, "feature_version": int, "members": dict,
                   "files": dict, "blend_weights": dict, "target_scale": dict, "config": dict, "serving": dict,
                   "fallback_gesture": str, "slot_models": dict, "upside_down": dict, "proof": dict}
FIX_RETRAIN = "Fix: retrain the bundle with this notebook version, or restore manifest.json as training wrote it."


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _number_list(values: Any, n: int | None = None) -> bool:
    """A list of finite non-negative numbers (of length n)."""
    return (isinstance(values, list) and (n is None or len(values) == n) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values))


def check_bundle_name(bundle: Path, name: Any, field_name: str) -> None:
    """A file the manifest names must be a plain relative name that stays inside the bundle."""
    path = Path(str(name))
    inside = os.path.realpath(bundle / path).startswith(os.path.realpath(bundle) + os.sep)
    if not isinstance(name, str) or not name or path.is_absolute() or ".." in path.parts or "\\" in name or not inside:
        raise BundleError(f"{bundle}/manifest.json: {field_name} names {_short(name)}, which is not a file inside "
                          f"the bundle folder. {FIX_RETRAIN}")


def validate_manifest(bundle: Path, manifest: Any) -> dict[str, Any]:
    """Every field serving reads, with its type and its value checked; a refusal names the field, the
    value and the fix."""
    where = f"{bundle}/manifest.json"
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: a JSON {type(manifest).__name__}, not an object. {FIX_RETRAIN}")
    for key, kind in MANIFEST_FIELDS.items():
        if key not in manifest:
            raise BundleError(f"{where}: the field {key!r} is missing. {FIX_RETRAIN}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise BundleError(f"{where}: {key} = {_short(manifest[key])} is not a {getattr(kind, '__name__', 'number')}. "
                              f"{FIX_RETRAIN}")
    if manifest["fallback_gesture"] not in GESTURES:
        raise BundleError(f"{where}: fallback_gesture = {_short(manifest['fallback_gesture'])}, not one of the 18 "
                          f"gestures. {FIX_RETRAIN}")
    serving = manifest["serving"]
    if serving.get("rule") not in SERVING_RULES:
        raise BundleError(f"{where}: serving.rule = {_short(serving.get('rule'))}, not one of {list(SERVING_RULES)}. "
                          f"{FIX_RETRAIN}")
    if serving["rule"] == "slots":
        source, weights = serving.get("slot_source"), serving.get("gesture_weight")
        if source not in SLOT_SOURCES:
            raise BundleError(f"{where}: serving.slot_source = {_short(source)}, not one of {list(SLOT_SOURCES)}. "
                              f"{FIX_RETRAIN}")
        values = [weights.get(v) for v in VIEWS] if isinstance(weights, dict) else None
        if not (_number_list(values) and max(values) <= 10):
            raise BundleError(f"{where}: serving.gesture_weight = {_short(weights)}; it takes a number from 0 to 10 "
                              f"per view {list(VIEWS)}. {FIX_RETRAIN}")
    members = manifest["members"]
    if not members:
        raise BundleError(f"{where}: lists no member. {FIX_RETRAIN}")
    for view in VIEWS:
        weights, scale = manifest["blend_weights"].get(view), manifest["target_scale"].get(view)
        if not (_number_list(weights, len(members)) and abs(sum(weights) - 1.0) < 1e-6):
            raise BundleError(f"{where}: blend_weights.{view} = {_short(weights)}; it takes {len(members)} finite "
                              f"non-negative weights summing to 1, one per member of {list(members)}. {FIX_RETRAIN}")
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
            raise BundleError(f"{where}: target_scale.{view} = {_short(scale)}; it takes a finite number > 0. {FIX_RETRAIN}")
    for name, entry in members.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), list) or not entry["files"]:
            raise BundleError(f"{where}: members.{name} = {_short(entry)} lists no files. {FIX_RETRAIN}")
        if not (_number_list(entry.get("fold_weights"), len(entry["files"])) and sum(entry["fold_weights"]) > 0):
            raise BundleError(f"{where}: members.{name}.fold_weights = {_short(entry.get('fold_weights'))}; it takes "
                              f"one finite non-negative weight per file, not all 0. {FIX_RETRAIN}")
        names = entry.get("feature_names" if name == "lgbm" else "channel_names")
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise BundleError(f"{where}: members.{name} has no list of input names. {FIX_RETRAIN}")
        for f in entry["files"]:
            check_bundle_name(bundle, f, f"members.{name}.files")
    slot_models = manifest["slot_models"]
    if not (isinstance(slot_models.get("files"), list) and isinstance(slot_models.get("feature_names"), list)):
        raise BundleError(f"{where}: slot_models = {_short(slot_models)} lacks its files or feature_names. {FIX_RETRAIN}")
    for f in slot_models["files"]:
        check_bundle_name(bundle, f, "slot_models.files")
    turn = manifest["upside_down"]
    if not isinstance(turn.get("enabled"), bool):
        raise BundleError(f"{where}: upside_down.enabled = {_short(turn.get('enabled'))}; it takes true or false. "
                          f"{FIX_RETRAIN}")
    if turn["enabled"] and not (isinstance(turn.get("check"), dict) and set(turn["check"]) == {
            f.name for f in dataclasses.fields(UpsideDownCheck)} and UpsideDownCheck(**turn["check"]).is_valid()):
        raise BundleError(f"{where}: upside_down.check = {_short(turn.get('check'))}; it takes means (4 x 3), "
                          f"covariances (4 x 3 x 3, positive definite) and weights (4, positive). {FIX_RETRAIN}")
    for f, digest in manifest["files"].items():
        check_bundle_name(bundle, f, "files")
        if not (isinstance(digest, dict) and isinstance(digest.get("bytes"), int) and isinstance(digest.get("sha256"), str)):
            raise BundleError(f"{where}: files.{f} = {_short(digest)}; it takes its bytes and sha256. {FIX_RETRAIN}")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name, value in manifest["config"].items():  # the training settings serving reads (config_from)
        f = fields.get(name)
        if f is None or value is None:
            continue  # a field this code no longer has is ignored
        kind = str(f.type)
        typed = (isinstance(value, list) if f.metadata.get("many") or f.metadata.get("items") else
                 isinstance(value, bool) if "bool" in kind else isinstance(value, bool) is False and (
            isinstance(value, int) if "int" in kind else isinstance(value, (int, float)) if "float" in kind
            else isinstance(value, str)))
        try:
            usable = typed and checked_value(f, value, f"config.{name}") is not None
        except ConfigError:
            usable = False
        if not usable:
            raise BundleError(f"{where}: config.{name} = {_short(value)}; it takes {allowed_values(f)}. {FIX_RETRAIN}")
    return manifest


def read_manifest(bundle: Path) -> dict[str, Any]:
    """The manifest, checked for what the whole bundle depends on (format, class order, features)
    and validated field by field."""
    path = bundle / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: unreadable ({err}). Fix: copy or upload the bundle again.") from err
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    try:
        number = int(str(version).strip())  # a hand-edited "3" is still format 3
    except ValueError:
        number = None
    fix = "Fix: retrain the bundle with this notebook version."
    if number != BUNDLE_FORMAT and isinstance(manifest, dict):
        raise BundleError(f"{path} has format_version {version!r}; this code reads format {BUNDLE_FORMAT}. {fix}")
    validate_manifest(bundle, manifest)
    if manifest["class_names"] != GESTURES:
        raise BundleError(f"{path}: class order differs from this code's 18 gestures. {fix}")
    if manifest["feature_version"] != FEATURE_VERSION:
        raise BundleError(f"{path}: feature_version {manifest.get('feature_version')!r}, this code computes "
                          f"feature version {FEATURE_VERSION}. {fix}")
    return manifest


def created_rank(manifest: dict[str, Any]) -> tuple[int, ...]:
    """A manifest's `created` time as a sortable tuple; one that is no such time ranks oldest."""
    try:
        return tuple(time.strptime(str(manifest.get("created")), "%Y-%m-%dT%H:%M:%SZ"))[:6]
    except ValueError:
        return (0,) * 6


def bundle_candidates(path: Path) -> tuple[list[Path], dict[Path, str]]:
    """A bundle folder; or the bundles below `path` (a Kaggle dataset mount, /kaggle/input) whose
    manifests are valid, newest first by their creation time, and those that are not, with why.
    load_bundle serves the first that can serve whole (files, proof and plan)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return [path], {}
    found = sorted(m.parent for m in path.rglob("manifest.json") if len(m.relative_to(path).parts) <= 4) \
        if path.exists() else []
    if not found and (path / UNFINISHED).exists():
        removed = json.loads((path / UNFINISHED).read_text()).get("manifest_removed", "?")
        raise FileNotFoundError(f"no model bundle at {path}: a training run with other settings or data removed "
                                f"its manifest.json at {removed} and has not finished (interrupted?). Fix: rerun "
                                f"that training to the end (its finished folds resume), or train again with the "
                                f"bundle's own settings.")
    if not found:
        attached = sorted(str(p) for p in path.iterdir())[:8] if path.is_dir() else []
        raise FileNotFoundError(f"no model bundle at {path}: expected {path}/manifest.json (format "
                                f"version {BUNDLE_FORMAT}) or a folder containing one"
                                + (f"; it holds {attached}" if attached else "; there is no such folder")
                                + ". Fix: train first (--stage train), or point --model-path (CMI_MODEL_PATH in a "
                                "notebook) at the bundle's folder, e.g. the attached training notebook's output under "
                                "/kaggle/input.")
    ranked, broken = [], {}
    for folder in found:
        try:
            ranked.append((created_rank(read_manifest(folder)), str(folder)))
        except BundleError as err:
            broken[folder] = str(err)
    return [Path(f) for _, f in sorted(ranked, reverse=True)], broken


def find_bundle(path: Path) -> Path:
    """The bundle load_bundle tries first (the newest with a valid manifest)."""
    candidates, broken = bundle_candidates(path)
    if not candidates:
        raise BundleError(f"{path}: no bundle below it can serve: " + "; ".join(broken.values()))
    return candidates[0]


# %% [markdown]
# ## 18. Training: everything in order

# %%
def ensemble_members(cfg: Config) -> list[Member]:
    """Every member the config asks for: one per --net-variants choice of a net."""
    members: list[Member] = []
    for family in cfg.models:
        if family == "lgbm":
            members.append(LgbmMember("lgbm", cfg))
            continue
        for v in cfg.net_variants:
            one = dataclasses.replace(cfg, net_variants=(v,))
            members.append(MEMBER_CLASSES[family](member_name(family, one), one))
    return members


def train_members(cfg: Config, td: TrainingData, watch: Stopwatch, clock: TrainingClock,
                  report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every member's folds, its OOF files (oof/oof_<member>_<view>.npy) and its CV report. A member
    whose folds the clock does not allow to finish is left out, named in report["not_trained"]."""
    out = Path(cfg.out_dir)
    y_true = td.labels["gesture"].to_list()
    results: dict[str, dict[str, Any]] = {}
    for member in ensemble_members(cfg):
        name = member.name
        try:
            with watch(f"train_{name}"):
                result = run_folds(member, td, out / "bundle", out, clock)
        except OutOfBudget as why:
            report["not_trained"][name] = str(why)
            say(f"{name}: not trained in this session ({why}); the folds it finished are in the bundle")
            continue
        results[name] = result
        for view in VIEWS:  # named by member and view (a "_imu" suffix alone would make torch's
            for head, arr in result["heads"][view].items():  # IMU-only view and torch_imu's full view the same file)
                tail = "" if head == "gesture" else f"_{head}"  # the other heads beside the gesture probabilities
                atomic_write(out / "oof" / f"oof_{name}_{view}{tail}.npy", lambda p, a=arr: np.save(p, a))
        report["models"][name] = model_report(y_true, result["oof"], td.folds)
        print_fold_table(name, report["models"][name])
    return results


def fit_ensemble(cfg: Config, td: TrainingData, results: dict[str, dict[str, Any]],
                 report: dict[str, Any]) -> tuple[dict[str, list[float]], dict[str, float], dict[str, np.ndarray]]:
    """Blend weights per view on OOF, the target scale and the per-subject assignment (each kept
    only when it wins out of sample), with the nested and leave-one-member-out figures in `report`.
    Returns (blend weights, target scale, the ensemble OOF exactly as predict() will serve it)."""
    y_true = td.labels["gesture"].to_list()
    names = list(results)
    blend_weights = {v: fit_blend_weights(y_true, [results[n]["oof"][v] for n in names]) for v in VIEWS}
    ens = {v: blend([results[n]["oof"][v] for n in names], blend_weights[v]) for v in VIEWS}
    report["target_scale"] = {v: target_scale_check(y_true, ens[v], td.folds) for v in VIEWS}
    target_scale = {v: c["scale"] if c["enabled"] else 1.0 for v, c in report["target_scale"].items()}
    say("target vs non-target scale (fitted on other folds): " + ", ".join(
        f"{v} x{c['scale']:g} {c['base']:.4f} -> {c['nested']:.4f} ({c['gain']:+.4f}, "
        f"{'on' if c['enabled'] else 'off'})" for v, c in report["target_scale"].items()))
    ens = {v: target_scaled(ens[v], target_scale[v]) for v in VIEWS}
    report["models"]["ensemble"] = model_report(y_true, ens, td.folds)
    report["ensemble_weights"] = {v: dict(zip(names, w)) for v, w in blend_weights.items()}
    nested = {v: nested_blend_scores(y_true, [results[n]["oof"][v] for n in names], td.folds) for v in VIEWS}
    report["ensemble_nested"] = {**nested, "expected_lb": 0.5 * (nested["full"]["metric"] + nested["imu_only"]["metric"])}
    report["ensemble_without"] = ensemble_ablation(y_true, {n: results[n]["oof"] for n in names})
    if report["ensemble_without"]:
        say(f"ensemble expected LB {report['models']['ensemble']['expected_lb']:.4f}; refitted without "
            + ", ".join(f"{n}: {r['expected_lb']:.4f}" for n, r in report["ensemble_without"].items()))
    say(f"ensemble weights: {report['ensemble_weights']}; nested (weights fitted on other folds): "
        f"full {nested['full']['metric']:.4f} imu_only {nested['imu_only']['metric']:.4f}")
    report["expected_lb"] = report["models"]["ensemble"]["expected_lb"]
    return blend_weights, target_scale, ens


def choose_serving_rule(cfg: Config, td: TrainingData, ens: dict[str, np.ndarray],
                        results: dict[str, dict[str, Any]], slot_oof: np.ndarray, report: dict[str, Any]) -> dict[str, Any]:
    """The serving plan of 15.1 with the best replayed expected LB (only the per-row rules when
    --subject-assignment is off), with every candidate's figures in `report`. The slot sources read
    the slot models' OOF (`slot_oof`) and the nets' heads averaged as predict() averages them."""
    rules = SERVING_RULES if cfg.subject_assignment else ("argmax", "argmax9")
    slot_inputs = {v: {"lgbm": slot_oof, **net_slot_inputs(result["heads"][v] for result in results.values())}
                   for v in VIEWS}
    check = serving_rule_check(td.labels["gesture"].to_list(), ens, slot_inputs, td.labels["subject"].to_numpy(),
                               td.folds, rules)
    report["serving_rule"] = check
    weights = ", ".join(f"{v} {w:g}" for v, w in check["plan"]["gesture_weight"].items())
    say("serving rules (replayed in random call orders, 3 seeds; expected LB, best gesture weight): " + ", ".join(
        f"{r} {t['expected_lb']:.4f}" for r, t in check["rules"].items())
        + f"; serving {check['chosen']}" + (f" (gesture weight {weights})" if check["plan"]["slot_source"] else "")
        + f", {check['served']['expected_lb']:.4f} (nested: the plan picked on the other folds, "
        f"{check['nested']['expected_lb']:.4f})")
    report["expected_lb_served"] = check["served"]["expected_lb"]
    return check["plan"]


# The full profile's training speed on this project's 2-core CPU, measured by bench/kaggle_time.py at
# the real volume (docs/RESULTS.md, section 6): seconds per training sequence of one fold, per epoch
# for the nets. No GPU has timed them yet: on CUDA the nets' figures are divided by an assumed
# speed-up, which the projection line says it is; LightGBM runs on the CPU either way.
FULL_PROFILE_SECONDS_PER_SEQUENCE = {"lgbm": 3.91e-02, "torch": 3.11e-03, "torch_imu": 3.22e-03, "keras": 1.81e-03,
                                     "keras_imu": 1.67e-03}
GPU_SPEEDUP_ASSUMED = {"lgbm": 1.0, "torch": 3.0, "keras": 2.0}  # low, so the projection errs long


def projected_training(cfg: Config, n_sequences: int, device: str) -> dict[str, float]:
    """Seconds per member for every fold of this run on `device`, from the measured rates above (a
    member they do not cover takes its family's rate). Meaningful for the full profile's sizes."""
    n_train = n_sequences * (cfg.folds - 1) / cfg.folds
    seconds = {}
    for member in ensemble_members(cfg):
        rate = FULL_PROFILE_SECONDS_PER_SEQUENCE.get(member.name, FULL_PROFILE_SECONDS_PER_SEQUENCE[member.family])
        passes = 1 if member.family == "lgbm" else member.cfg.epochs
        speedup = 1.0 if device == "cpu" else GPU_SPEEDUP_ASSUMED[member.family]
        seconds[member.name] = rate * n_train * passes * cfg.folds * member.seeds / speedup
    return seconds


def say_projection(cfg: Config, n_sequences: int, device: str, workers: int = 1) -> None:
    """The full profile's projected training time, before anything trains (on GPUs, shared by the
    --workers, one GPU each); without a GPU, or past the time budget, what to change (the run itself
    then stops within the budget)."""
    if cfg.profile != "full":
        return
    per = projected_training(cfg, n_sequences, device)
    share = workers if device != "cpu" else 1  # CPU workers share the same cores
    total = sum(per.values()) / share
    assumed = "" if device == "cpu" else " (nets: the CPU rate over an assumed GPU speed-up, not yet measured)"
    say(f"projected training time on {device}{f' with {share} workers' if share > 1 else ''}: {hours(total)}"
        f"{assumed}: " + ", ".join(f"{name} {hours(t)}" for name, t in per.items()))
    if device == "cpu":
        say("no GPU: the nets train on the CPU. Fix on Kaggle: Settings -> Accelerator -> GPU T4 x2, then "
            "Save Version again")
    budget = cfg.time_budget_hours * 3600
    if budget and total > budget:
        fits = [e for e in range(cfg.epochs - 1, 0, -1) if sum(projected_training(
            dataclasses.replace(cfg, epochs=e), n_sequences, device).values()) / share <= budget]
        nets_off = per.get("lgbm", 0.0) <= budget and "lgbm" in cfg.models
        advice = (f"--epochs {fits[0]} (CMI_EPOCHS={fits[0]})" if fits else
                  "--models lgbm (CMI_MODELS=lgbm)" if nets_off else "--profile quick (CMI_PROFILE=quick)")
        say(f"the projection exceeds the time budget of {hours(budget)}: {advice} would fit. This run trains "
            f"what fits in the budget and says how to resume the rest")


def resume_advice(cfg: Config) -> str:
    """The one setting that finishes a run stopped by its budget, in the next session."""
    if on_kaggle():
        return ("save this version, then in the next one attach its output (Add Input -> Notebook Output) and "
                "add `%env CMI_RESUME_FROM=/kaggle/input/<this notebook>` to the settings cell, the rest unchanged")
    return (f"rerun with the same settings: it resumes from {Path(cfg.out_dir) / 'bundle'} (into another "
            f"output folder: add --resume-from {cfg.out_dir})")


def copy_finished_folds(source: Path, bundle: Path) -> None:
    """--resume-from: every fold file of an earlier run's bundle (a fold file with its meta file,
    which names its fingerprint) that OUT/bundle lacks is copied there; run_folds then resumes the
    ones whose fingerprint matches this run and retrains the rest."""
    src = source / "bundle" if (source / "bundle").is_dir() else source
    if not src.is_dir():
        raise ConfigError(f"--resume-from {source}: no such folder. Fix: attach the earlier run's output and "
                          f"give its folder (on Kaggle /kaggle/input/<notebook>), or leave the setting out.")
    bundle.mkdir(parents=True, exist_ok=True)
    copied = kept = 0
    files = sorted(src.iterdir())
    for meta in (f for f in files if f.suffix == ".json"):
        folds = [f for f in files if f != meta and f.name.split(".")[0] == meta.stem]
        if len(folds) != 1 or "fingerprint" not in read_fold_meta(meta):
            continue
        for f in (folds[0], meta):  # the meta file last, as run_folds writes them
            if (bundle / f.name).exists():
                kept += 1
            else:
                atomic_write(bundle / f.name, lambda p, f=f: shutil.copyfile(f, p))
                copied += 1
    say(f"resume: {copied // 2} finished folds copied from {src} into {bundle}"
        + (f" ({kept // 2} already there, kept)" if kept else ""))


# Fold workers (--workers N): N processes of this same code train the missing (member, fold) tasks into
# the bundle, each claiming the next free one, on a GPU of its own or a share of the CPU. The run then
# goes on as one process would: run_folds finds every fold in the bundle and reads it back, so the
# OOF, the blend and the bundle are those of one process trained with the same threads.
WORKERS_DIR = "workers"


def worker_count(cfg: Config) -> int:
    """--workers, or by default the GPUs on Kaggle (2 on GPU T4 x2), else 1."""
    if cfg.workers:
        return cfg.workers
    return max(1, torch.cuda.device_count()) if on_kaggle() and torch_device() == "cuda" else 1


def script_from_cells(cells: list[str]) -> str:
    """The code cells a Jupyter kernel ran (its `In`) as a script: IPython magics and shell lines left out
    (%env values reach the workers through the environment), and the cell that runs main() and serves
    replaced by a plain main() call."""
    keep = [c for c in cells if c.strip() and "CFG = main()" not in c]
    lines = [line for c in keep for line in c.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines) + '\n\n\nif __name__ == "__main__":\n    main()\n'


def worker_script(out: Path) -> Path | None:
    """This code as a script the workers run: the .py file it was loaded from, or in a Jupyter kernel
    (no file) the cells it ran, written to OUT/workers/notebook_cells.py. None when neither exists."""
    own = globals().get("__file__")
    if own and str(own).endswith(".py") and Path(own).exists():
        return Path(own)
    shell = globals().get("get_ipython")
    cells = list(shell().user_ns.get("In", [])) if callable(shell) and shell() is not None else []
    if not cells:
        return None
    path = out / WORKERS_DIR / "notebook_cells.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script_from_cells(cells))
    return path


def missing_fold_models(cfg: Config, td: TrainingData, bundle: Path) -> list[tuple[str, int, int]]:
    """Per (member, fold) that lacks a seed in the bundle: (member, fold, seeds missing), in the order
    one process trains them."""
    found = []
    for member in ensemble_members(cfg):
        member.training_inputs(td, Path(cfg.out_dir))  # its input names, which the fingerprint covers
        fp = member.fingerprint(td.fingerprint)
        for k in range(cfg.folds):
            missing = sum(saved_fold_meta(bundle / member.file(k, s), fp) is None for s in range(member.seeds))
            if missing:
                found.append((member.name, k, missing))
    return found


def claim(path: Path) -> bool:
    """Take a task for this process: True for the one process that creates `path` first."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def train_fold_tasks(cfg: Config, td: TrainingData, tasks_file: Path) -> None:
    """A worker's run: the task file's (member, fold) tasks, each claimed first, trained into the bundle
    until none is left or the remaining budget refuses one. `cfg` is the run's own, so every saved
    model is the one-process run's."""
    spec = json.loads(tasks_file.read_text())
    clock = TrainingClock(dataclasses.replace(cfg, time_budget_hours=spec["budget_hours"], stop_after_folds=0))
    out = Path(cfg.out_dir)
    members = {m.name: m for m in ensemble_members(cfg)}
    inputs: dict[str, dict[str, Any]] = {}
    for name, k in spec["tasks"]:
        if not claim(Path(spec["claims"]) / f"{name}_fold{k}"):
            continue
        member = members[name]
        inputs.setdefault(name, member.training_inputs(td, out))
        fp = member.fingerprint(td.fingerprint)
        for s in range(member.seeds):
            path = out / "bundle" / member.file(k, s)
            if saved_fold_meta(path, fp) is not None:
                continue
            try:
                summary = train_fold(member, k, s, inputs[name], td, td.folds != k, td.folds == k, path, fp, out, clock)
            except OutOfBudget as why:
                say(f"{name} fold {k}: not trained by this worker ({why})")
                return
            say(f"{name} fold {k} seed {s}: {summary}")


def run_workers(cfg: Config, td: TrainingData, clock: TrainingClock, n: int) -> None:
    """Train the missing fold models in `n` worker processes (the remaining budget, at most
    --stop-after-folds fold models, whole folds), relaying their output line by line. A worker that
    fails is named with its log; what it left is trained by this process afterwards, as on a resume."""
    out, bundle = Path(cfg.out_dir), Path(cfg.out_dir) / "bundle"
    missing = missing_fold_models(cfg, td, bundle)
    if cfg.stop_after_folds:
        allowed = cfg.stop_after_folds - clock.trained
        missing = [t for i, t in enumerate(missing) if sum(m for *_, m in missing[:i + 1]) <= allowed]
    script = worker_script(out)
    if not missing or script is None:
        if script is None:
            say("workers: this code has no file and no Jupyter cells to start workers from; one process trains")
        return
    n = min(n, len(missing))
    folder = out / WORKERS_DIR
    shutil.rmtree(folder / "claims", ignore_errors=True)
    (folder / "claims").mkdir(parents=True)
    gpus = torch.cuda.device_count() if torch_device() == "cuda" else 0
    # The CPU threads this process may use (OMP_NUM_THREADS when set), shared out: torch, LightGBM and
    # TensorFlow read them from the environment, so the models' saved settings stay the run's own.
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // n)
    left = clock.left()
    tasks = folder / "tasks.json"
    write_json(tasks, {"config": dataclasses.asdict(cfg), "claims": str(folder / "claims"),
                       "budget_hours": left / 3600.0 if math.isfinite(left) else 0.0,
                       "tasks": [[name, k] for name, k, _ in missing]})
    say(f"workers: {n} processes train {sum(m for *_, m in missing)} fold models of {len(missing)} folds "
        f"({f'one GPU each of {gpus}' if gpus else f'{threads} CPU threads each'}); logs in {folder}")
    procs, relays = [], []
    for i in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads),
               "TF_NUM_INTEROP_THREADS": "1", "TF_FORCE_GPU_ALLOW_GROWTH": "true", "PYTHONUNBUFFERED": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        log = open(folder / f"worker{i}.log", "w")
        proc = subprocess.Popen([sys.executable, str(script), "--worker-of", str(tasks)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=os.getcwd())

        def relay(proc: Any = proc, log: Any = log, i: int = i) -> None:
            for line in proc.stdout:
                log.write(line)
                if not line.startswith(("WARNING", "I0000", "W0000", "E0000", "To enable")):
                    print(f"[worker {i}] {line}", end="", flush=True)
            log.close()
        procs.append(proc)
        relays.append(threading.Thread(target=relay, daemon=True))
        relays[-1].start()
    for i, (proc, relay_thread) in enumerate(zip(procs, relays)):
        proc.wait()
        relay_thread.join()
        if proc.returncode:
            say(f"workers: worker {i} exited with status {proc.returncode} (log: {folder / f'worker{i}.log'}); "
                f"the folds it left are trained by this process")
    left_now = {(name, k): m for name, k, m in missing_fold_models(cfg, td, bundle)}
    clock.trained += sum(m - left_now.get((name, k), 0) for name, k, m in missing)  # this session's, for --stop-after-folds


def train(cfg: Config, watch: Stopwatch | None = None, clock: TrainingClock | None = None) -> dict[str, Any]:
    """Load, features, every member's folds (as far as the clock allows), the ensemble of the members
    with every fold, then the report, bundle and plots."""
    watch = watch or Stopwatch()
    clock = clock or TrainingClock(cfg)
    out = Path(cfg.out_dir)
    bundle = out / "bundle"
    set_seed(cfg.seed)
    with watch("load"):
        ds = load_training_data(resolve_data_dir(cfg))
    with watch("features"):
        td = prepare_training_data(ds, cfg, out)
    if cfg.worker_of:  # a --workers process: its fold tasks, nothing else
        train_fold_tasks(dataclasses.replace(cfg, worker_of=""), td, Path(cfg.worker_of))
        return {}
    say_projection(cfg, td.labels.height, torch_device(), worker_count(cfg))
    invalidate_stale_manifest(bundle, run_fingerprint(cfg, td.fingerprint))
    if cfg.resume_from:
        copy_finished_folds(Path(cfg.resume_from), bundle)
    if worker_count(cfg) > 1:
        with watch("workers"):
            run_workers(cfg, td, clock, worker_count(cfg))
    write_sequences = td.labels.select("sequence_id", "subject", "gesture").with_columns(
        pl.Series("fold", td.folds))
    atomic_write(out / "oof" / "sequences.csv", lambda p: write_sequences.write_csv(p))
    report: dict[str, Any] = {"models": {}, "n_sequences": td.labels.height, "folds": cfg.folds,
                              "profile": cfg.profile, "not_trained": {}}
    results = train_members(cfg, td, watch, clock, report)
    if report["not_trained"]:
        report["resume"] = resume_advice(cfg)
        say(f"training stopped: {', '.join(report['not_trained'])} not complete ({clock.refused}). To finish, "
            f"{report['resume']}")
        if not results:
            write_run_summary(out, cfg, watch, {"not_trained": report["not_trained"], "resume": report["resume"]},
                              continues=False)
            raise StopRequested("nothing to serve yet: no member has all its folds")
        say(f"the bundle serves {', '.join(results)}, the members with every fold")
    blend_weights, target_scale, ens = fit_ensemble(cfg, td, results, report)
    with watch("serving_rule"):
        slot_models = train_slot_models(cfg, td, bundle)
        plan = choose_serving_rule(cfg, td, ens, results, slot_models["oof"], report)
    write_json(out / "cv_report.json", report)
    write_bundle(bundle, cfg, td, results, blend_weights, target_scale, report, slot_models, plan)
    print_cv_table(report)
    with watch("plots"):
        plots = make_plots(out, td.labels["gesture"].to_list(), ens, report)
    say(f"plots: {len(plots)} written to {out / 'plots'}")
    write_run_summary(out, cfg, watch, {"expected_lb": report["expected_lb"], "not_trained": report["not_trained"],
                                        **({"resume": report["resume"]} if report["not_trained"] else {})},
                      continues=False, show=cfg.stage == "train")  # stage all prints it after serving
    return report


# %% [markdown]
# ## 19. Inference
#
# `predict()` keeps one runtime: the bundle is loaded on the first call, then each call computes
# the features of one sequence and blends each member's fold models. Nothing can escape: any
# problem is logged once, counted, and answered with a valid gesture.

# %%
def failure_reason(err: Exception) -> str:
    """Our own errors (which name the path and the fix) as they are; anything else with its type."""
    return str(err) if isinstance(err, (BundleError, FileNotFoundError)) else f"{type(err).__name__}: {err}"


FALLBACK_STREAK_LIMIT = 20  # this many calls in a row answered by the fallback stop serving (BundleError)
FALLBACK_SHARE_LIMIT = 0.1  # a local gateway run whose calls fell back more often than this exits non-zero
# ...and in every gateway, the scoring rerun included, serving stops once this share of the calls so far
# (from the 2 x FALLBACK_STREAK_LIMIT-th on) fell back: 19 bad calls and a good one, over and over, is no streak.
FALLBACK_BREAKER_SHARE = 0.5


def first_value(frames: Iterable[Any], column: str) -> str | None:
    """The first non-empty value of `column` in the first of `frames` that has one (None if none)."""
    for frame in frames:
        try:
            value = frame[column][0]
            if value is not None and str(value):
                return str(value)
        except Exception:
            continue
    return None


def subject_of(sequence: Any, demographics: Any) -> str | None:
    """The subject id of a call, from the sequence or else the demographics row (None if neither)."""
    return first_value((sequence, demographics), "subject")


def call_sequence_id(sequence: Any, call: int) -> str:
    """The call's sequence_id (the key of the per-subject history), or one of its own when it has none."""
    return first_value((sequence,), "sequence_id") or f"CALL_{call}"


def check_counter(sequence: pl.DataFrame, stats: ServingStats) -> None:
    """sequence_counter should run 0..n-1; rows are ordered by it (in file order where it is empty)."""
    if "sequence_counter" not in sequence.columns:
        stats.note("no sequence_counter column; rows taken in file order")
        return
    counter = sequence["sequence_counter"].cast(pl.Float64, strict=False)
    if counter.null_count():
        stats.note("sequence_counter empty or unreadable; those rows keep their place in the file order")
    elif counter.n_unique() < len(counter):
        stats.note("sequence_counter repeats (rows doubled?); the repeated rows are all used")
    elif counter.min() != 0 or counter.max() != len(counter) - 1:
        stats.note("sequence_counter does not run 0..n-1; rows ordered by it")


def has_values(frame: pl.DataFrame, columns: list[str]) -> bool:
    """Whether any of `columns` that the frame has holds a finite number."""
    present = [c for c in columns if c in frame.columns]
    if not present:
        return False
    values = frame.select(pl.col(present).cast(pl.Float64, strict=False))
    return bool(values.select(pl.any_horizontal([pl.col(c).is_finite() for c in present]).any()).item())


def checked_sequence(sequence: Any, stats: ServingStats) -> pl.DataFrame | None:
    """The call's rows as a polars frame keyed SEQ_CALL, each oddity counted; None when unusable."""
    if not isinstance(sequence, pl.DataFrame):
        try:
            sequence = pl.from_pandas(sequence) if hasattr(sequence, "to_numpy") else pl.DataFrame(sequence)
        except Exception:
            stats.note("sequence is not a DataFrame")
            return None
    if sequence.height == 0:
        stats.note("empty sequence")
        return None
    other_case = {c: c.lower() for c in sequence.columns
                  if c != c.lower() and c.lower() in TRAIN_COLS and c.lower() not in sequence.columns}
    if other_case:
        stats.note("column names in another case; renamed to the competition's")
        sequence = sequence.rename(other_case)
    missing = [c for c in ACC_COLS + ROT_COLS if c not in sequence.columns]
    if missing:
        stats.note(f"IMU column(s) missing: {missing[:3]}")
    if not has_values(sequence, ACC_COLS + ROT_COLS):
        if not has_values(sequence, THM_COLS + TOF_COLS):
            stats.note("no sensor values in the call")  # an answer from the demographics alone is no answer
            return None
        stats.note("IMU empty; answered from the thermopiles and ToF alone")
    if sequence.height < 3:
        stats.note("sequence of 1 or 2 rows")
    if "subject" not in sequence.columns:
        stats.note("no subject column; answered without the per-subject rule")
    if "sequence_id" not in sequence.columns:
        stats.note("no sequence_id column; the call is its own sequence")
    if set(sequence.columns) - set(TEST_COLS) - set(TRAIN_COLS):
        stats.note("unexpected extra columns (ignored)")
    if "sequence_id" in sequence.columns and sequence["sequence_id"].n_unique() > 1:
        stats.note("rows of several sequence_ids in one call; treated as one sequence")
    check_counter(sequence, stats)
    if sequence.height > 5000:
        stats.note("very long sequence; last 5000 rows used")
        sequence = sequence.tail(5000)
    return sequence.with_columns(pl.lit("SEQ_CALL").alias("sequence_id"))


def checked_demographics(demographics: Any, subject: str | None, stats: ServingStats) -> pl.DataFrame:
    """The call's one demographics row (its subject's, when several come), with each repair counted."""
    try:
        demo = demographics if isinstance(demographics, pl.DataFrame) else pl.from_pandas(demographics)
        if demo.height == 0:
            raise ValueError("empty")
        if demo.height > 1:
            mine = demo.filter(pl.col("subject").cast(pl.String) == subject) if subject and "subject" in demo.columns \
                else demo.clear()
            stats.note("several demographics rows; the sequence's subject's row used" if mine.height
                       else "several demographics rows, none of the sequence's subject; the first used")
            demo = mine.head(1) if mine.height else demo.head(1)
        if [c for c in DEFAULT_DEMOGRAPHICS if c not in demo.columns or demo[c].null_count()]:
            stats.note("demographics incomplete; defaults used")
        for c in demographic_problems(demo):
            stats.note(f"demographics {c} unreadable or out of range; default {DEFAULT_DEMOGRAPHICS[c]} used"
                       + (" (right-handed)" if c == "handedness" else ""))
        return demo
    except Exception:
        stats.note("demographics unusable; defaults used")
        return pl.DataFrame({"subject": ["SUBJ_CALL"]})


@dataclass(frozen=True)
class ServedBundle:
    """A bundle as it serves, fixed once loaded: its members (each proven at load), the serving plan
    with its slot models, the fallback gesture, and what was left out and why."""
    path: Path
    manifest: dict[str, Any]
    cfg: Config                      # the serving config with the bundle's feature settings
    models: dict[str, LoadedMember]
    plan: dict[str, Any]             # serving_plan(): rule, slot source, gesture weight per view
    slot_models: dict[str, list[Any]]  # orientation / behaviour -> fold boosters
    slot_model_names: list[str]
    fallback: str
    left_out: dict[str, str]         # member (or "slot models") -> why it does not serve
    demo_on_other_data: bool         # trained on generated demo data, serving data that is not

    @property
    def rule(self) -> str:
        return self.plan["rule"]


def bundle_path(cfg: Config) -> Path:
    """--model-path; else OUT/bundle; else, on Kaggle, whatever bundle dataset is attached."""
    if cfg.model_path:
        return Path(cfg.model_path)
    own = Path(cfg.out_dir) / "bundle"
    if not (own / "manifest.json").exists() and KAGGLE_DATA_DIR.parent.exists():
        return KAGGLE_DATA_DIR.parent
    return own


def load_members(path: Path, manifest: dict[str, Any], produced: dict[str, list[str]],
                 left_out: dict[str, str]) -> dict[str, LoadedMember]:
    """Every member that loads; one that cannot is named in `left_out`, never stopping the others."""
    models = {}
    for name, entry in manifest["members"].items():
        try:
            models[name] = load_member(path, name, entry, manifest, produced)
        except Exception as err:
            left_out[name] = failure_reason(err)
            LOG.error("predict: member %s left out of the blend: %s", name, left_out[name])
    if not models:
        raise BundleError(f"no member of the bundle {path} can be loaded ("
                          + "; ".join(f"{n}: {why}" for n, why in left_out.items()) + ")")
    return models


def slot_rule(path: Path, manifest: dict[str, Any], produced: dict[str, list[str]], cfg: Config,
              models: dict[str, LoadedMember], left_out: dict[str, str]) -> tuple[dict[str, Any], dict[str, list[Any]], list[str]]:
    """The bundle's serving plan (15.1, checked by validate_manifest) with the slot models when its slot
    source needs them: (plan, slot models, their feature names). A per-subject rule turned off by
    --subject-assignment false means argmax; a slot source that cannot serve (its slot models do not
    load, no net with the auxiliary heads loaded) means gesture_capacity, named in `left_out`."""
    spec = manifest["serving"]
    rule, source = spec["rule"], spec.get("slot_source")
    if rule in ("gesture_capacity", "slots") and not cfg.subject_assignment:
        return serving_plan("argmax"), {}, []
    if rule != "slots":
        return serving_plan(rule), {}, []
    plan = serving_plan(rule, source, spec["gesture_weight"])
    try:
        if set(SLOT_INPUTS[source]) - {"lgbm"} and not any(
                m.member.cfg.net_aux_heads for m in models.values() if isinstance(m.member, NetMember)):
            raise BundleError(f"{path}: the {source} slot source reads the nets' auxiliary heads, and no net "
                              f"member with them serves (left out: {list(left_out) or 'none'})")
        if "lgbm" not in SLOT_INPUTS[source]:
            return plan, {}, []
        return (plan, *load_slot_models(path, manifest, produced))
    except Exception as err:
        left_out["slot models"] = failure_reason(err)
        LOG.error("predict: slot source left out (serving gesture_capacity instead): %s", left_out["slot models"])
        return serving_plan("gesture_capacity"), {}, []


def read_proof(path: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], pl.DataFrame, dict[str, np.ndarray]]:
    """The bundle's proof entry, its reference calls and the outputs stored at training; BundleError
    when there is none, when the manifest's plan is not the one the proof was recorded with, or when
    its files do not match the manifest."""
    spec = manifest["proof"]  # validate_manifest requires it: an edit cannot switch the proof off
    where = first_difference(plan_of(manifest), spec.get("plan")) if isinstance(spec.get("plan"), dict) else "proof.plan"
    if where is not None:
        raise BundleError(f"{path}/manifest.json: {where or 'the plan'} is not what the bundle's proof was recorded "
                          f"with (an edited manifest?): serving it would answer otherwise than the bundle was proven "
                          f"to. Fix: restore manifest.json as training wrote it, or retrain the bundle")
    try:
        verify_bundle_files(path, [spec["calls"], spec["outputs"]], manifest["files"])
        calls = pl.read_parquet(path / spec["calls"])
        with np.load(path / spec["outputs"], allow_pickle=False) as z:
            stored = {n: z[n] for n in z.files}
    except Exception as err:
        raise BundleError(f"{path}: the bundle's proof cannot be replayed ({failure_reason(err)}). "
                          f"Fix: copy or upload the bundle again") from err
    return spec, calls, stored


def replayed(path: Path, *args: Any, **kwargs: Any) -> tuple[dict[str, np.ndarray], list[str], list[tuple[str, str]]]:
    """replay_proof, with a failure as the BundleError that names the bundle."""
    try:
        return replay_proof(*args, **kwargs)
    except Exception as err:
        raise BundleError(f"{path}: the bundle's proof cannot be replayed ({failure_reason(err)}). "
                          f"Fix: copy or upload the bundle again") from err


def proof_difference(got: dict[str, np.ndarray], stored: dict[str, np.ndarray], prefix: str) -> tuple[float, int]:
    """The largest difference between the replayed and the stored outputs under `prefix`, and where it is
    on their first axis (a member's fold); inf when an output is missing or of another shape."""
    worst, fold = 0.0, -1
    for key in (k for k in got if k.startswith(prefix)):
        want = stored.get(key)
        if want is None or want.shape != got[key].shape:
            return np.inf, -1
        per_fold = np.abs(got[key] - want).reshape(len(want), -1).max(1)
        if not per_fold.max() <= worst:
            worst, fold = float(per_fold.max()), int(np.nan_to_num(per_fold, nan=np.inf).argmax())
    return worst, fold


def prove_bundle(path: Path, manifest: dict[str, Any], produced: dict[str, list[str]], cfg: Config,
                 models: dict[str, LoadedMember], left_out: dict[str, str]
                 ) -> tuple[dict[str, Any], dict[str, list[Any]], list[str]]:
    """Replay the bundle's reference calls under the libraries installed here. A member (or the slot
    models) whose outputs moved beyond the code's tolerance is taken out (of `models`; the slot models
    fall back to gesture_capacity), named in `left_out` with the difference and the versions. Then the
    answers served by what is left, under the plan that serves, must be those the stored outputs give
    (the stored answers when nothing is left out): else the bundle cannot serve (BundleError).
    Returns the serving plan, its slot models and their feature names."""
    spec, calls, stored = read_proof(path, manifest)
    demographics = pl.DataFrame(spec["demographics"])
    got, views, keys = replayed(path, models, calls, demographics, cfg)
    for name in list(models):
        diff, fold = proof_difference(got, stored, f"{name}.")
        if not diff <= PROOF_TOLERANCE:  # the code's tolerance: the manifest's copy is for reading only
            left_out[name] = (f"{path}: the load-time proof: {name}'s probabilities on the bundle's {len(views)} "
                              f"reference calls differ from those stored at training by up to {diff:.3g} (fold "
                              f"{fold}; tolerance {PROOF_TOLERANCE:g}) under {library_versions()}, trained under "
                              f"{spec.get('versions')}. Fix: retrain the bundle, or restore its files")
            LOG.error("predict: member %s left out of the blend: %s", name, left_out[name])
            del models[name]
    if not models:
        raise BundleError(f"no member of the bundle {path} passes its proof (" + "; ".join(left_out.values()) + ")")
    plan, slot_models, slot_model_names = slot_rule(path, manifest, produced, cfg, models, left_out)
    if slot_models:
        got.update(replayed(path, {}, calls, demographics, cfg, slot_models, slot_model_names)[0])
        diff, _ = proof_difference(got, stored, SLOT_OUTPUT)
        if not diff <= PROOF_TOLERANCE:
            left_out["slot models"] = (f"{path}: the load-time proof: the slot models' probabilities differ from those "
                                       f"stored at training by up to {diff:.3g} (tolerance {PROOF_TOLERANCE:g})")
            LOG.error("predict: slot source left out (serving gesture_capacity instead): %s", left_out["slot models"])
            plan, slot_models, slot_model_names = serving_plan("gesture_capacity"), {}, []
    whole = set(models) == set(manifest["members"]) and plan == manifest["serving"]
    want = spec["answers"] if whole else proof_answers(stored, manifest, plan, views, keys, list(models))
    answers = proof_answers(got, manifest, plan, views, keys, list(models))
    if answers != want:
        raise BundleError(f"{path}: on the bundle's reference calls, {', '.join(models)} under the {plan_name(plan)} "
                          f"rule answer {answers}, where the outputs stored at training give {want}. Fix: retrain the "
                          f"bundle, or restore its files and manifest.json as training wrote them")
    return plan, slot_models, slot_model_names


def load_one_bundle(path: Path, cfg: Config) -> ServedBundle:
    """One bundle folder checked, loaded and proven as `cfg` asks; BundleError when it cannot serve."""
    t0 = time.perf_counter()
    manifest = read_manifest(path)
    trained = manifest["config"]
    on_other = bool(trained.get("demo") and cfg.data_dir and not is_demo_folder(Path(cfg.data_dir)))
    if on_other:
        LOG.warning("predict: the bundle %s was trained on generated demo data, and %s is not demo data: "
                    "its answers mean nothing there. Fix: train on the competition data (leave out --demo).",
                    path, cfg.data_dir)
    # Features are computed as in training, whatever the serving config says.
    cfg = dataclasses.replace(cfg, **{k: trained[k] for k in ("sample_rate_hz", "tof_grid") if k in trained})
    produced = produced_names(cfg)
    left_out: dict[str, str] = {}
    models = load_members(path, manifest, produced, left_out)
    t_proof = time.perf_counter()
    plan, slot_models, slot_model_names = prove_bundle(path, manifest, produced, cfg, models, left_out)
    t_proof = time.perf_counter() - t_proof
    fallback = manifest["fallback_gesture"]
    print(f"predict: bundle {path} loaded in {time.perf_counter() - t0:.1f}s (its proof replayed in {t_proof:.1f}s); "
          f"serving {', '.join(models)} with the {plan_name(plan)} rule"
          + (f"; left out: {', '.join(left_out)} (reason logged above)" if left_out else ""))
    return ServedBundle(path, manifest, cfg, models, plan, slot_models, slot_model_names, fallback, left_out, on_other)


def load_bundle(cfg: Config) -> ServedBundle:
    """The newest bundle under the path `cfg` asks for that can serve whole: found, checked, loaded and
    proven. A broken one never shadows a valid one, and one line names the bundle served and why each
    other was not. BundleError (or FileNotFoundError) naming the path and the fix when none can."""
    where = bundle_path(cfg)
    candidates, broken = bundle_candidates(where)
    total = len(set(candidates) | set(broken))
    for path in candidates:
        try:
            served = load_one_bundle(path, cfg)
        except BundleError as err:
            if total == 1:
                raise
            broken[path] = str(err)
            LOG.error("predict: the bundle %s cannot serve: %s", path, err)
            continue
        if total > 1:
            others = [f"{p} (older)" for p in candidates if p != path and p not in broken]
            others += [f"{p} (cannot serve: {why})" for p, why in broken.items()]
            print(f"predict: {total} bundles under {where}; serving the newest that can serve, {path} (created "
                  f"{served.manifest.get('created', 'unknown')}); not served: {'; '.join(others)}")
        return served
    raise BundleError(f"{where}: no bundle below it can serve: " + "; ".join(f"{p}: {why}" for p, why in broken.items()))



class Runtime:
    """The one serving runtime behind predict(): the bundle (loaded on the first call), the
    per-subject state and the statistics. Each member predicts on its own: one that fails is left
    out of that call's blend (weights renormalised over the rest) and counted."""

    def __init__(self, cfg: Config) -> None:
        self.requested = cfg  # the config serving was asked with
        self.cfg = cfg        # ... and, once loaded, with the bundle's feature settings
        self.bundle: ServedBundle | None = None
        self.error: str | None = None  # set when nothing can serve: every call then raises it
        self.loaded = False
        self.lock = threading.RLock()  # one call at a time; the first calls wait for one load
        self.stats = ServingStats()
        self.subjects = SubjectState()
        self.fallback = GESTURES[0]  # the bundle's (its training prior's most common gesture) once loaded

    def load(self) -> None:
        """Load the bundle once; a bundle that cannot serve leaves its reason in `error`."""
        with self.lock:
            try:
                self.bundle = load_bundle(self.requested)
                self.cfg, self.fallback = self.bundle.cfg, self.bundle.fallback
            except Exception as err:
                self.error = failure_reason(err)
                LOG.error("predict: the model bundle cannot serve: %s", self.error)
            finally:
                self.loaded = True

    def require(self) -> ServedBundle:
        """The loaded bundle (loading it if needed); BundleError naming the path when nothing can serve."""
        with self.lock:
            if not self.loaded:
                self.load()
        if self.error or self.bundle is None:
            raise BundleError(f"{(self.error or 'no bundle').rstrip('.')}. Nothing can serve: a submission of "
                              f"fallback answers would score near zero, so this stops here.")
        return self.bundle

    def predict(self, sequence: Any, demographics: Any) -> str:
        """One call: the bundle's answer, else the fallback gesture; a long run of fallbacks means
        the submission is answering garbage, which stops it visibly (BundleError)."""
        with self.lock:
            self.stats.calls += 1
            self.require()
            answer = self.answer(sequence, demographics)
            if answer is not None:
                self.stats.streak = 0
                return answer
            self.stats.fallbacks += 1
            self.stats.streak += 1
            st = self.stats
            many = st.calls >= 2 * FALLBACK_STREAK_LIMIT and st.fallbacks > FALLBACK_BREAKER_SHARE * st.calls
            if st.streak >= FALLBACK_STREAK_LIMIT or many:
                what = (f"the last {st.streak} calls were all" if st.streak >= FALLBACK_STREAK_LIMIT else
                        f"{st.fallbacks} of {st.calls} calls were")
                self.error = (f"{what} answered by the fallback gesture "
                              f"({', '.join(k for k, _ in st.problems.most_common(3)) or 'no reason counted'}); "
                              f"a submission of such answers scores near zero. Fix: read the problems logged above")
                LOG.error("predict: %s", self.error)
                raise BundleError(self.error)
            return self.fallback

    def answer(self, sequence: Any, demographics: Any) -> str | None:
        """One call's gesture, or None when nothing can answer it (each reason logged and counted)."""
        try:
            seq = checked_sequence(sequence, self.stats)
            if seq is None:
                return None
            subject = subject_of(sequence, demographics)
            demo = checked_demographics(demographics, subject, self.stats)
            sequence_id = call_sequence_id(sequence, self.stats.calls)
            probas, view, slot_inputs = self.proba(seq, demo, subject, sequence_id)
            bundle = self.require()
            return decide(bundle.manifest, bundle.plan, self.subjects, self.stats, probas, view, slot_inputs,
                          subject, sequence_id)
        except Exception as err:
            self.stats.note(f"prediction failed ({type(err).__name__}: {str(err)[:120]})")
            return None

    def proba(self, sequence: pl.DataFrame, demographics: pl.DataFrame, subject: str | None = None,
              sequence_id: str = "SEQ_CALL") -> tuple[dict[str, np.ndarray], str, dict[str, np.ndarray]]:
        """Per member that gave finite numbers, the (1, 18) class probabilities (the same code the
        CV imu_only view runs), the view whose blend weights apply, and what the slot sources read
        (slot_probabilities' `slot_inputs`): the nets' heads averaged over the members that answered, and
        the slot models' (1, 6) orientation and behaviour probabilities when the plan reads them."""
        bundle = self.require()
        prepared = call_sequences(sequence, demographics)
        for repair in prepared.repairs:
            self.stats.note(repair)
        if self.subjects.upside_down(bundle, self.requested.upside_down_fix, prepared, subject, sequence_id):
            self.stats.turned += 1
            prepared = call_sequences(sequence, demographics, turned=True)
        channels = sequence_channels(prepared, bundle.cfg.sample_rate_hz)
        cache: dict[str, Any] = {}
        out, heads = {}, []
        for name, loaded in bundle.models.items():
            try:
                got = loaded.heads(prepared, channels, cache)
            except Exception as err:
                self.stats.note(f"{name} raised {type(err).__name__}; left out of that call's blend", str(err)[:200])
                continue
            if not all(np.isfinite(v).all() for v in got.values()):
                self.stats.note(f"{name} gave non-finite probabilities; left out of that call's blend")
                continue
            out[name] = got["gesture"]
            heads.append(got)
        slot_inputs = net_slot_inputs(heads)
        if "lgbm" in SLOT_INPUTS.get(bundle.plan["slot_source"], ()):
            try:
                table = call_table(prepared, channels, cache, bundle.cfg.sample_rate_hz)
                slot_inputs["lgbm"] = slot_model_proba(bundle.slot_models, table.matrix(bundle.slot_model_names))
            except Exception as err:
                self.stats.note(f"slot models raised {type(err).__name__}; uniform orientation and behaviour",
                                str(err)[:200])
        return out, ("imu_only" if is_imu_only(prepared.sensors) else "full"), slot_inputs

    def record(self) -> dict[str, Any]:
        """What served, for run_summary.json (the summary line says the same)."""
        st, b = self.stats, self.bundle
        return {"calls": st.calls, "serving_rule": plan_name(b.plan) if b else None,
                "served": {v: dict(c) for v, c in st.served.items()}, "reduced_blend_calls": st.reduced,
                "fallback_calls": st.fallbacks, "upside_down_calls": st.turned,
                "left_out_at_load": dict(b.left_out) if b else {}, "problems": dict(st.problems),
                "bundle_error": self.error, "demo_bundle_on_other_data": bool(b and b.demo_on_other_data)}

    def summary(self) -> str:
        st, b = self.stats, self.bundle
        served = "; ".join(f"{v} served by " + (", ".join(f"{n} ({c})" for n, c in st.served[v].items()) or "none")
                           for v in VIEWS)
        problems = ", ".join(f"{k}: {v}" for k, v in st.problems.most_common()) or "none"
        left = f"; left out at load: {', '.join(b.left_out)}" if b and b.left_out else ""
        return (f"predict: {st.calls} calls; {served}; reduced blend: {st.reduced} calls; "
                f"turned back (upside down): {st.turned} calls; fallback: "
                f"{st.fallbacks} calls{left}; problems: {problems}" + (f"; bundle error: {self.error}" if self.error else ""))


_RUNTIME: Runtime | None = None
_RUNTIME_LOCK = threading.Lock()


def current_runtime() -> Runtime:
    """The Runtime predict() serves from: the one main() set, else one made here, once (under a lock:
    first calls from several threads load one bundle), from the CMI_* variables alone. This process's
    argv is not read: it belongs to whatever program imported the notebook. A setting that cannot be
    used raises (ConfigError), never answers a gesture."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = Runtime(parse_config([]))
        return _RUNTIME


def predict(sequence: pl.DataFrame, demographics: pl.DataFrame) -> str:
    """The evaluation API entry point: one sequence in, one of the 18 gesture names out."""
    runtime = current_runtime()
    try:
        return runtime.predict(sequence, demographics)
    except BundleError:  # nothing can serve: a visible scoring error beats a silent all-fallback submission
        raise
    except Exception as err:  # the last line of defence for one call: logged and counted, the fallback answers
        LOG.error("predict: unexpected %s: %s", type(err).__name__, err)
        runtime.stats.fallbacks += 1
        runtime.stats.note(f"unexpected {type(err).__name__}")
        return runtime.fallback


def set_runtime(cfg: Config) -> Runtime:
    global _RUNTIME
    with _RUNTIME_LOCK:
        _RUNTIME = Runtime(cfg)
        return _RUNTIME


# %% [markdown]
# ## 20. Serving
#
# With the competition's `kaggle_evaluation` package importable (it ships inside the competition
# data), serve through it: `serve()` under the scoring rerun, else its local gateway. Otherwise a
# built-in gateway follows the same protocol: one call per sequence in random order, polars frames
# read with default type inference, `str` validation, `submission.parquet` written.

# %%
def import_kaggle_evaluation(data_dir: Path) -> Any | None:
    for base in (Path(data_dir), Path(data_dir).parent, Path.cwd()):
        if (base / "kaggle_evaluation").is_dir() and str(base) not in sys.path:
            sys.path.insert(0, str(base))
    try:
        import kaggle_evaluation.cmi_inference_server as server  # type: ignore
        return server
    except Exception:
        return None


def run_builtin_gateway(test_csv: Path, demographics_csv: Path, out_path: Path, seed: int) -> pl.DataFrame:
    test = pl.read_csv(test_csv, infer_schema_length=100)
    demo = pl.read_csv(demographics_csv, infer_schema_length=100)
    seq_ids = test["sequence_id"].unique(maintain_order=True).to_list()
    order = np.random.default_rng(seed).permutation(len(seq_ids))
    rows = []
    for i in progress(order, desc="predict", total=len(order)):
        sid = seq_ids[i]
        seq = test.filter(pl.col("sequence_id") == sid)
        subj = seq["subject"][0] if "subject" in seq.columns else None
        gesture = predict(seq, demo.filter(pl.col("subject") == subj))
        if type(gesture) is not str or gesture not in GESTURES:
            raise TypeError(f"predict returned {gesture!r} ({type(gesture).__name__}) for {sid}; "
                            f"it must be a str among the 18 gestures")
        rows.append((sid, gesture))
    sub = pl.DataFrame(rows, schema=["sequence_id", "gesture"], orient="row")
    atomic_write(out_path, lambda p: sub.write_parquet(p))
    return sub


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """The kaggle_evaluation gateway writes submission.parquet into the working directory: run it
    inside OUT and come back. Every path the notebook uses is absolute (parse_config), so nothing
    it reads depends on where the process stands meanwhile."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def serve(cfg: Config) -> None:
    """Serve test.csv through kaggle_evaluation (scoring rerun: its server, loading lazily; else its
    local gateway) or the built-in gateway. Raises BundleError before any gateway starts when no
    member can serve (in the rerun: from the first predict() call)."""
    data_dir = resolve_data_dir(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = _RUNTIME if _RUNTIME is not None and _RUNTIME.requested is cfg else set_runtime(cfg)
    server_module = import_kaggle_evaluation(data_dir)
    if server_module is not None and is_competition_rerun():
        print("gateway: kaggle_evaluation (scoring rerun)")
        server_module.CMIInferenceServer(predict).serve()  # blocks; the bundle loads on the first call
        return
    runtime.require()
    test_csv, demo_csv = data_dir / "test.csv", data_dir / "test_demographics.csv"
    if pl.scan_csv(test_csv, infer_schema_length=0).head(1).collect().height == 0:  # the gateways fail inside on it
        raise DataError(f"{test_csv}: a header and no rows, so there is nothing to serve. Fix: point --data-dir at "
                        f"the folder holding the competition's test.csv (or copy it back).")
    t0 = time.perf_counter()
    if server_module is not None:
        print("gateway: kaggle_evaluation")
        with working_directory(out):
            server_module.CMIInferenceServer(predict).run_local_gateway(data_paths=(str(test_csv), str(demo_csv)))
        sub = pl.read_parquet(out / "submission.parquet")
    else:
        print("gateway: builtin")
        sub = run_builtin_gateway(test_csv, demo_csv, out / "submission.parquet", cfg.seed)
    print(f"submission: {sub.height} sequences -> {out / 'submission.parquet'} in "
          f"{time.perf_counter() - t0:.1f}s")
    print(runtime.summary())
    watch = Stopwatch()
    watch.seconds["serve"] = time.perf_counter() - t0
    write_run_summary(out, cfg, watch, {"serving": runtime.record()}, continues=cfg.stage != "infer")
    if runtime.stats.fallbacks > FALLBACK_SHARE_LIMIT * max(runtime.stats.calls, 1):
        raise BundleError(f"{runtime.stats.fallbacks} of {runtime.stats.calls} calls were answered by the fallback gesture (more "
                          f"than {FALLBACK_SHARE_LIMIT:.0%}): {out / 'submission.parquet'} would score near zero. "
                          f"Fix: read the problems in the predict: line above and in run_summary.json.")


# %% [markdown]
# ## 21. Main

# %%
def configure_logging(cfg: Config) -> None:
    """The notebook's own messages at --log-level; other libraries' only from WARNING up (their
    INFO lines, such as matplotlib's font cache notice, are not the Kaggler's business), all of
    them at DEBUG."""
    level = getattr(logging, cfg.log_level.upper(), logging.INFO)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", force=False)
    logging.getLogger().setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    LOG.setLevel(level)


def config_line(cfg: Config) -> str:
    """The run's settings in one line; an inference-only run describes the bundle it will serve."""
    where = f"data={cfg.data_dir}{' (demo)' if cfg.demo else ''} out={cfg.out_dir}"
    if cfg.stage != "infer":
        return (f"config: profile={cfg.profile} stage={cfg.stage} models={','.join(cfg.models)} folds={cfg.folds} "
                f"epochs={cfg.epochs} {where}")
    try:
        path = find_bundle(bundle_path(cfg))  # the first serving tries; serving names the others
        manifest = json.loads((path / "manifest.json").read_text())
        trained, lb = manifest.get("config", {}), manifest.get("expected_lb")
        return (f"config: stage=infer, serving the bundle {path}: trained with profile={trained.get('profile')} "
                f"folds={trained.get('folds')} members={','.join(manifest.get('members', {}))} on "
                f"{'demo' if trained.get('demo') else 'competition'} data, CV expected LB "
                f"{'n/a' if lb is None else f'{lb:.4f}'}; {where}")
    except Exception:
        return f"config: stage=infer, no readable bundle at {bundle_path(cfg)} (see below); {where}"


def main(argv: list[str] | None = None) -> Config:
    """Train (unless --stage infer or the scoring rerun); returns the config that serving uses."""
    cfg = parse_config(argv)
    if cfg.worker_of:  # a --workers process: the run's own settings, from its task file
        cfg = dataclasses.replace(config_from(json.loads(Path(cfg.worker_of).read_text())["config"]),
                                  worker_of=cfg.worker_of)
    configure_logging(cfg)
    print(config_line(cfg))
    require_data_files(resolve_data_dir(cfg), cfg.stage)
    if cfg.stage in ("all", "train"):
        t0 = time.perf_counter()
        try:
            train(cfg)
        except StopRequested as stop:
            print(str(stop))
            cfg.stage = "train"  # nothing complete to serve yet
        print(f"training: done in {time.perf_counter() - t0:.1f}s")
    if cfg.worker_of:
        cfg.stage = "train"  # a worker serves nothing
    set_runtime(cfg)
    return cfg


# %%
if __name__ == "__main__":
    try:
        CFG = main()
    except (ConfigError, DataError) as err:  # a setting or a file to fix: the message says which and how
        sys.exit(f"{type(err).__name__}: {err}")
    if CFG.stage in ("all", "infer"):
        try:
            serve(CFG)
        except (BundleError, DataError) as err:  # nothing served, or mostly the fallback: never a quiet exit
            sys.exit(f"{type(err).__name__}: {err}")
