"""Why `mlflow models serve` of mlray's pyfunc was slow: the flavour's predict() against a minimal pyfunc.

    python bench/pyfunc_flavour.py [--threads 6] [--seconds 8]

Both models are logged to a throwaway SQLite MLflow store with the same 64 named double columns (mlray's
signature) and loaded with ``mlflow.pyfunc.load_model``; each side then answers single-row DataFrames from
``--threads`` threads at once, which is how MLflow's scoring server calls predict() (``asyncio.to_thread``,
a pool of min(32, cores + 4) threads). Sides:

- ``minimal``: a PythonModel whose predict() is the same MLP in numpy (the baseline);
- ``mlray, torch threads as found``: mlray's pyfunc with torch's intra-op threads left at their default;
- ``mlray``: the pyfunc as it is now.

Prints requests per second and the median latency of one call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))




def _minimal_model(weights: list[tuple[np.ndarray, np.ndarray]]):  # type: ignore[no-untyped-def]
    from mlflow.pyfunc import PythonModel

    class Minimal(PythonModel):
        def __init__(self, layers):  # type: ignore[no-untyped-def]
            self.layers = layers

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            x = model_input.to_numpy(dtype=np.float32)
            for i, (w, b) in enumerate(self.layers):
                x = x @ w.T + b
                if i < len(self.layers) - 1:
                    x = np.maximum(x, 0)
            e = np.exp(x - x.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)

    return Minimal(weights)


def measure(predict, frame, *, threads: int, seconds: float) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    for _ in range(20):
        predict(frame)
    single = []
    for _ in range(50):
        started = time.perf_counter()
        predict(frame)
        single.append(time.perf_counter() - started)
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            predict(frame)
            done[i] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done) / seconds, statistics.median(single) * 1000


def serve_rate(model_uri: str, body: bytes, *, tracking_uri: str, clients: int, seconds: float) -> tuple[float, float]:
    """`mlflow models serve` of ``model_uri`` (one worker, this venv), ``clients`` keep-alive clients posting ``body``
    to /invocations for ``seconds``: (requests per second, median latency in ms)."""
    import http.client
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # MLflow starts `uvicorn` by name: this venv's
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/ping")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        latencies: list[float] = []
        stop = time.perf_counter() + seconds

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while time.perf_counter() < stop:
                started = time.perf_counter()
                conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
                answer = conn.getresponse()
                answer.read()
                assert answer.status == 200, answer.status
                latencies.append(time.perf_counter() - started)

        pool = [threading.Thread(target=client) for _ in range(clients)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return len(latencies) / seconds, statistics.median(latencies) * 1000
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=min(32, (os.cpu_count() or 1) + 4))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--serve", action="store_true", help="also `mlflow models serve` each model under load")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    import mlflow
    import pandas as pd
    import torch
    from mlflow.models import infer_signature

    from mlray.artifact import write_model_dir
    from mlray.models import ModelSpec, build
    from mlray.registry.tracking import log_model

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    tmp = Path(tempfile.mkdtemp(prefix="mlray-pyfunc-bench-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    features = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    torch.manual_seed(0)
    model = build(ModelSpec(factory="mlray.models:mlp", num_features=64, num_outputs=10))
    model.eval()
    write_model_dir(tmp / "model", model=model, feature_names=features, class_names=[str(i) for i in range(10)])
    rows = np.random.default_rng(0).uniform(0, 16, size=(4, 64))
    run = mlflow.MlflowClient().create_run(mlflow.create_experiment("bench", artifact_location=str(tmp / "art")))
    mlray_uri = log_model(run.info.run_id, tmp / "model", feature_names=features, example=rows, tracking_uri=uri)

    # the minimal side: the same network's weights, in numpy (Standardize folded in by running torch once)
    frame = pd.DataFrame(rows[:1], columns=features)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    layers = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in linear]
    with mlflow.start_run(run_id=run.info.run_id):
        minimal_uri = mlflow.pyfunc.log_model(name="minimal", python_model=_minimal_model(layers),
                                              signature=infer_signature(frame, np.zeros((1, 10))),
                                              pip_requirements=["numpy", "pandas"]).model_uri
        # the same without a signature: what MLflow's checks of 64 named columns cost
        bare_uri = mlflow.pyfunc.log_model(name="bare", python_model=_minimal_model(layers),
                                           pip_requirements=["numpy", "pandas"]).model_uri

    results = []
    bare = mlflow.pyfunc.load_model(bare_uri)
    results.append(("minimal, no signature", *measure(bare.predict, frame, threads=args.threads,
                                                      seconds=args.seconds)))
    minimal = mlflow.pyfunc.load_model(minimal_uri)
    results.append(("minimal (numpy MLP)", *measure(minimal.predict, frame, threads=args.threads,
                                                    seconds=args.seconds)))
    loaded = mlflow.pyfunc.load_model(mlray_uri)
    now = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # torch's default: as many intra-op threads as cores
    results.append(("mlray, torch threads as found", *measure(loaded.predict, frame, threads=args.threads,
                                                              seconds=args.seconds)))
    torch.set_num_threads(now)
    loaded = mlflow.pyfunc.load_model(mlray_uri)  # load_context runs again, as in a fresh server
    results.append(("mlray (as logged now)", *measure(loaded.predict, frame, threads=args.threads,
                                                      seconds=args.seconds)))
    print(f"{args.threads} threads calling predict() on one-row DataFrames, {args.seconds:.0f} s each, "
          f"torch intra-op threads now {torch.get_num_threads()}\n")
    if args.serve:
        import json

        body = json.dumps({"dataframe_split": frame.to_dict(orient="split")}).encode()
        for name, model_uri in (("minimal, no signature", bare_uri), ("minimal (numpy MLP)", minimal_uri),
                                ("mlray (as logged now)", mlray_uri)):
            rate, p50 = serve_rate(model_uri, body, tracking_uri=uri, clients=args.clients, seconds=args.seconds)
            print(f"mlflow models serve, {args.clients} clients: {name:24} {rate:6.0f} req/s, p50 {p50:6.1f} ms")
        print()
    print(f"| {'side':32} | req/s | one call, ms |")
    print(f"|{'-' * 34}|-------|--------------|")
    for name, rate, ms in results:
        print(f"| {name:32} | {rate:5.0f} | {ms:12.2f} |")


if __name__ == "__main__":
    main()
