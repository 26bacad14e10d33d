"""The full profile's training time, projected from one fold of each member timed on this machine.

  .venv/bin/python bench/kaggle_time.py [--data-dir DIR] [--epochs 2] [--members lgbm,torch,...]

1. Demo data at the real volume: 81 training subjects x 102 sequences (8,262; the real train.csv has
   8,151), whose lengths follow the real ones (FACTS.md: min 29, median 59, up to 700 rows;
   tests/test_demo_realism.py holds the generator to them). It is generated once into --data-dir.
2. The features of both views, timed.
3. Fold 0 of each member of the full profile, with its full-size settings, on this machine: LightGBM
   whole (its early stopping decides the rounds), each net for --epochs epochs. A net's epoch time is
   the mean of its epochs after the first (which pays one-off costs); the rest of the fold (scaler,
   the last evaluation) is timed apart.
4. The projection of the full profile: members x folds x epochs (the nets' full profile epochs, none
   stopping early), and the seconds per training sequence that notebook.py's
   FULL_PROFILE_SECONDS_PER_SEQUENCE holds.

On a GPU the nets' figures are what this machine measures there. Where none was measured, the GPU
line is this machine's figure divided by notebook.py's GPU_SPEEDUP_ASSUMED, printed apart from the
measurement and called an assumption.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import notebook as nb  # noqa: E402

REAL_SUBJECTS, REAL_SEQUENCES_PER_SUBJECT = 81, 102


def time_fold(member: nb.Member, td: nb.TrainingData, out: Path) -> dict[str, float]:
    """Fold 0 of `member`: its wall time, and for a net the mean epoch after the first."""
    inputs = member.training_inputs(td, out)
    k, tr, va = next(nb.fold_splits(td.folds))
    epochs: list[float] = []
    t0 = time.perf_counter()
    member.fit(k, 0, inputs, td, tr, va, lambda rec: epochs.append(rec["seconds"]))
    seconds = time.perf_counter() - t0
    rest = seconds - sum(epochs)
    epoch = float(np.mean(epochs[1:] if len(epochs) > 1 else epochs)) if epochs else 0.0
    return {"fold": seconds, "epoch": epoch, "first_epoch": epochs[0] if epochs else 0.0, "rest": rest,
            "n_train": float(tr.sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "cmi-kaggle-volume"))
    ap.add_argument("--epochs", type=int, default=2, help="epochs timed per net (at least 2: the first is not counted)")
    ap.add_argument("--members", default="", help="comma-separated member names to time (default: all)")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="kaggle-time-"))
    cfg = nb.parse_config(["--profile", "full", "--demo", "--data-dir", args.data_dir, "--out-dir", str(out),
                           "--demo-train-subjects", str(REAL_SUBJECTS), "--demo-test-subjects", "2",
                           "--demo-pairs-per-subject", str(REAL_SEQUENCES_PER_SUBJECT // 2),
                           "--epochs", str(args.epochs)], environ={})
    full = nb.parse_config(["--profile", "full"], environ={})
    device = nb.torch_device()
    ds = nb.load_training_data(nb.resolve_data_dir(cfg))
    lengths = ds.train.group_by("sequence_id").len()["len"].to_numpy()
    print(f"data: {len(lengths):,} sequences of {REAL_SUBJECTS} subjects; rows per sequence min {lengths.min()}, "
          f"median {np.median(lengths):.0f}, max {lengths.max()} (real: 29, 59, 700); device {device}, "
          f"{os.cpu_count()} CPU cores, torch threads {nb.torch.get_num_threads()}")
    t0 = time.perf_counter()
    td = nb.prepare_training_data(ds, cfg, out)
    features = time.perf_counter() - t0
    print(f"features, both views: {features:.1f} s")

    wanted = set(filter(None, args.members.split(",")))
    rates, projected = {}, {}
    for member in nb.ensemble_members(cfg):
        if wanted and member.name not in wanted:
            continue
        t = time_fold(member, td, out)
        epochs = 1 if member.family == "lgbm" else next(m for m in nb.ensemble_members(full) if m.name == member.name).cfg.epochs
        per_fold = t["fold"] if member.family == "lgbm" else t["rest"] + t["first_epoch"] + t["epoch"] * (epochs - 1)
        rates[member.name] = (t["fold"] if member.family == "lgbm" else t["epoch"]) / t["n_train"]
        projected[member.name] = per_fold * full.folds * member.seeds
        what = (f"fold {t['fold']:.1f} s" if member.family == "lgbm" else
                f"epoch {t['epoch']:.1f} s (first {t['first_epoch']:.1f} s), rest of the fold {t['rest']:.1f} s")
        print(f"{member.name:<10} {what}; {rates[member.name] * 1e3:.3f} ms per training sequence"
              f"{'' if member.family == 'lgbm' else ' per epoch'}; full profile ({full.folds} folds"
              f"{'' if member.family == 'lgbm' else f' x {epochs} epochs'}): {nb.hours(projected[member.name])}",
              flush=True)
    total = features + sum(projected.values())
    print(f"\nprojected full profile on this machine ({device}): {nb.hours(total)} "
          f"(features {features:.0f} s + " + " + ".join(f"{n} {nb.hours(s)}" for n, s in projected.items()) + ")")
    print("FULL_PROFILE_SECONDS_PER_SEQUENCE = {" + ", ".join(f'"{n}": {r:.2e}' for n, r in rates.items()) + "}")
    if device == "cpu":
        family = {m.name: m.family for m in nb.ensemble_members(cfg)}
        gpu = sum(s / nb.GPU_SPEEDUP_ASSUMED[family[n]] for n, s in projected.items())
        print(f"ASSUMED, not measured: on a GPU with the nets {nb.GPU_SPEEDUP_ASSUMED['torch']:g}x (PyTorch) and "
              f"{nb.GPU_SPEEDUP_ASSUMED['keras']:g}x (Keras) faster than here, LightGBM as here: "
              f"{nb.hours(features + gpu)}")

if __name__ == "__main__":
    main()
