"""The markdown tables of bench/serve.py: the three servers, the issue's targets, the Serve checks, the sweep."""

from __future__ import annotations

import statistics
from typing import Any

from bench._serve.wrk import LoadResult

NAMES = {"plain": "plain FastAPI + uvicorn (async)", "mlflow": "mlflow models serve", "mlray": "mlray (Ray Serve)"}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _cpu(load: LoadResult) -> str:
    return f"{load.cpu_ms_per_request:.2f}" if load.cpu_ms_per_request is not None else "-"


def cpu_breakdown(load: LoadResult) -> str:
    """Where the CPU of one run went, by process role, as shares of the total."""
    total = sum(load.cpu_by_role.values()) or 1.0
    parts = sorted(load.cpu_by_role.items(), key=lambda item: -item[1])
    return ", ".join(f"{role} {100 * cpu / total:.0f}%" for role, cpu in parts if cpu / total >= 0.01)


def _find(results: list[LoadResult], connections: int, rows: int) -> LoadResult | None:
    return next((r for r in results if r.connections == connections and r.rows_per_request == rows), None)


def servers_table(results: dict[str, list[LoadResult]]) -> str:
    rows = []
    for key in ("plain", "mlflow", "mlray"):
        for load in results.get(key, []):
            plain = _find(results.get("plain", []), load.connections, load.rows_per_request)
            mlflow = _find(results.get("mlflow", []), load.connections, load.rows_per_request)
            rows.append([
                f"{load.rows_per_request} row{'s' if load.rows_per_request > 1 else ''} x {load.connections} clients",
                NAMES[key], f"{load.req_per_s:,.0f}", f"{load.rows_per_s:,.0f}", f"{load.p50_ms:.1f}",
                f"{load.p99_ms:.1f}", _cpu(load), str(load.errors) + (" (capped)" if load.capped else ""),
                _ratio(load.req_per_s, plain.req_per_s if plain else None) if key != "plain" else "",
                _ratio(load.req_per_s, mlflow.req_per_s if mlflow else None) if key == "mlray" else "",
            ])
    rows.sort(key=lambda r: (int(r[0].split()[0]), int(r[0].split()[3])))
    return _table(["load", "server", "req/s", "rows/s", "p50 ms", "p99 ms", "CPU ms/req", "errors", "vs plain",
                   "vs mlflow"], rows)


Rounds = list[tuple[LoadResult, LoadResult | None]]


def rounds_16(results: dict[str, list[LoadResult]], repeats: list[dict[str, Any]]) -> Rounds:
    """Every single-row 16-client round: the main table's, then ``--repeat``'s (mlray, plain right after)."""
    first = _find(results.get("mlray", []), 16, 1)
    out = [(first, _find(results.get("plain", []), 16, 1))] if first else []
    for pair in repeats:
        plain = LoadResult.from_dict(pair["plain"]) if pair["plain"] else None
        out.append((LoadResult.from_dict(pair["mlray"]), plain))
    return out


def rounds_table(rounds: Rounds) -> str:
    rows = []
    for i, (ours, plain) in enumerate(rounds, 1):
        cpu = _cpu_ratio(ours, plain)
        rows.append([str(i), f"{ours.req_per_s:,.0f}", f"{ours.p50_ms:.1f}", f"{ours.p99_ms:.1f}",
                     f"{plain.req_per_s:,.0f}" if plain else "-", f"{plain.p99_ms:.1f}" if plain else "-",
                     f"{ours.req_per_s / plain.req_per_s:.2f}x" if plain and plain.req_per_s else "-",
                     _cpu(ours), _cpu(plain) if plain else "-", f"{cpu:.2f}x" if cpu else "-"])
    ours_p99 = statistics.median(o.p99_ms for o, _ in rounds)
    plain_p99 = [p.p99_ms for _, p in rounds if p]
    ratios = [o.req_per_s / p.req_per_s for o, p in rounds if p and p.req_per_s]
    rows.append(["**median**", f"{statistics.median(o.req_per_s for o, _ in rounds):,.0f}",
                 f"{statistics.median(o.p50_ms for o, _ in rounds):.1f}", f"**{ours_p99:.1f}**",
                 f"{statistics.median(p.req_per_s for _, p in rounds if p):,.0f}" if plain_p99 else "-",
                 f"{statistics.median(plain_p99):.1f}" if plain_p99 else "-",
                 f"**{statistics.median(ratios):.2f}x**" if ratios else "-", "", "",
                 f"**{cpu_median:.2f}x**" if (cpu_median := _cpu_ratio_median(rounds)) else "-"])
    return _table(["round", "mlray req/s", "mlray p50 ms", "mlray p99 ms", "plain req/s", "plain p99 ms",
                   "mlray / plain", "mlray CPU ms/req", "plain CPU ms/req", "CPU mlray / plain"], rows)


def _cpu_ratio(ours: LoadResult, plain: LoadResult | None) -> float | None:
    mine, theirs = ours.cpu_ms_per_request, plain.cpu_ms_per_request if plain else None
    return mine / theirs if mine is not None and theirs else None


