"""What the physics + Welch features buy: LightGBM CV on them vs on simple raw-column statistics.

Both use the same demo data (quick profile), folds, LightGBM settings and modality dropout, and are
scored on both CV views (all sensors; thm/ToF cells nulled as in the IMU-only test sequences).
The simple table is what a first notebook would start from: mean, std, min and max of every raw
sensor column per sequence (ToF -1 left as a number).
Usage: python bench/feature_value.py [--folds 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import notebook as nb  # noqa: E402


def simple_table(train: pl.DataFrame) -> pl.DataFrame:
    stats = {"mean": pl.Expr.mean, "std": pl.Expr.std, "min": pl.Expr.min, "max": pl.Expr.max}
    return (train.group_by("sequence_id").agg([f(pl.col(c)).alias(f"{c}_{s}") for c in nb.SENSOR_COLS
                                                for s, f in stats.items()]).sort("sequence_id"))


def cv(cfg: "nb.Config", td: "nb.TrainingData", views: dict[str, pl.DataFrame], names: list[str]) -> dict[str, float]:
    x = {v: nb.feature_matrix(views[v], names) for v in nb.VIEWS}
    oof = {v: np.zeros((len(td.y), len(nb.GESTURES)), dtype=np.float32) for v in nb.VIEWS}
    for k in range(cfg.folds):
        va, tr = td.folds == k, td.folds != k
        booster = nb.train_lgbm_fold(cfg, x["full"][tr], td.y[tr], np.vstack([x["full"][va], x["imu_only"][va]]),
                                     np.concatenate([td.y[va], td.y[va]]), names, cfg.seed + k)
        for v in nb.VIEWS:
            oof[v][va] = nb.LgbmMember("lgbm", cfg, names).predict(booster, x[v][va])["gesture"]
    y = td.labels["gesture"].to_list()
    scores = {v: nb.score_probabilities(y, oof[v])["metric"] for v in nb.VIEWS}
    return {**scores, "expected_lb": 0.5 * (scores["full"] + scores["imu_only"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=3)
    args = ap.parse_args()
    data = ["--demo-train-subjects", "16", "--demo-test-subjects", "4", "--demo-pairs-per-subject", "51"]
    out = Path(tempfile.mkdtemp(prefix="feature_value_"))
    cfg = nb.parse_config(["--profile", "quick", "--demo", "--data-dir", str(ROOT / "demo_data"), *data,
                           "--folds", str(args.folds), "--out-dir", str(out)], environ={})
    ds = nb.load_training_data(nb.resolve_data_dir(cfg))
    td = nb.prepare_training_data(ds, cfg, out)
    simple = {"full": simple_table(ds.train), "imu_only": simple_table(nb.blank_modalities(ds.train))}
    assert simple["full"]["sequence_id"].to_list() == td.labels["sequence_id"].to_list()
    rows = [("simple raw-column statistics", simple, [c for c in simple["full"].columns if c != "sequence_id"]),
            ("physics + Welch features (the notebook's)", td.views,
             [c for c in td.views["full"].columns if c != "sequence_id"])]
    for label, views, names in rows:
        t0 = time.perf_counter()
        r = cv(cfg, td, views, names)
        print(f"{label:<42} {len(names):>4} features: full {r['full']:.4f}  imu_only {r['imu_only']:.4f}  "
              f"expected LB {r['expected_lb']:.4f}  ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
