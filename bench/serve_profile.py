"""Where a serving replica's CPU goes: py-spy on one replica of a local cluster under wrk, summed by code.

One cluster serving ``serve_apps/digits.yaml``'s app (as ``bench/serve_ab.py`` starts a side: this checkout,
``--env``/``--args`` as there), 3 s of warm-up, then ``py-spy record`` on one ``ServeReplica`` process while
wrk sends single rows from 16 connections. Prints the replica's samples by where their innermost frame was
(self time), and the heaviest functions by inclusive time.

    python bench/serve_profile.py [--seconds 20] [--replicas 2] [--env KEY=VALUE ...] [--args JSON]

Needs ``py-spy`` (the ``dev`` extra) and ``wrk``; py-spy needs ptrace (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, pattern on the frame's file) in order: the first that matches names a sample's innermost frame.
PLACES = [
    ("mlray", r"(^|/)mlray/"),
    ("Ray Serve", r"(^|/)ray/serve/"),
    ("Ray core (metrics recorder, worker)", r"(^|/)ray/|_raylet"),
    ("uvicorn", r"(^|/)uvicorn/"),
    ("FastAPI / Starlette", r"(^|/)(fastapi|starlette)/"),
    ("asyncio / uvloop", r"(^|/)asyncio/|uvloop"),
    ("logging", r"(^|/)logging/"),
    ("torch", r"(^|/)torch/"),
    ("numpy", r"(^|/)numpy/"),
    ("orjson / json", r"orjson|(^|/)json/"),
    ("contextlib", r"(^|/)contextlib\.py"),
    ("uuid", r"(^|/)uuid\.py"),
    ("threading", r"(^|/)threading\.py"),
]
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def place(file: str) -> str:
    for label, pattern in PLACES:
        if re.search(pattern, file):
            return label
    return "other standard library / C" if file else "native"


def summarize(collapsed: str, top: int) -> str:
    self_by: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        parsed = [FRAME.match(f) for f in frames]
        names = [(m["func"], m["file"]) if m else (f, "") for f, m in zip(frames, parsed, strict=True)]
        total += count
        self_by[place(names[-1][1])] += count
        for func, file in {(func, file) for func, file in names}:
            short = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", file)
            inclusive[f"{func} ({short})"] += count
    lines = [f"{total} samples of the replica on CPU\n", "| where (self time) | share |", "|---|---|"]
    lines += [f"| {label} | {100 * n / total:.1f} % |" for label, n in self_by.most_common()]
    lines += ["", "| function (inclusive) | share |", "|---|---|"]
    lines += [f"| `{name}` | {100 * n / total:.1f} % |" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def replica_pid(driver: int) -> int:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "ServeReplica" in args and "ModelServer" in args:
            return int(pid)
    raise SystemExit(f"no ServeReplica:...:ModelServer process under driver {driver}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--args", default="{}", help="JSON merged into the app's args")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--raw", help="also keep py-spy's collapsed stacks in this file")
    parser.add_argument("--summarize", metavar="RAW", help="only summarize a kept file of collapsed stacks")
    opts = parser.parse_args()
    if opts.summarize:
        print(summarize(Path(opts.summarize).read_text(), opts.top))
        return
    sys.path.insert(0, str(ROOT))
    from bench._serve.wrk import run_wrk
    from bench.serve import prepare_model

    home = os.environ.setdefault("MLRAY_HOME", tempfile.mkdtemp(prefix="mlray-bench-profile-"))
    prepare_model(epochs=3)
    spec = {"code": str(ROOT), "env": dict(item.split("=", 1) for item in opts.env), "args": json.loads(opts.args),
            "replicas": opts.replicas}
    side = subprocess.Popen([sys.executable, str(ROOT / "bench" / "serve_ab.py"), "--side", json.dumps(spec)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "MLRAY_HOME": home, "PYTHONPATH": str(ROOT)})
    try:
        assert side.stdout is not None
        url = next((line.split()[1] for line in side.stdout if line.startswith("URL ")), None)
        if url is None:
            raise SystemExit("the cluster did not start; its output is above")
        body = json.dumps({"instances": [[float(i % 16) for i in range(64)]]}).encode()
        run_wrk(url, body, connections=16, seconds=3, rows_per_request=1)  # warm-up
        pid = replica_pid(side.pid)
        raw = Path(opts.raw or tempfile.mktemp(suffix=".txt", prefix="mlray-profile-"))
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        spy = subprocess.Popen([py_spy, "record", "--rate", str(opts.rate), "--duration", str(opts.seconds),
                                "--format", "raw", "--output", str(raw), "--pid", str(pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        result: dict[str, object] = {}
        load = threading.Thread(target=lambda: result.update(run_wrk(
            url, body, connections=16, seconds=opts.seconds - 2, rows_per_request=1, cpu_of=[side.pid]).to_dict()))
        load.start()
        load.join()
        _, err = spy.communicate(timeout=opts.seconds + 60)
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.strip()}")
        print(f"# bench/serve_profile.py, {time.strftime('%Y-%m-%d %H:%M')}: replica pid {pid} of {opts.replicas}, "
              f"wrk 16 connections single rows: {result['req_per_s']:,.0f} req/s, "
              f"cluster CPU {result['cpu_ms_per_request']:.2f} ms/req; env {opts.env or '-'}, args {opts.args}\n")
        print(summarize(raw.read_text(), opts.top))
    finally:
        if side.stdin:
            side.stdin.close()
        side.wait(timeout=180)


if __name__ == "__main__":
    main()