def _cpu_ratio_median(rounds: Rounds) -> float | None:
    """The median over the rounds of mlray's CPU per request over the plain process's in the same round (the
    plain process's own figure moves by a quarter between runs; a ratio per round compares like with like)."""
    ratios = [r for ours, plain in rounds if (r := _cpu_ratio(ours, plain)) is not None]
    return statistics.median(ratios) if ratios else None


def targets_table(results: dict[str, list[LoadResult]], rounds: Rounds | None = None) -> str:
    """The issue's targets. With several 16-client rounds, the p99 and the req/s and CPU ratios to the plain
    process are the medians over the rounds (one run's p99 varies 2x on this shared machine)."""
    ours, plain, mlflow = (results.get(k, []) for k in ("mlray", "plain", "mlflow"))
    o16, p16, m16 = (_find(r, 16, 1) for r in (ours, plain, mlflow))
    o256, p256 = _find(ours, 16, 256), _find(plain, 16, 256)
    rows = []
    several = rounds is not None and len(rounds) > 1
    median_of = f" (median of {len(rounds)} rounds)" if several and rounds else ""

    def add(what: str, value: float | None, shown: str, required: str, ok: bool | None) -> None:
        rows.append([what, shown if value is not None else "-", required,
                     "-" if ok is None or value is None else ("yes" if ok else "**no**")])

    r = o16.req_per_s / m16.req_per_s if o16 and m16 and m16.req_per_s else None
    add("single-row req/s, 16 clients: mlray / mlflow", r, f"{r:.2f}x" if r else "", ">= 3x", bool(r and r >= 3))
    r = o16.req_per_s / p16.req_per_s if o16 and p16 and p16.req_per_s else None
    if several and rounds:
        ratios = [o.req_per_s / p.req_per_s for o, p in rounds if p and p.req_per_s]
        r = statistics.median(ratios) if ratios else None
    add("single-row req/s, 16 clients: mlray / plain" + median_of, r, f"{r:.2f}x" if r else "", ">= 0.7x",
        bool(r and r >= 0.7))
    v = o16.p99_ms if o16 else None
    if several and rounds:
        v = statistics.median(o.p99_ms for o, _ in rounds)
    add("single-row p99, 16 clients: mlray" + median_of, v, f"{v:.1f} ms" if v else "", "< 25 ms",
        bool(v and v < 25))
    r = _cpu_ratio(o16, p16) if o16 else None
    if several and rounds:
        r = _cpu_ratio_median(rounds)
    add("single-row CPU ms/req, 16 clients: mlray / plain" + median_of, r, f"{r:.2f}x" if r else "", "<= 1.5x",
        bool(r and r <= 1.5))
    r = o256.rows_per_s / p256.rows_per_s if o256 and p256 and p256.rows_per_s else None
    add("256-row rows/s, 16 clients: mlray / plain", r, f"{r:.2f}x" if r else "", ">= 0.8x", bool(r and r >= 0.8))
    return _table(["target", "measured", "required", "met"], rows)


def listeners_table(listeners: list[dict[str, Any]]) -> str:
    rows = []
    for item in listeners:
        ports = item["ports"]
        shown = ", ".join(map(str, ports[:4])) + (f" (+{len(ports) - 4})" if len(ports) > 4 else "")
        exposed = item["address"] not in ("127.0.0.1", "::1")
        rows.append([item["role"], item["address"], shown, "**all interfaces**" if item["address"] in ("0.0.0.0", "::")
                     else ("a machine address" if exposed else "loopback")])
    return _table(["process", "address", "ports", "reachable from"], rows)


def checks_lines(trial: dict[str, Any]) -> list[str]:
    lines = []
    for who, bp in trial.get("backpressure", {}).items():
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(bp["statuses"].items()))
        limits = "Serve's max_ongoing/max_queued_requests" if who == "serve" else "the app's admission control"
        lines.append(f"- backpressure by {limits} (1 running + 1 queued allowed, 32 clients, 256 rows): "
                     f"{bp['requests']} requests, status codes {{{codes}}}, Retry-After on {bp['retry_after_headers']}")
    if "rollover" in trial:
        ro = trial["rollover"]
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(ro["statuses"].items()))
        lines.append(f"- every replica replaced under load (16 clients): {ro['requests']} requests, "
                     f"{ro['failed']} failed (status codes {{{codes}}}, socket errors {ro['socket_errors']}); "
                     f"redeploy returned after "
                     f"{ro['deploy_s']:.1f} s, old replicas gone after {ro['old_replicas_gone_s']:.1f} s")
    if "serve_shutdown_s" in trial:
        lines.append(f"- `serve.shutdown()` took {trial['serve_shutdown_s']:.1f} s")
    lines.append(f"- HAProxy processes left running after `ray.shutdown()`: {trial.get('haproxy_orphans', 0)}")
    return lines


