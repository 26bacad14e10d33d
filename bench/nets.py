"""Neural-net throughput and latency on this machine.

Prints, for the PyTorch nets (the BiGRU, packed and unpacked) and the Keras twin:
  - training throughput (sequences/second, one epoch over demo sequences; torch in fp32 and in
    CPU bf16 autocast, the measurement behind torch_precision=auto choosing fp32 on CPU),
  - single-sequence inference latency for N folds (p50/p95 over real-length sequences).
Usage: python bench/nets.py [--profile quick] [--folds 5] [--n 200] [--tof-grid]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import notebook as nb  # noqa: E402


def percentiles(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50):6.1f} ms  p95 {np.percentile(ms, 95):6.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--tof-grid", action="store_true", help="the nets also read the raw 8x8 ToF grids")
    args = ap.parse_args()
    # Model sizes follow --profile; the data is always the quick profile's demo set (not regenerated).
    data = ["--demo-train-subjects", "16", "--demo-test-subjects", "4", "--demo-pairs-per-subject", "51"]
    cfg = nb.parse_config(["--profile", args.profile, "--demo", "--data-dir", str(ROOT / "demo_data"), *data,
                           "--tof-grid", str(args.tof_grid).lower(), "--net-variants", "all"], environ={})
    ds = nb.load_training_data(nb.resolve_data_dir(cfg))
    labels = nb.sequence_labels(ds.train)
    inputs = nb.net_inputs_from(*nb.derive(ds.train, ds.train_demographics, cfg), tof_grid=cfg.tof_grid)
    y = np.array([nb.GESTURE_INDEX[g] for g in labels["gesture"]])
    sample = inputs.subset(np.arange(len(y)) < 256)
    targets = nb.net_targets(ds.train, nb.label_index(nb.sequence_labels(ds.train)["gesture"].to_list(), nb.GESTURES)).subset(np.arange(len(y)) < 256)
    print(f"profile {args.profile}: conv {cfg.net_conv}, hidden {cfg.net_hidden}, {len(inputs.names)} channels, "
          f"torch threads {nb.torch.get_num_threads()}")

    # --- PyTorch: training throughput (one epoch over 256 sequences, fp32 and CPU
    # bf16 autocast) and single-sequence latency for all folds
    torch = nb.torch
    tiny_va = {"full": sample.subset(np.arange(256) < 16)}  # early stopping needs a validation set; keep it small
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(inputs.arrays), args.n)
    warm = nb.dataclasses.replace(cfg, epochs=1)
    nb.train_torch_fold(warm, sample, targets, tiny_va, y[:16], 0, lambda rec: None)  # untimed: first-call costs
    for precision in ("fp32", "bf16"):
        one = nb.dataclasses.replace(cfg, epochs=1, torch_precision=precision)
        t0 = time.perf_counter()
        res = nb.train_torch_fold(one, sample, targets, tiny_va, y[:16], 0, lambda rec: None)
        print(f"torch train {precision}: {256 / (time.perf_counter() - t0):7.1f} sequences/s "
              f"(one epoch, batch {nb.NET_RECIPE['batch_size']})")
    model = nb.build_torch_model(one, len(res["scaler"].columns))
    model.load_state_dict(res["state"])
    folds = [nb.NetFold(model, res["scaler"])] * args.folds
    torch.set_num_threads(1)  # as predict() runs it
    for packed in (True, False):  # same output unpadded (tested)
        ms = []
        for i in picks:
            single = inputs.subset(np.arange(len(y)) == i)
            t0 = time.perf_counter()
            [nb.torch_heads(fold, single, packed=packed) for fold in folds]
            ms.append((time.perf_counter() - t0) * 1000)
        how = "packed  " if packed else "unpacked"
        print(f"torch single sequence, {args.folds} folds {how}: {percentiles(ms)}")

    # --- Keras: training throughput and tf.function latency
    t0 = time.perf_counter()
    kres = nb.train_keras_fold(nb.dataclasses.replace(cfg, epochs=1), sample, targets, tiny_va, y[:16], 0, lambda rec: None)
    print(f"keras train: {256 / (time.perf_counter() - t0):7.1f} sequences/s (one epoch incl. first trace)")
    pred = nb.KerasPredictor(kres["model"], len(kres["scaler"].mean))
    folds = [nb.NetFold(pred, kres["scaler"])] * args.folds
    [nb.keras_heads(fold, inputs.subset(np.arange(len(y)) == 0)) for fold in folds]  # trace
    ms = []
    for i in picks:
        single = inputs.subset(np.arange(len(y)) == i)
        t0 = time.perf_counter()
        [nb.keras_heads(fold, single) for fold in folds]
        ms.append((time.perf_counter() - t0) * 1000)
    print(f"keras single sequence, {args.folds} folds, tf.function: {percentiles(ms)}")


if __name__ == "__main__":
    main()
