"""The ensemble stage's cost on this machine: the competition metric per call, and the blend-weight
searches that call it thousands of times (fit_ensemble: the weights per view, the nested figure, the
leave-one-member-out refits) and the serving-rule replay.

The OOF tables are synthetic (every member a noisy copy of the truth, of its own strength) unless
--oof-dir names a run's oof/ folder, whose members and labels are then used as they are.
Prints seconds per stage and the metric's cost per call.
Usage: python bench/ensemble.py [--members 5] [--n 1632] [--folds 5] [--oof-dir OUT/oof]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import notebook as nb  # noqa: E402


def synthetic(members: int, n: int, folds: int, seed: int = 0) -> tuple[list[str], dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(nb.GESTURES), n)
    oof = {}
    for m in range(members):
        for_view = {}
        for v, strength in zip(nb.VIEWS, (2.0 + 0.3 * m, 1.2 + 0.2 * m)):
            logits = rng.normal(0, 1, (n, len(nb.GESTURES)))
            logits[np.arange(n), y] += strength * rng.random(n)
            for_view[v] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        oof[f"member{m}"] = for_view
    return [nb.GESTURES[i] for i in y], oof, rng.integers(0, folds, n)


def from_run(oof_dir: Path) -> tuple[list[str], dict, np.ndarray]:
    seqs = pl.read_csv(oof_dir / "sequences.csv")
    names = sorted({p.name[len("oof_"):-len("_full.npy")] for p in oof_dir.glob("oof_*_full.npy")})
    oof = {m: {v: np.load(oof_dir / f"oof_{m}_{v}.npy") for v in nb.VIEWS} for m in names}
    return seqs["gesture"].to_list(), oof, seqs["fold"].to_numpy()


def timed(label: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    print(f"{label:<48} {time.perf_counter() - t0:8.2f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=5, help="synthetic members (the full profile has 5)")
    ap.add_argument("--n", type=int, default=1632, help="synthetic sequences (quick demo 1,632; real 8,151)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--oof-dir", type=Path, help="a run's oof/ folder instead of synthetic tables")
    args = ap.parse_args()
    y, oof, folds = from_run(args.oof_dir) if args.oof_dir else synthetic(args.members, args.n, args.folds)
    names = list(oof)
    print(f"{len(names)} members, {len(y)} sequences, {len(np.unique(folds))} folds")

    pred = [nb.GESTURES[i] for i in oof[names[0]]["full"].argmax(1)]
    calls = 200
    t0 = time.perf_counter()
    for _ in range(calls):
        nb.competition_metric(y, pred)
    print(f"{'competition_metric, one call':<48} {(time.perf_counter() - t0) / calls * 1000:8.2f} ms")
    t0 = time.perf_counter()
    for _ in range(calls):
        nb.score_probabilities(y, oof[names[0]]["full"])
    print(f"{'score_probabilities, one call':<48} {(time.perf_counter() - t0) / calls * 1000:8.2f} ms")

    start = time.perf_counter()
    weights = timed("blend weights, both views", lambda: {
        v: nb.fit_blend_weights(y, [oof[n][v] for n in names]) for v in nb.VIEWS})
    timed("nested blend figure, both views", lambda: {
        v: nb.nested_blend_scores(y, [oof[n][v] for n in names], folds) for v in nb.VIEWS})
    timed("leave-one-member-out refits", nb.ensemble_ablation, y, oof)
    ens = {v: nb.blend([oof[n][v] for n in names], weights[v]) for v in nb.VIEWS}
    timed("target scale check, both views", lambda: {v: nb.target_scale_check(y, ens[v], folds) for v in nb.VIEWS})
    print(f"{'the ensemble fit (fit_ensemble without reports)':<48} {time.perf_counter() - start:8.2f} s")
    subjects = np.array([f"S{i % max(len(y) // 102, 1)}" for i in range(len(y))])
    slot_inputs = {v: nb.net_slot_inputs([{"orientation": np.full((len(y), 4), 0.25),
                                           "behavior": np.full((len(y), 2), 0.5)}]) for v in nb.VIEWS}
    timed("serving-rule replay (choose_serving_rule)", nb.serving_rule_check, y, ens, slot_inputs, subjects, folds,
          nb.SERVING_RULES)
    print(f"weights: {weights}")


if __name__ == "__main__":
    main()