def sweep_table(trials: list[dict[str, Any]]) -> str:
    rows = []
    for trial in trials:
        for v in trial["variants"]:
            load = LoadResult.from_dict(v["loads"][0])
            plain = LoadResult.from_dict(v["reference"][0]) if v.get("reference") else None
            rows.append([trial["name"], v["variant"]["name"], f"{load.req_per_s:,.0f}", f"{load.p50_ms:.1f}",
                         f"{load.p99_ms:.1f}", _cpu(load), str(load.errors),
                         f"{plain.req_per_s:,.0f}" if plain else "-", _cpu(plain) if plain else "-",
                         _ratio(load.req_per_s, plain.req_per_s if plain else None), f"{v['deploy_s']:.0f}"])
    return _table(["mode", "variant", "req/s", "p50 ms", "p99 ms", "CPU ms/req", "errors", "plain req/s (right after)",
                   "plain CPU ms/req", "vs plain", "deploy s"], rows)


def sweep_checks_table(trials: list[dict[str, Any]]) -> str:
    rows = []
    for trial in trials:
        exposed = sorted({f"{item['role']} {item['address']}" for item in trial.get("listeners", [])
                          if item["address"] not in ("127.0.0.1", "::1")
                          and item["role"].startswith(("serve", "haproxy"))})
        bp = trial.get("backpressure", {}).get("serve")
        ro = trial.get("rollover")
        rows.append([
            trial["name"],
            f"{trial['serve_shutdown_s']:.1f}" if "serve_shutdown_s" in trial else "-",
            (", ".join(f"{c}: {n}" for c, n in sorted(bp["statuses"].items())) +
             f"; Retry-After {bp['retry_after_headers']}") if bp else "-",
            f"{ro['failed']} of {ro['requests']} failed, old gone in {ro['old_replicas_gone_s']:.0f} s" if ro else "-",
            "; ".join(exposed) or "none",
        ])
    return _table(["mode", "serve.shutdown s", "Serve backpressure statuses", "replicas replaced under load",
                   "Serve listeners not on loopback"], rows)


def render(results: dict[str, list[LoadResult]], *, serve_main: dict[str, Any] | None,
           sweep: list[dict[str, Any]] | None, context: dict[str, Any]) -> str:
    env = " ".join(f"{k}={v}" for k, v in context["env"].items())
    parts = [
        f"# bench/serve.py, {context['date']}",
        "",
        f"{context['cpus']} CPUs; load average {context['load_before'][0]:.1f} before, "
        f"{context['load_after'][0]:.1f} after (anything above ~0.5 means other work shared the cores); "
        f"{context['seconds']:.0f} s per run, wrk 1 thread at nice 15, servers at nice 15; "
        f"digits version {context['version']}; {context['wall_s'] / 60:.1f} min in all.",
        "",
        f"mlray: serve_apps/digits.yaml deployed by `mlray.serving.deploy` with {context['replicas']} fixed "
        f"replica(s), batching {context['batching']}, access log {context['access_log']}, API key "
        f"{'on' if context['api_key'] else 'off'}; its Ray cluster started with `{env}` (from "
        f"{context['env_source']}), HAProxy's stats and metrics bound to 127.0.0.1 by mlray's wrapper. "
        "The plain process is measured right after each of mlray's runs, so both see the same machine.",
        "",
        "## Servers",
        "",
        servers_table(results),
        "",
        "CPU ms/req: CPU time of the server's processes (for mlray: every process of its Ray cluster, HAProxy "
        "included) per request during the run; it changes much less than req/s when other work shares the cores.",
        *([f"\nWhere mlray's CPU went (single rows, 16 clients): {cpu_breakdown(m16)}."]
          if (m16 := _find(results.get("mlray", []), 16, 1)) and m16.cpu_by_role else []),
        "",
    ]
    repeats = (serve_main or {}).get("variants", [{}])[0].get("repeats", [])
    rounds = rounds_16(results, repeats)
    if len(rounds) > 1:
        parts += ["", "## Single rows at 16 clients, every round", "",
                  "The main table's round, then the extra rounds (`--repeat`); each mlray round is followed by "
                  "the plain process's.", "", rounds_table(rounds)]
    parts += [
        "",
        "## Targets (issue 4)",
        "",
        targets_table(results, rounds),
    ]
    if serve_main is not None and "listeners" in serve_main:
        parts += ["", "## mlray's Serve cluster: checks", "", *checks_lines(serve_main), "",
                  "Listening sockets of the benchmark's own Ray cluster (its processes only):", "",
                  listeners_table(serve_main["listeners"])]
    if sweep:
        parts += ["", "## Serve settings (single-row requests, 16 clients)", "", sweep_table(sweep), "",
                  sweep_checks_table(sweep)]
        for trial in sweep:
            env = " ".join(f"{k}={v}" for k, v in trial["env"].items()) or "(none)"
            parts.append(f"\n- `{trial['name']}`: {env}")
    return "\n".join(parts) + "\n"
