"""The Grafana dashboard in the repo only plots metrics the replicas really export."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "mlray-serving.json"


def test_dashboard_queries_name_exported_metrics():
    metrics_source = (Path(__file__).resolve().parents[2] / "mlray" / "serving" / "metrics.py").read_text()
    exported = set(re.findall(r'"(mlray_[a-z_]+)"', metrics_source))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_(mlray_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\{", e)}
    assert used and used <= exported, used - exported
    assert exported <= used, exported - used  # every metric has a panel
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
