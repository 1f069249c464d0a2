"""docs/grafana-dashboard.json and docs/prometheus-alerts.yml use only metrics the hub exports,
and the alert rules cover what an operator starts with: open breakers, backlog age, dead
letters, backend errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tether import Hub, HubConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"
METRIC = re.compile(r"\btether_[a-z0-9_]+\b")


def exported_names() -> set[str]:
    """Every sample name a hub's /metrics exposes (counters with _total, histogram parts)."""
    hub = Hub(HubConfig())
    text = generate_latest(hub.metrics.prometheus_registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def grafana_expressions() -> list[str]:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def test_alert_rules_use_only_exported_metrics() -> None:
    exported = exported_names()
    rules = alert_rules()
    used = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    assert used, "the rules use no tether metric"
    assert used - exported == set(), f"not exported: {sorted(used - exported)}"


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    exported = exported_names()
    exprs = grafana_expressions()
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert len(used) >= 15
    assert used - exported == set(), f"not exported: {sorted(used - exported)}"
    # the latency panel reads the histogram, not the per-process percentile gauges
    assert any(
        "histogram_quantile(0.5" in e and "tether_latency_seconds_bucket" in e for e in exprs
    )


def test_alert_rules_cover_the_starting_set_and_are_complete() -> None:
    rules = alert_rules()
    by_metric = {name: rule for rule in rules for name in METRIC.findall(rule["expr"])}
    for needed in (
        "tether_circuit_breaker_open",
        "tether_queue_oldest_pending_age_seconds",
        "tether_messages_dead_lettered_total",
        "tether_backend_errors",
    ):
        assert needed in by_metric, f"no alert on {needed}"
    for rule in rules:
        assert re.fullmatch(r"Tether[A-Za-z]+", rule["alert"])
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # a counter is alerted on through its increase, never its raw value
    assert (
        "increase(tether_messages_dead_lettered_total"
        in by_metric["tether_messages_dead_lettered_total"]["expr"]
    )
