"""The alerting rules (``deploy/prometheus/alerts.yml``): promtool accepts them and the example
configuration, its unit tests (``alerts.test.yml``) pass, every alert has a test where it fires
and one where it stays silent, and every metric the rules read is one the code exports.

promtool comes from Debian's ``prometheus`` package (``.ci/run`` installs it); without it
these tests skip, which CI turns into a failure (``tests/conftest.py``).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

from logging_sidecar.metrics import SidecarMetrics
from monitoring.metrics import MetricsView, MonitorCollector
from serving import metrics as serving_metrics
from tests.helpers import REPO

RULES_DIR = REPO / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
UNIT_TESTS = RULES_DIR / "alerts.test.yml"
CONFIG = RULES_DIR / "prometheus.yml"
# Series Prometheus makes itself for every scrape target, which no code exports.
PROMETHEUS_OWN = {"up"}
PROMQL_WORDS = {"and", "or", "unless", "on", "ignoring", "by", "without", "group_left", "group_right", "bool"}
AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:  # a failure under CI
        pytest.skip("promtool not installed (apt-get install --no-install-recommends prometheus)")
    return found


def run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules_and_the_example_configuration(promtool):
    for command in (("check", "rules", RULES.name), ("check", "config", CONFIG.name)):
        result = run(promtool, *command)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_pass_their_promtool_unit_tests(promtool):
    result = run(promtool, "test", "rules", UNIT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def alerts() -> dict[str, str]:
    document = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in document["groups"] for rule in group["rules"]}


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_does_not():
    fires, silent = set(), set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = set(alerts())
    assert names - fires == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"
    assert (fires | silent) - names == set(), "tests of alerts that do not exist"


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: what is left once strings, label matchers and
    lists, ranges, numbers, functions (a name before ``(``) and PromQL's words are removed."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(on|ignoring|by|without|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group() in PROMQL_WORDS | AGGREGATIONS:
            continue
        names.add(match.group())
    return names


def test_metric_names_are_found_in_expressions():
    expr = (
        'increase(a_total[10m]) > 0 or delta(b{job="x"}[5m]) > 0 and on (model, version) c == 0 '
        "unless on (instance) (max by (instance) (d) == 1) - on (model) group_left e"
    )
    assert metric_names(expr) == {"a_total", "b", "c", "d", "e"}


def exported(registry) -> set[str]:
    """The sample names a registry's metrics expose (a counter ``x`` as ``x_total``, ...)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def test_every_metric_the_rules_read_is_one_the_code_exports():
    serving_metrics._metrics()  # serving's metrics live in the default registry
    monitor = CollectorRegistry()
    monitor.register(
        MonitorCollector("credit-risk", lambda: MetricsView(None, None, False, None, 0, 900, 0.05))
    )
    known = exported(REGISTRY) | exported(SidecarMetrics().registry) | exported(monitor) | PROMETHEUS_OWN
    used = {name: metric_names(expr) for name, expr in alerts().items()}
    unknown = {alert: sorted(names - known) for alert, names in used.items() if names - known}
    assert not unknown, f"rules read metrics no code exports: {unknown}"
    assert all(used.values()), "a rule reads no metric"
