"""Stand-in for kaggle_evaluation.cmi_inference_server (the competition ships the real package only
inside its data download; it is not on the package index). Tests copy this file to
DATA/kaggle_evaluation/cmi_inference_server.py, where the notebook looks for the real one.

Behaviours of the real package (checked against its source, kaggle_evaluation/core/templates.py,
base_gateway.py, cmi_gateway.py) that this reproduces:
- `CMIInferenceServer(predict).run_local_gateway(data_paths=(test_csv, demographics_csv))`.
- The data paths are used as given: a relative path is read relative to the working directory at
  the time the gateway reads it (after the server has started), not when it was passed.
- The CSVs are read with polars' default type inference (first 100 rows), so an all-empty column
  arrives as String.
- `predict(sequence, demographics)` is called once per sequence, in a random order that differs
  between runs, with two polars DataFrames (the sequence's rows, the subject's demographics rows),
  from a worker thread (the real server answers on a gRPC thread pool of one worker).
- A result that is not a `str` or not one of the 18 gestures stops the run with an error; so does
  an exception raised inside predict() (the gateway re-raises it as a scoring error).
- `submission.parquet` (sequence_id, gesture) is written into the current working directory.
- `serve()` outside the scoring rerun returns at once; inside it, it blocks (not exercised here).
Not reproduced: the gRPC transport itself (frames are passed in memory; the real package sends
them as Arrow data, which keeps their dtypes), the 15-minute start-up and 30-minute per-call limits.
"""
import os
import random
from concurrent.futures import ThreadPoolExecutor

import polars as pl

GESTURES = {
    "Above ear - pull hair", "Cheek - pinch skin", "Eyebrow - pull hair", "Eyelash - pull hair",
    "Forehead - pull hairline", "Forehead - scratch", "Neck - pinch skin", "Neck - scratch",
    "Write name on leg", "Wave hello", "Glasses on/off", "Text on phone", "Write name in air",
    "Feel around in tray and pull out an object", "Scratch knee/leg skin", "Pull air toward your face",
    "Drink from bottle/cup", "Pinch knee/leg skin",
}


class GatewayRuntimeError(Exception):
    pass


class CMIInferenceServer:
    def __init__(self, predict_fn):
        self.predict_fn = predict_fn

    def serve(self):
        if os.getenv("KAGGLE_IS_COMPETITION_RERUN") is not None:
            raise RuntimeError("the stand-in cannot block as the real scoring server does")

    def run_local_gateway(self, data_paths=None):
        test_path, demo_path = data_paths
        test = pl.read_csv(test_path)  # relative to the cwd now, as the real gateway reads it
        demos = pl.read_csv(demo_path)
        ids = list(test["sequence_id"].unique())
        rows = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for seq_id in random.Random(os.urandom(8)).sample(ids, len(ids)):
                sequence = test.filter(pl.col("sequence_id") == seq_id)
                demo = demos.filter(pl.col("subject") == sequence["subject"][0])
                try:
                    out = pool.submit(self.predict_fn, sequence, demo).result()
                except Exception as err:
                    raise GatewayRuntimeError(f"SERVER_RAISED_EXCEPTION: {err}") from None
                if type(out) is not str:  # a numpy str_ fails the real transport
                    raise GatewayRuntimeError(f"Invalid prediction type, expected str but got {type(out)}")
                if out not in GESTURES:
                    raise GatewayRuntimeError(f"All gestures must match those found in the train data. Got {out}")
                rows.append((seq_id, out))
        pl.DataFrame(rows, schema=["sequence_id", "gesture"], orient="row").write_parquet("submission.parquet")
