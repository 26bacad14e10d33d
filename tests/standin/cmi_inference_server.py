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
- `serve()` outside the scoring rerun returns at once. Inside it (KAGGLE_IS_COMPETITION_RERUN set)
  it blocks, serving predict() to a gateway in another process over a socket, until that gateway
  has sent every sequence: `python cmi_inference_server.py TEST_CSV DEMOGRAPHICS_CSV` is that
  gateway. The frames cross the process boundary as Arrow IPC bytes, so their dtypes (String-typed
  empty columns) arrive as sent, as with the real package's Arrow transport.
Not reproduced: gRPC itself (the stand-in uses multiprocessing.connection on 127.0.0.1, port
CMITEST_GATEWAY_PORT, the real one 50051), the 15-minute start-up and 30-minute per-call limits.
"""
import io
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Client, Listener

import polars as pl

GESTURES = {
    "Above ear - pull hair", "Cheek - pinch skin", "Eyebrow - pull hair", "Eyelash - pull hair",
    "Forehead - pull hairline", "Forehead - scratch", "Neck - pinch skin", "Neck - scratch",
    "Write name on leg", "Wave hello", "Glasses on/off", "Text on phone", "Write name in air",
    "Feel around in tray and pull out an object", "Scratch knee/leg skin", "Pull air toward your face",
    "Drink from bottle/cup", "Pinch knee/leg skin",
}


PORT_ENV = "CMITEST_GATEWAY_PORT"
AUTHKEY = b"cmi-standin"


class GatewayRuntimeError(Exception):
    pass


def _port() -> int:
    return int(os.getenv(PORT_ENV, "50051"))


def _frame_bytes(frame: pl.DataFrame) -> bytes:
    return frame.write_ipc(None).getvalue()


def _checked(seq_id, out):
    if type(out) is not str:  # a numpy str_ fails the real transport
        raise GatewayRuntimeError(f"Invalid prediction type, expected str but got {type(out)}")
    if out not in GESTURES:
        raise GatewayRuntimeError(f"All gestures must match those found in the train data. Got {out}")
    return seq_id, out


def _calls(data_paths):
    """(sequence_id, sequence, demographics) in a random order that differs between runs."""
    test_path, demo_path = data_paths
    test = pl.read_csv(test_path)  # relative to the cwd now, as the real gateway reads it
    demos = pl.read_csv(demo_path)
    ids = list(test["sequence_id"].unique())
    for seq_id in random.Random(os.urandom(8)).sample(ids, len(ids)):
        sequence = test.filter(pl.col("sequence_id") == seq_id)
        yield seq_id, sequence, demos.filter(pl.col("subject") == sequence["subject"][0])


def run_gateway(data_paths, timeout_s: float = 300.0) -> None:
    """The scoring rerun's gateway, in its own process: connect to the server serve() started, send
    every sequence, check each answer, write submission.parquet, then let the server stop."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = Client(("127.0.0.1", _port()), authkey=AUTHKEY)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise GatewayRuntimeError("the inference server never started listening") from None
            time.sleep(0.2)
    rows = []
    with conn:
        for seq_id, sequence, demo in _calls(data_paths):
            conn.send(("predict", _frame_bytes(sequence), _frame_bytes(demo)))
            status, value = conn.recv()
            if status == "error":
                raise GatewayRuntimeError(f"SERVER_RAISED_EXCEPTION: {value}")
            if status == "bad":
                raise GatewayRuntimeError(f"Invalid prediction type, expected str but got {value}")
            rows.append(_checked(seq_id, value))
        conn.send(("shutdown", None, None))
    pl.DataFrame(rows, schema=["sequence_id", "gesture"], orient="row").write_parquet("submission.parquet")


class CMIInferenceServer:
    def __init__(self, predict_fn):
        self.predict_fn = predict_fn

    def serve(self):
        """Outside the scoring rerun: return. Inside it: answer a gateway process's calls, one at a
        time on a worker thread, until it says it is done."""
        if os.getenv("KAGGLE_IS_COMPETITION_RERUN") is None:
            return
        with Listener(("127.0.0.1", _port()), authkey=AUTHKEY) as listener, \
                ThreadPoolExecutor(max_workers=1) as pool, listener.accept() as conn:
            while True:
                kind, sequence, demo = conn.recv()
                if kind == "shutdown":
                    return
                try:
                    out = pool.submit(self.predict_fn, pl.read_ipc(io.BytesIO(sequence)),
                                      pl.read_ipc(io.BytesIO(demo))).result()
                except Exception as err:
                    conn.send(("error", f"{type(err).__name__}: {err}"))
                    continue
                conn.send(("ok", out) if type(out) is str else ("bad", repr(out)))

    def run_local_gateway(self, data_paths=None):
        rows = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for seq_id, sequence, demo in _calls(data_paths):
                try:
                    out = pool.submit(self.predict_fn, sequence, demo).result()
                except Exception as err:
                    raise GatewayRuntimeError(f"SERVER_RAISED_EXCEPTION: {err}") from None
                rows.append(_checked(seq_id, out))
        pl.DataFrame(rows, schema=["sequence_id", "gesture"], orient="row").write_parquet("submission.parquet")


if __name__ == "__main__":  # the scoring rerun's gateway process: TEST_CSV DEMOGRAPHICS_CSV
    run_gateway((sys.argv[1], sys.argv[2]))
