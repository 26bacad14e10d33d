"""predict() latency for the whole bundle over the demo test sequences, as the gateway calls it.

Usage: python bench/inference.py [--model-path working/bundle] [--data-dir demo_data] [--n 408]
                                 [--plan argmax|argmax9|gesture_capacity|slots/lgbm|slots/heads|slots/joint]
Prints the first call (bundle load) apart, then p50/p95/max over the following calls, the late
calls of long subjects (80 or more of the subject's sequences seen: the per-subject assignment
solves over all of them), then where the time of a call goes (signals, LightGBM features and
folds, each net's folds). --plan overrides the bundle's serving rule and slot source (default: the
bundle's; the gesture weights stay the bundle's, 1 where it has none).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import notebook as nb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=str(ROOT / "working" / "bundle"))
    ap.add_argument("--data-dir", default=str(ROOT / "demo_data"))
    ap.add_argument("--n", type=int, default=408)
    plans = [r for r in nb.SERVING_RULES if r != "slots"] + [f"slots/{s}" for s in nb.SLOT_SOURCES]
    ap.add_argument("--plan", choices=plans, default=None)
    args = ap.parse_args()
    cfg = nb.parse_config(["--stage", "infer", "--model-path", args.model_path, "--data-dir", args.data_dir],
                          environ={})
    rt = nb.set_runtime(cfg)
    if args.plan:
        bundle = rt.require()
        rule, _, source = args.plan.partition("/")
        plan = nb.serving_plan(rule, source, bundle.manifest["serving"].get("gesture_weight"))
        left_out: dict[str, str] = {}
        plan, context, names = nb.slot_rule(bundle.path, dict(bundle.manifest, serving=plan),
                                            nb.produced_names(bundle.cfg), bundle.cfg, bundle.models, left_out)
        assert not left_out, left_out
        rt.bundle = nb.dataclasses.replace(bundle, plan=plan, context=context, context_names=names)
    test = pl.read_csv(Path(args.data_dir) / "test.csv", infer_schema_length=100)
    demo = pl.read_csv(Path(args.data_dir) / "test_demographics.csv")
    ids = test["sequence_id"].unique(maintain_order=True).to_list()
    rng = np.random.default_rng(0)
    calls = [ids[i % len(ids)] for i in rng.permutation(max(args.n, len(ids)))[: args.n]]
    frames = {sid: test.filter(pl.col("sequence_id") == sid) for sid in set(calls)}
    times, seen, counts = [], {}, []
    for sid in calls:
        seq = frames[sid]
        subject = seq["subject"][0]
        d = demo.filter(pl.col("subject") == subject)
        t0 = time.perf_counter()
        out = nb.predict(seq, d)
        times.append((time.perf_counter() - t0) * 1000)
        seen[subject] = seen.get(subject, 0) + 1
        counts.append(seen[subject])
        assert type(out) is str and out in nb.GESTURES
    first, rest = times[0], np.array(times[1:])
    loads = "the bundle was loaded before it, for --plan" if args.plan else "loads the bundle"
    print(f"predict(): first call ({loads}) {first:.0f} ms; next {len(rest)} calls: "
          f"p50 {np.percentile(rest, 50):.1f} ms, p95 {np.percentile(rest, 95):.1f} ms, max {rest.max():.1f} ms "
          f"(models: {', '.join(nb._RUNTIME.bundle.models)}; rule {nb.plan_name(nb._RUNTIME.bundle.plan)}); {nb._RUNTIME.summary()}")
    late = np.array(times)[np.array(counts) >= 80]
    if len(late):
        print(f"late calls (80-{max(counts)} of the subject's sequences seen, rule {nb.plan_name(nb._RUNTIME.bundle.plan)}): "
              f"{len(late)} calls, p50 {np.percentile(late, 50):.1f} ms, p95 {np.percentile(late, 95):.1f} ms")
    breakdown(nb._RUNTIME, [frames[sid] for sid in calls[1:]], demo)


def breakdown(rt: "nb.Runtime", sequences: list[pl.DataFrame], demo: pl.DataFrame) -> None:
    """Where a call's time goes: the steps of Runtime.proba timed one by one (median ms per call)."""
    laps: dict[str, list[float]] = {}

    def lap(name: str, t0: float) -> float:
        laps.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
        return time.perf_counter()

    for seq in sequences:
        one = seq.with_columns(pl.lit("SUBJ_CALL").alias("subject"))
        d = demo.filter(pl.col("subject") == seq["subject"][0]).head(1).with_columns(pl.lit("SUBJ_CALL").alias("subject"))
        t = time.perf_counter()
        prepared, channels = nb.derive(one, d, rt.cfg)
        t = lap("signals (derive)", t)
        cache: dict = {}
        for name, loaded in rt.bundle.models.items():
            loaded.member.call_inputs(prepared, channels, cache)
            t = lap(f"{name}: inputs" if name == "lgbm" else "net inputs", t)
            loaded.heads(prepared, channels, cache)
            t = lap(f"{name}: {len(loaded.folds)} folds predict", t)
    print("per-call breakdown (median ms): " + ", ".join(f"{k} {np.median(v):.1f}" for k, v in laps.items()))


if __name__ == "__main__":
    main()
