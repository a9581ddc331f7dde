"""deploy/prometheus/: the Prometheus rules load (``promtool check rules``),
their unit tests pass (``promtool test rules``), every alert is tested both
firing and quiet, and every chatd metric they use is one chatd/metrics.py
defines.

promtool comes with Debian's ``prometheus`` package (``.ci/run`` installs
it); without it the promtool tests are skipped, or fail under
``CHATD_REQUIRE_SERVICES=1`` as in CI."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from chatd.metrics import Metrics
from tests.helpers.servers import REPO
from tests.helpers.services import unavailable

RULES_DIR = REPO / "deploy" / "prometheus"
RULES = RULES_DIR / "chatd-rules.yml"
RULE_TESTS = RULES_DIR / "chatd-rules.test.yml"
METRICS_SOURCE = REPO / "chatd" / "metrics.py"

#: The alerts deploy/README.md lists, each with a test that it fires and one
#: that it stays quiet.
ALERTS = {
    "ChatdDown",
    "ChatdNotReady",
    "ChatdCommitLatencyHigh",
    "ChatdDeliveryLatencyHigh",
    "ChatdErrorRateHigh",
    "ChatdSlowConsumerClosesSpiking",
    "ChatdRedisDown",
    "ChatdBusGapReadsGrowing",
    "ChatdBusEventsDropped",
    "ChatdWebhooksPendingGrowing",
    "ChatdWebhooksGivenUp",
    "ChatdSearchBacklogStuck",
    "ChatdSqliteWalGrowing",
}

# The name passed first to Counter(...), Gauge(...) or Histogram(...).
_DEFINITION = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")
_EXPR = re.compile(r"^(\s*)(?:- )?expr:[ \t]*(.*)$")
_CHATD_NAME = re.compile(r"\bchatd_[a-zA-Z0-9_]+")
_BLOCK_SCALAR = re.compile(r"^[|>][+-]?$")


# --- metric names ------------------------------------------------------------


def defined_series(source: str) -> set[str]:
    """The series names the metrics in ``source`` (chatd/metrics.py) expose:
    a counter ``x`` (or ``x_total``) as ``x_total``, a histogram ``x`` as
    ``x_bucket``, ``x_sum`` and ``x_count``, a gauge as its name."""
    names: set[str] = set()
    for kind, name in _DEFINITION.findall(source):
        if kind == "Counter":
            names.add(name.removesuffix("_total") + "_total")
        elif kind == "Histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


def expressions(rules: str) -> list[str]:
    """The PromQL of every rule in a rules file: each ``expr:``, on its line
    or as a block scalar (``expr: |``) on the more indented lines below."""
    lines = rules.splitlines()
    found: list[str] = []
    for number, line in enumerate(lines):
        match = _EXPR.match(line)
        if match is None:
            continue
        indent, value = len(match.group(1)), match.group(2).strip()
        if _BLOCK_SCALAR.match(value):
            block: list[str] = []
            for following in lines[number + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = "\n".join(block)
        found.append(value)
    return found


def undefined_metric_names(rules: str, defined: set[str]) -> list[str]:
    """The ``chatd_*`` names the rules' expressions use that are not among
    ``defined`` (recording rules, ``chatd:...``, are not metric names)."""
    used = {name for expr in expressions(rules) for name in _CHATD_NAME.findall(expr)}
    return sorted(used - defined)


def test_every_chatd_metric_in_the_rules_is_defined() -> None:
    defined = defined_series(METRICS_SOURCE.read_text())
    rules = RULES.read_text()
    assert len(expressions(rules)) >= len(ALERTS) + 5  # every rule's expression was read
    assert undefined_metric_names(rules, defined) == []


def test_the_name_check_reports_misspelt_and_unexposed_names() -> None:
    defined = defined_series(METRICS_SOURCE.read_text())
    rules = """
groups:
  - name: wrong
    rules:
      - record: chatd:messages:rate1m
        expr: sum(rate(chatd_mesages_total[1m]))
      - alert: Wrong
        expr: |
          histogram_quantile(0.99, rate(chatd_store_commit_seconds[5m])) > 0.25
          and chatd_messages > 0
          and up{job="chatd"} == 0 and chatd_sqlite_wal_bytes > 0
"""
    # A typo, a histogram's bare name (not a series) and a counter without
    # _total are reported; the well-spelt names are not.
    assert undefined_metric_names(rules, defined) == [
        "chatd_mesages_total",
        "chatd_messages",
        "chatd_store_commit_seconds",
    ]


def test_the_parser_of_metrics_py_finds_every_metric() -> None:
    """The regex over chatd/metrics.py agrees with the registry it builds
    (chatd's own metrics: not the process_* of prometheus-client's collector)."""
    exposed: set[str] = set()
    for family in Metrics().registry.collect():
        if not family.name.startswith("chatd_"):
            continue
        if family.type == "counter":
            exposed.add(family.name + "_total")
        elif family.type == "histogram":
            exposed.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            exposed.add(family.name)
    assert defined_series(METRICS_SOURCE.read_text()) == exposed


# --- alerts and their tests ----------------------------------------------------


def alert_blocks(rules: str) -> dict[str, str]:
    """Each alerting rule's text, by name (from its ``- alert:`` line to the
    next rule)."""
    parts = re.split(r"^\s*- (?=alert:|record:)", rules, flags=re.MULTILINE)
    blocks: dict[str, str] = {}
    for part in parts:
        match = re.match(r"alert:\s*(\w+)", part)
        if match is not None:
            blocks[match.group(1)] = part
    return blocks


def outcomes_tested(tests: str) -> dict[str, set[str]]:
    """For each alert name in a promtool test file, whether some
    ``alert_rule_test`` expects it to fire and some expects it quiet."""
    outcomes: dict[str, set[str]] = {}
    for name, empty in re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", tests):
        outcomes.setdefault(name, set()).add("quiet" if empty else "fires")
    return outcomes


def test_every_alert_has_a_duration_severity_summary_and_description() -> None:
    blocks = alert_blocks(RULES.read_text())
    assert set(blocks) == ALERTS
    for name, block in blocks.items():
        for key in ("for:", "severity:", "summary:", "description:"):
            assert re.search(rf"^\s*{key}", block, re.MULTILINE), f"{name} has no {key}"
        assert re.search(r"severity: (critical|warning)$", block, re.MULTILINE), name


def test_every_alert_is_tested_firing_and_quiet() -> None:
    outcomes = outcomes_tested(RULE_TESTS.read_text())
    assert outcomes == {name: {"fires", "quiet"} for name in ALERTS}


# --- promtool ----------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool is not installed (apt install prometheus)")
    assert found is not None
    return found


def run_promtool(promtool: str, *args: str) -> None:
    done = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"promtool {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )


def test_promtool_checks_the_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", str(RULES.relative_to(REPO)))


def test_promtool_runs_the_rules_unit_tests(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", str(RULE_TESTS.relative_to(REPO)))
