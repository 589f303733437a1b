"""Plots of bench/serve.py's results for the docs site (docs/img/generated/), drawn from bench/results/*.md.

    python docs/tools/plot_bench.py            # `make docs` runs it

- ``bench-serve.png``: the newest full run, single-row requests: req/s and p99 by number of clients, for
  mlray, the plain FastAPI process and ``mlflow models serve``;
- ``bench-history.png``: every run's p99 and req/s at 16 clients, mlray against the plain process measured
  in the same run.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "img" / "generated"
SERVERS = {"mlray (Ray Serve)": "mlray", "plain FastAPI + uvicorn (async)": "plain FastAPI process",
           "mlflow models serve": "mlflow models serve"}


@dataclass
class Run:
    path: Path
    when: str  # "2026-11-28 04:28", from the file's title
    quick: bool
    rows: list[dict[str, str]]  # the "## Servers" table

    def single_rows(self, server: str) -> list[tuple[int, float, float]]:
        """(clients, req/s, p99 ms) of one server's single-row loads, by clients."""
        out = []
        for row in self.rows:
            match = re.match(r"1 row x (\d+) clients", row["load"])
            if match and row["server"] == server:
                out.append((int(match.group(1)), number(row["req/s"]), number(row["p99 ms"])))
        return sorted(out)


def number(text: str) -> float:
    return float(text.replace(",", ""))


def read(path: Path) -> Run:
    text = path.read_text()
    title = re.search(r"^# bench/serve\.py, (\d{4}-\d\d-\d\d \d\d:\d\d)", text, re.M)
    if title is None:
        raise ValueError(f"{path}: no '# bench/serve.py, YYYY-MM-DD HH:MM' title")
    table = text.split("## Servers", 1)[1].split("\n\n", 2)[1]
    lines = [line for line in table.splitlines() if line.startswith("|") and not line.startswith("|--")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
            for line in lines[1:]]
    return Run(path, title.group(1), "quick" in path.name, rows)


def plot_newest(run: Run, into: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server, label in SERVERS.items():
        points = run.single_rows(server)
        if not points:
            continue
        clients = [p[0] for p in points]
        left.plot(clients, [p[1] for p in points], marker="o", label=label)
        right.plot(clients, [p[2] for p in points], marker="o", label=label)
    clients = sorted({p[0] for server in SERVERS for p in run.single_rows(server)})
    for axis, what in ((left, "requests per second"), (right, "p99 latency, ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(clients, [str(c) for c in clients])
        axis.set_xlabel("concurrent clients (single-row requests)")
        axis.set_ylabel(what)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend()
    fig.suptitle(f"bench/serve.py, {run.when}: one round per load (2 cores, loopback)")
    fig.tight_layout()
    fig.savefig(into, dpi=110)
    plt.close(fig)


def plot_history(runs: list[Run], into: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server, label in list(SERVERS.items())[:2]:
        when, rps, p99 = [], [], []
        for run in runs:
            at16 = [p for p in run.single_rows(server) if p[0] == 16]
            if at16:
                when.append(run.when[5:] + (" q" if run.quick else ""))
                rps.append(at16[0][1])
                p99.append(at16[0][2])
        left.plot(when, rps, marker="o", label=label)
        right.plot(when, p99, marker="o", label=label)
    for axis, what in ((left, "requests per second at 16 clients"), (right, "p99 ms at 16 clients")):
        axis.set_ylabel(what)
        axis.tick_params(axis="x", rotation=30)
        axis.grid(alpha=0.3)
    left.legend()
    fig.suptitle("Every bench/serve.py run in bench/results (q: --quick); the plain process measured in the same run")
    fig.tight_layout()
    fig.savefig(into, dpi=110)
    plt.close(fig)


def main() -> int:
    runs = sorted((read(path) for path in RESULTS.glob("serve-[0-9]*.md")), key=lambda run: run.when)
    full = [run for run in runs if not run.quick]
    if not full:
        print(f"no full bench/serve.py run in {RESULTS}", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    plot_newest(full[-1], OUT / "bench-serve.png")
    plot_history(runs, OUT / "bench-history.png")
    print(f"plotted {len(runs)} runs into {OUT} (newest full run: {full[-1].path.name}, {full[-1].when})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
