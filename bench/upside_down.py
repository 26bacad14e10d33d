"""How the upside-down check decides on the demo world, one call at a time as serving does.

  .venv/bin/python bench/upside_down.py [--train-subjects 40] [--eval-subjects 60] [--orders 20] [--seed 0]

Generates in memory (nothing written) training subjects, among them the generator's upside-down
wearers, and held-out subjects who each do the study's 102 sequences. The check is fitted on the
training rows as training fits it. Each held-out subject is then served twice, as recorded (worn as
usual) and with every row turned upside down (turn_upside_down, the generator's own turn), in
`--orders` random call orders. Prints:
- the training subjects flagged, against the generator's list;
- wrong turns: the share of a normal wearer's calls answered as upside down;
- for an upside-down wearer: the calls it takes until the first turn, and the share of their calls
  answered turned;
- the same for the check this project used before (the sign of the summed (x, y) mean gravity
  against the population's direction, margin 0.2), for comparison.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import notebook as nb  # noqa: E402


def demo_world(n_train: int, n_eval: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, list[str]]:
    """(train rows, held-out rows, demographics of both, upside-down training subjects)."""
    cfg = nb.parse_config(["--profile", "quick", "--seed", str(seed)], environ={})
    rng = np.random.default_rng(seed)
    used: set[int] = set()
    train_subj = nb._demo_subjects(rng, n_train, used, nb.demo_upside_down_count(n_train))
    eval_subj = nb._demo_subjects(rng, n_eval, used, 0)
    seq_iter = iter(rng.permutation(np.arange(1, 999999)).tolist())
    train = nb._demo_rows(rng, train_subj, True, cfg, seq_iter)
    held = nb._demo_rows(rng, eval_subj, True, cfg, seq_iter)
    demo = nb._demo_demographics(train_subj + eval_subj)
    return train, held, demo, sorted(s["subject"] for s in train_subj if s["upside_down"])


def turned(frame: pl.DataFrame) -> pl.DataFrame:
    x = nb.turn_upside_down(frame.select(nb.SENSOR_COLS).to_numpy().astype(np.float32))
    rows = pl.from_numpy(x, schema=nb.SENSOR_COLS, orient="row").with_columns(pl.selectors.float().fill_nan(None))
    return pl.concat([frame.drop(nb.SENSOR_COLS), rows], how="horizontal").select(frame.columns)


def served(subjects: np.ndarray, evidence: np.ndarray, decide, orders: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """(turned decision per call, over all orders) and, per (subject, order), the 1-based call at
    which the subject was first turned (0: never)."""
    rng = np.random.default_rng(seed)
    decisions, first = [], []
    for s in np.unique(subjects):
        e = evidence[subjects == s]
        for _ in range(orders):
            running = np.cumsum(e[rng.permutation(len(e))])
            d = np.array([decide(v) for v in running])
            decisions.append(d)
            first.append(int(np.argmax(d)) + 1 if d.any() else 0)
    return np.concatenate(decisions), first


def xy_check(as_worn: nb.Sequences):
    """The check before issue 35: (x, y) mean gravity against the population's direction."""
    _, subjects, g = nb.UpsideDownCheck.gravity(as_worn)
    per = pl.DataFrame({"s": subjects, "x": g[:, 0], "y": g[:, 1]}).group_by("s").mean()
    ref = np.array([per["x"].median(), per["y"].median()])
    ref /= np.linalg.norm(ref)

    def score(prepared: nb.Sequences) -> tuple[np.ndarray, np.ndarray]:
        _, subjects, g = nb.UpsideDownCheck.gravity(prepared)
        return subjects, g[:, :2] @ ref
    return score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-subjects", type=int, default=40)
    ap.add_argument("--eval-subjects", type=int, default=60)
    ap.add_argument("--orders", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train, held, demo, truth = demo_world(args.train_subjects, args.eval_subjects, args.seed)
    labels = nb.sequence_labels(train)
    as_worn = nb.prepare_sequences(train, demo)
    check = nb.UpsideDownCheck.fit(as_worn, dict(zip(labels["sequence_id"], labels["orientation"])))
    flagged = check.flagged(as_worn)
    print(f"training: {args.train_subjects} subjects, upside down {truth}; flagged {flagged}; "
          f"wrongly flagged {sorted(set(flagged) - set(truth))}, missed {sorted(set(truth) - set(flagged))}")
    old = xy_check(as_worn)
    n_seq = held["sequence_id"].n_unique()
    for name, score, decide in (
            ("posture-aware (this code)", check.evidence, lambda v: nb.UpsideDownCheck.decide([v])),
            ("(x, y) sign, margin 0.2 (before)", old, lambda v: v < -0.2)):
        normal_subj, normal_e = score(nb.prepare_sequences(held, demo))
        upside_subj, upside_e = score(nb.prepare_sequences(turned(held), demo))
        wrong, wrong_first = served(normal_subj, normal_e, decide, args.orders, args.seed)
        right, first = served(upside_subj, upside_e, decide, args.orders, args.seed)
        first = np.array(first)
        print(f"{name}: {args.eval_subjects} held-out subjects x {n_seq // args.eval_subjects} calls x "
              f"{args.orders} orders")
        print(f"  worn as usual: wrong turns {wrong.mean():.4%} of {wrong.size} calls; a subject ever turned in "
              f"{np.mean(np.array(wrong_first) > 0):.1%} of (subject, order) runs")
        print(f"  upside down: turned on {right.mean():.2%} of calls; first turn at call median "
              f"{np.median(first[first > 0]) if (first > 0).any() else float('nan'):.0f}, 90th percentile "
              f"{np.percentile(first[first > 0], 90) if (first > 0).any() else float('nan'):.0f}, never in "
              f"{np.mean(first == 0):.1%} of runs")


if __name__ == "__main__":
    main()
