"""The score of submissions on a generated demo folder's test subjects, whose labels test.csv does
not carry: the generator is rerun with the folder's own settings (demo_config.json) and its test
rows are kept in memory with their labels (nothing is written into the folder).

  .venv/bin/python bench/demo_test_score.py --data-dir demo_data working/submission.parquet [...]

Prints, per submission, the competition metric over all test sequences and over each half: the
sequences with thermopile/ToF data and the IMU-only ones (every thm/tof cell empty), as served.
The regenerated test rows must match the folder's test.csv (the same sequence ids and row count),
else it stops: the folder was made by another generator version.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import notebook as nb  # noqa: E402


def demo_test_labels(data_dir: Path) -> pl.DataFrame:
    """sequence_id, truth (the gesture), imu_only for every test sequence of a demo folder."""
    settings = json.loads((data_dir / nb.DEMO_STAMP).read_text())
    if settings.get("demo_version") != nb.DEMO_VERSION:
        sys.exit(f"{data_dir}: demo_version {settings.get('demo_version')}, this notebook makes {nb.DEMO_VERSION}")
    cfg = nb.parse_config(["--demo"], environ={})
    for key, value in settings.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    frames: list[tuple[bool, pl.DataFrame]] = []
    real_rows, test_cols = nb._demo_rows, nb.TEST_COLS

    class NotWritten:  # the generator writes what _demo_rows returns; `frames` keeps it instead
        def write_csv(self, path: Path) -> None:
            pass

    def rows(rng, subjects, is_train, cfg_, seq_iter):  # noqa: ANN001, ANN202
        frames.append((is_train, real_rows(rng, subjects, is_train, cfg_, seq_iter)))
        return NotWritten()

    # The test rows as made, with the label columns the test schema drops (the same random draws).
    nb._demo_rows, nb.TEST_COLS = rows, nb.TRAIN_COLS
    try:
        with tempfile.TemporaryDirectory() as tmp:
            nb.generate_demo_dataset(Path(tmp), cfg)
    finally:
        nb._demo_rows, nb.TEST_COLS = real_rows, test_cols
    test = next(f for is_train, f in frames if not is_train)
    on_disk = pl.read_csv(data_dir / "test.csv", columns=["sequence_id"])
    if on_disk.height != test.height or on_disk["sequence_id"].to_list() != test["sequence_id"].to_list():
        sys.exit(f"{data_dir}/test.csv: the regenerated test rows differ; the folder was made otherwise")
    return (test.group_by("sequence_id", maintain_order=True)
            .agg(pl.col("gesture").first().alias("truth"), pl.col("thm_1").is_null().all().alias("imu_only")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("submissions", nargs="+")
    args = ap.parse_args()
    labels = demo_test_labels(Path(args.data_dir))
    for path in args.submissions:
        sub = pl.read_parquet(path).join(labels, on="sequence_id", how="right")
        if sub["gesture"].null_count():
            sys.exit(f"{path}: no answer for {sub['gesture'].null_count()} test sequences")
        parts = {"all": sub, "full sensors": sub.filter(~pl.col("imu_only")), "IMU-only": sub.filter(pl.col("imu_only"))}
        scores = {k: nb.competition_metric(p["truth"].to_list(), p["gesture"].to_list())["metric"]
                  for k, p in parts.items() if p.height}
        print(f"{path}: {len(sub)} test sequences; " + ", ".join(f"{k} {v:.4f} ({parts[k].height})" for k, v in scores.items()))


if __name__ == "__main__":
    main()
