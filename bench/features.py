"""Feature pipeline benchmark at real competition scale.

Generates (once) a demo train set of real size — 80 subjects x 102 sequences ≈ 8,160 sequences,
~575k rows, 341 columns — then measures, each in a fresh process so peak RSS is its own:
  (a) loading train.csv (+ validation), (b) building the whole aggregate feature table,
  (c) a straightforward reference (per-row loops with pandas and scipy Rotation, as public
      notebooks do) on a subset, to compare sequences/second.
Usage: python bench/features.py [--data-dir DIR] [--reference-sequences N]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_load(data_dir: Path) -> dict:
    import notebook as nb
    t0 = time.perf_counter()
    ds = nb.load_training_data(data_dir)
    secs = time.perf_counter() - t0
    n = ds.train["sequence_id"].n_unique()
    return {"stage": "load train.csv", "seconds": secs, "sequences": n, "rows": ds.train.height,
            "columns": ds.train.width, "seq_per_s": n / secs, "peak_rss_mb": peak_rss_mb()}


def stage_features(data_dir: Path) -> dict:
    import notebook as nb
    ds = nb.load_training_data(data_dir)
    cfg = nb.parse_config(["--profile", "full"], environ={})
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    table = nb.aggregate_features(*nb.derive(ds.train, ds.train_demographics, cfg), cfg.sample_rate_hz)
    secs = time.perf_counter() - t0
    n = len(table.ids)
    return {"stage": "aggregate feature table", "seconds": secs, "sequences": n,
            "features": len(table.names), "seq_per_s": n / secs, "peak_rss_mb": peak_rss_mb(),
            "peak_rss_before_mb": rss_before}


def reference_features(seq, fs: float = 10.0) -> dict:
    """What many public notebooks do: a Python loop over rows with scipy Rotation, pandas stats."""
    import numpy as np
    import pandas as pd
    from scipy.signal import welch
    from scipy.spatial.transform import Rotation
    rows = []
    prev = None
    for _, r in seq.iterrows():
        acc = np.array([r.acc_x, r.acc_y, r.acc_z])
        q = np.array([r.rot_x, r.rot_y, r.rot_z, r.rot_w])
        if np.isnan(q).any():
            q = np.array([0.0, 0.0, 0.0, 1.0])
        rot = Rotation.from_quat(q)
        world = rot.apply(acc)
        lin = world - np.array([0, 0, 9.81])
        if prev is None:
            ang = np.zeros(3)
        else:
            ang = (prev.inv() * rot).as_rotvec() * fs
        prev = rot
        thm = [r[f"thm_{i}"] for i in range(1, 6)]
        tof = []
        for s in range(1, 6):
            px = np.array([r[f"tof_{s}_v{p}"] for p in range(64)], dtype=float)
            px = px[px >= 0]
            tof += [px.mean() if len(px) else np.nan, px.min() if len(px) else np.nan]
        rows.append([*acc, np.linalg.norm(acc), *lin, np.linalg.norm(lin), *ang, np.linalg.norm(ang), *thm, *tof])
    df = pd.DataFrame(rows)
    out = df.agg(["mean", "std", "min", "max", "median"]).to_numpy().ravel().tolist()
    out += df.iloc[0].tolist() + df.iloc[-1].tolist()
    for c in (3, 7, 11):
        x = df[c].to_numpy()
        f, p = welch(x, fs=fs, nperseg=min(64, max(2, len(x) // 4)))
        out += [p[(f >= lo) & (f < hi)].sum() for lo, hi in ((0, 0.5), (0.5, 1.25), (1.25, 2.5), (2.5, 5.1))]
    return out


def stage_reference(data_dir: Path, n_seq: int) -> dict:
    import polars as pl
    ids = (pl.scan_csv(data_dir / "train.csv").select("sequence_id").unique(maintain_order=True)
           .head(n_seq).collect()["sequence_id"])
    train = pl.scan_csv(data_dir / "train.csv").filter(pl.col("sequence_id").is_in(ids)).collect().to_pandas()
    t0 = time.perf_counter()
    for _, seq in train.groupby("sequence_id", sort=False):
        reference_features(seq)
    secs = time.perf_counter() - t0
    return {"stage": f"reference (pandas + scipy Rotation, per-row loop), {n_seq} sequences",
            "seconds": secs, "sequences": n_seq, "seq_per_s": n_seq / secs, "peak_rss_mb": peak_rss_mb()}


def ensure_data(data_dir: Path) -> None:
    if (data_dir / "train.csv").exists():
        return
    import notebook as nb
    cfg = nb.parse_config(["--profile", "full", "--demo-train-subjects", "80", "--demo-test-subjects", "2"],
                          environ={})
    t0 = time.perf_counter()
    nb.generate_demo_dataset(data_dir, cfg)
    print(f"generated real-scale demo data in {data_dir} ({time.perf_counter() - t0:.0f}s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/tmp/cmi_bench_data")
    ap.add_argument("--reference-sequences", type=int, default=150)
    ap.add_argument("--stage", choices=["load", "features", "reference"])
    args = ap.parse_args()
    data_dir = Path(args.data_dir)
    if args.stage:
        res = {"load": lambda: stage_load(data_dir), "features": lambda: stage_features(data_dir),
               "reference": lambda: stage_reference(data_dir, args.reference_sequences)}[args.stage]()
        print("RESULT " + json.dumps(res))
        return
    ensure_data(data_dir)
    results = []
    for stage in ("load", "features", "reference"):
        out = subprocess.run([sys.executable, __file__, "--stage", stage, "--data-dir", str(data_dir),
                              "--reference-sequences", str(args.reference_sequences)],
                             capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    for r in results:
        print(f"{r['stage']:<70} {r['seconds']:8.1f} s  {r['seq_per_s']:9.1f} seq/s  peak RSS {r['peak_rss_mb']:7.0f} MB")
    speedup = results[1]["seq_per_s"] / results[2]["seq_per_s"]
    print(f"aggregate table vs reference: {speedup:.0f}x sequences/second "
          f"({results[1]['sequences']} sequences, {results[1]['features']} features)")


if __name__ == "__main__":
    main()
