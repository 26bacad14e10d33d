"""Simple reference scores for any data folder in the competition schema (the demo data, the real
sample, the real training set): how much a plain model gets from per-sequence aggregates, so the
demo generator can be judged against the real data without looking at the notebook's own models.

  .venv/bin/python bench/demo_references.py --data-dir demo_data [--folds 5] [--seed 0]

References (LightGBM on mean/std/min/max/last of raw columns, folds grouped by subject, the
competition metric on out-of-fold predictions):
  imu / whole:    acc_* and rot_* over the whole sequence
  imu / gesture:  the same over the rows with phase == "Gesture" only
  all / whole, all / gesture: every sensor column (thermopiles, and each ToF sensor's mean over its
                  64 zones with -1 as missing)
Leak checks, which must score within the range of the same model on shuffled labels:
  length:         the sequence length alone
  sequence_id:    the numeric part of sequence_id alone
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import notebook as nb  # noqa: E402

STATS = ("mean", "std", "min", "max", "last")


def aggregates(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    exprs = []
    for c in columns:
        col = pl.col(c)
        exprs += [col.mean().alias(f"{c}_mean"), col.std().alias(f"{c}_std"), col.min().alias(f"{c}_min"),
                  col.max().alias(f"{c}_max"), col.drop_nulls().last().alias(f"{c}_last")]
    return frame.group_by("sequence_id").agg(exprs).sort("sequence_id")


def with_tof_means(frame: pl.DataFrame) -> pl.DataFrame:
    """Each ToF sensor's mean distance over the zones that answered (-1 = no response)."""
    means = []
    for s in range(1, 6):
        zones = [pl.when(pl.col(f"tof_{s}_v{p}") >= 0).then(pl.col(f"tof_{s}_v{p}")) for p in range(64)]
        means.append(pl.mean_horizontal(zones).alias(f"tof_{s}_mean"))
    return frame.with_columns(means)


def cv_score(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int, trees: int = 200) -> float:
    import lightgbm as lgb
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
    oof = np.zeros((len(y), len(nb.GESTURES)))
    # Stratifying needs every class at least `folds` times (not so in a small sample).
    splitter = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
                if np.bincount(y).max(initial=0) and np.bincount(y)[np.bincount(y) > 0].min() >= folds
                else GroupKFold(folds))
    for tr, va in splitter.split(x, y, groups):
        model = lgb.LGBMClassifier(n_estimators=trees, learning_rate=0.05, num_leaves=31, min_child_samples=10,
                                   colsample_bytree=0.5, subsample=0.8, subsample_freq=1, verbose=-1,
                                   n_jobs=2, random_state=seed)
        model.fit(x[tr], y[tr])
        oof[np.ix_(va, model.classes_)] = model.predict_proba(x[va])
    return nb.competition_metric([nb.GESTURES[i] for i in y], [nb.GESTURES[i] for i in oof.argmax(1)])["metric"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--train-file", default="train.csv")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    train = nb.load_sensor_csv(Path(args.data_dir) / args.train_file, nb.TRAIN_COLS)
    train = with_tof_means(train)
    labels = train.group_by("sequence_id").agg(pl.col("gesture").first(), pl.col("subject").first(),
                                                pl.len().alias("length")).sort("sequence_id")
    y = np.array([nb.GESTURE_INDEX[g] for g in labels["gesture"]])
    groups = labels["subject"].to_numpy()
    folds = min(args.folds, labels["subject"].n_unique())
    print(f"{args.data_dir}: {labels.height} sequences, {labels['subject'].n_unique()} subjects, {folds} folds "
          f"grouped by subject")
    imu = nb.ACC_COLS + nb.ROT_COLS
    everything = imu + nb.THM_COLS + [f"tof_{s}_mean" for s in range(1, 6)]
    gesture_rows = train.filter(pl.col("phase") == "Gesture")
    for name, cols in (("imu", imu), ("all", everything)):
        for part, frame in (("whole", train), ("gesture", gesture_rows)):
            table = aggregates(frame, cols)
            table = labels.select("sequence_id").join(table, on="sequence_id", how="left")
            x = table.drop("sequence_id").to_numpy().astype(np.float32)
            print(f"  {name:<4} {part:<8} {cv_score(x, y, groups, folds, args.seed):.4f}")
    rng = np.random.default_rng(args.seed)
    ids = labels["sequence_id"].str.extract(r"(\d+)$").cast(pl.Float32).to_numpy()
    for name, x in (("length", labels["length"].to_numpy().astype(np.float32)), ("sequence_id", ids)):
        x = x.reshape(-1, 1)
        shuffled = [cv_score(x, rng.permutation(y), groups, folds, args.seed, trees=50) for _ in range(8)]
        print(f"  leak check {name:<12} {cv_score(x, y, groups, folds, args.seed, trees=50):.4f} "
              f"(shuffled labels, 8 draws: mean {np.mean(shuffled):.4f}, range {min(shuffled):.4f}-{max(shuffled):.4f})")
    print(f"  ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
