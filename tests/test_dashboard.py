"""deploy/grafana/chatd.json: a Grafana dashboard whose every query names
only metrics chatd exports.

The dashboard is read as Grafana's JSON model (rows, panels, the
``datasource`` and ``instance`` variables), and every PromQL expression is
taken apart by a small reader: functions, aggregations, grouping labels and
keywords are known words, everything else is a metric selector, which must be
a ``chatd_`` name filtered by ``instance=~"$instance"``. Those names are then
looked up in what real servers serve on ``/metrics`` after a little traffic:
one node alone on SQLite, and the nodes of a cluster on PostgreSQL and Redis
(skipped when those cannot start, required under CHATD_REQUIRE_SERVICES=1).

chatd/metrics.py registers every family in every mode (the bus figures are 0
on a node alone, the SQLite ones 0 on PostgreSQL), so each mode must export
every name the dashboard uses. A labelled family has no sample until a child
exists, so the names come from the samples and from the ``# TYPE`` lines
(a histogram ``h`` offers ``h_bucket``, ``h_sum``, ``h_count``; a counter
``c_total``). Counters and histograms must be read through ``rate()`` or
``increase()``, gauges never. Wrong names and wrong uses are shown to be
caught, on the same scrape.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatd.config import Config
from chatd.metrics import Metrics
from tests.helpers.clients import Client, connect, next_of
from tests.helpers.cluster import connect_to, running_cluster
from tests.helpers.http_client import http_request
from tests.helpers.servers import REPO, running

pytestmark = pytest.mark.usefixtures("collect_garbage")

DASHBOARD = REPO / "deploy" / "grafana" / "chatd.json"
ROWS = ("Connections", "Messages", "Storage", "Errors & limits", "Cluster", "Product features")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
INSTANCE_QUERY = "label_values(chatd_connections, instance)"
PANEL_TYPES = frozenset({"timeseries", "stat"})
WAIT = 10.0


# --- the dashboard ------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels a collapsed row holds."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every target of every panel, and the ``instance``
    variable's query."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text)
            assert found is not None, text
            # The variable's metric, as a selector the checks below read.
            yield f"variable {var['name']!r}", f'{found[1]}{{instance=~"$instance"}}'


def with_expr(dashboard: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A copy of the dashboard with ``old`` replaced by ``new`` in the first
    expression that has it."""
    broken = copy.deepcopy(dashboard)
    for panel in all_panels(broken):
        for target in panel.get("targets", []):
            if old in target["expr"]:
                target["expr"] = target["expr"].replace(old, new, 1)
                return broken
    raise AssertionError(f"no expression has {old!r}")


# --- PromQL, read just enough ----------------------------------------------------------

#: Functions that take a range vector; counters and histograms only go into
#: the first three, gauges only into the others.
COUNTER_FUNCTIONS = frozenset({"rate", "increase", "irate"})
RANGE_FUNCTIONS = COUNTER_FUNCTIONS | frozenset(
    {
        "delta",
        "idelta",
        "deriv",
        "changes",
        "resets",
        "predict_linear",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "count_over_time",
        "last_over_time",
        "quantile_over_time",
        "stddev_over_time",
        "stdvar_over_time",
        "present_over_time",
        "absent_over_time",
    }
)
FUNCTIONS = RANGE_FUNCTIONS | frozenset(
    {
        "abs",
        "absent",
        "ceil",
        "clamp",
        "clamp_max",
        "clamp_min",
        "exp",
        "floor",
        "histogram_quantile",
        "label_join",
        "label_replace",
        "ln",
        "log10",
        "log2",
        "round",
        "scalar",
        "sgn",
        "sort",
        "sort_desc",
        "sqrt",
        "time",
        "timestamp",
        "vector",
    }
)
AGGREGATIONS = frozenset(
    {
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
)
#: Words followed by a parenthesised list of label names.
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<matchers>\{(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^}"'])*\})
    | (?P<range>\[[^\]]*\])
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
    | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>(),@])
    """,
    re.VERBOSE,
)


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        found = _TOKEN.match(expr, pos)
        if found is None:
            raise ValueError(f"cannot read {expr[pos:]!r} in {expr!r}")
        kind = found.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, found[0]))
        pos = found.end()
    return out


@dataclass(frozen=True)
class Selector:
    """One metric selector: ``name{matchers}[range]``, and the function it
    is an argument of (None: none, or grouping parentheses)."""

    name: str
    matchers: str
    ranged: bool
    function: str | None


def selectors(expr: str) -> list[Selector]:
    """Every metric selector of ``expr``. Anything that is not a known
    function, aggregation, keyword or label list is a metric name; a word
    this reader does not know, before ``(``, is an error."""
    toks = tokens(expr)
    found: list[Selector] = []
    calls: list[str | None] = []  # what each open parenthesis belongs to
    pending: str | None = None  # an aggregation whose ``(`` comes after ``by (...)``
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind == "ident":
            if text in GROUPING:
                if following != ("op", "("):
                    if text in ("group_left", "group_right"):  # their list is optional
                        i += 1
                        continue
                    raise ValueError(f"{text} without its label list in {expr!r}")
                end = toks.index(("op", ")"), i)
                labels = toks[i + 2 : end]
                if any(k != "ident" and t != "," for k, t in labels):
                    raise ValueError(f"not a label list after {text} in {expr!r}")
                i = end + 1
                continue
            if text in KEYWORDS:
                i += 1
                continue
            if following == ("op", "("):
                if text not in FUNCTIONS | AGGREGATIONS:
                    raise ValueError(f"unknown function {text}() in {expr!r}")
                calls.append(text)
                i += 2
                continue
            if text in AGGREGATIONS:
                pending = text
                i += 1
                continue
            matchers, ranged, i = "", False, i + 1
            if i < len(toks) and toks[i][0] == "matchers":
                matchers = toks[i][1][1:-1]
                i += 1
            if i < len(toks) and toks[i][0] == "range":
                ranged = True
                i += 1
            found.append(Selector(text, matchers, ranged, calls[-1] if calls else None))
            continue
        if kind == "matchers":
            raise ValueError(f"a selector without a metric name in {expr!r}")
        if kind == "range":
            raise ValueError(f"a range not after a selector (a subquery?) in {expr!r}")
        if (kind, text) == ("op", "("):
            calls.append(pending)
            pending = None
        elif (kind, text) == ("op", ")"):
            calls.pop()
        i += 1
    if calls:
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    return found


_BY_INSTANCE = re.compile(r'(?:^|,)\s*instance\s*=~\s*"\$instance"\s*(?:,|$)')


def query_problems(where: str, expr: str) -> list[str]:
    """What is wrong with one expression on its own."""
    try:
        found = selectors(expr)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    problems = []
    if not found:
        problems.append(f"{where}: no metric in {expr!r}")
    for sel in found:
        if not re.fullmatch(r"chatd_[a-z0-9_]+", sel.name):
            problems.append(f"{where}: {sel.name!r} is not a chatd metric")
        if not _BY_INSTANCE.search(sel.matchers):
            problems.append(f'{where}: {sel.name} is not filtered by instance=~"$instance"')
        if sel.ranged != (sel.function in RANGE_FUNCTIONS):
            problems.append(f"{where}: {sel.name} ranged={sel.ranged} under {sel.function}()")
        if sel.name.endswith("_bucket") and not re.search(
            r"histogram_quantile\(\s*[0-9.]+\s*,\s*sum by \(le, instance\b", expr
        ):
            problems.append(
                f"{where}: {sel.name} outside histogram_quantile(q, sum by (le, instance"
            )
    return problems


# --- what /metrics offers ---------------------------------------------------------------


def _series_of(name: str, kind: str) -> list[str]:
    if kind == "counter":
        return [name if name.endswith("_total") else f"{name}_total"]
    if kind == "histogram":
        return [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
    if kind == "summary":
        return [name, f"{name}_sum", f"{name}_count"]
    return [name]


def exported_series(text: str) -> dict[str, str]:
    """Series name -> its family's type, for every series the exposition
    has samples of or declares (``# TYPE``: a labelled family without a
    child yet has no sample)."""
    series: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series[sample.name] = family.type
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            for one in _series_of(name, kind):
                series.setdefault(one, kind)
    return series


def sample_total(text: str, name: str) -> float:
    """The sum of every sample named ``name`` (all labels)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def problems(dashboard: dict[str, Any], exported: dict[str, str]) -> list[str]:
    """Every metric the dashboard names that ``exported`` lacks, or reads
    the wrong way for its type."""
    out = []
    for where, expr in queries(dashboard):
        for sel in selectors(expr):
            kind = exported.get(sel.name)
            if kind is None:
                out.append(f"{where}: {sel.name} is not exported")
            elif kind in ("counter", "histogram") and sel.function not in COUNTER_FUNCTIONS:
                out.append(f"{where}: {sel.name} ({kind}) not under rate() or increase()")
            elif kind == "gauge" and sel.function in COUNTER_FUNCTIONS:
                out.append(f"{where}: {sel.name} (gauge) under {sel.function}()")
    return out


def assert_exported(dashboard: dict[str, Any], exported: dict[str, str]) -> None:
    found = problems(dashboard, exported)
    assert not found, "\n".join(found)


def assert_mistakes_are_caught(dashboard: dict[str, Any], exported: dict[str, str]) -> None:
    """The check bites: copies of the dashboard with a wrong name, or a
    right name read the wrong way, each fail it on the same scrape."""
    mistakes = [
        # misspelt
        ("chatd_connections{", "chatd_conections{", "chatd_conections is not exported"),
        # a counter without its _total
        ("chatd_messages_total{", "chatd_messages{", "chatd_messages is not exported"),
        # a histogram's own name is no series
        ("chatd_search_seconds_bucket{", "chatd_search_seconds{", "chatd_search_seconds is not"),
        # a counter read as a gauge
        (
            'sum by (instance) (rate(chatd_auth_failures_total{instance=~"$instance"}'
            "[$__rate_interval]))",
            'sum by (instance) (chatd_auth_failures_total{instance=~"$instance"})',
            "chatd_auth_failures_total (counter) not under rate()",
        ),
        # a gauge read as a counter
        (
            'chatd_webhooks_pending{instance=~"$instance"}',
            'rate(chatd_webhooks_pending{instance=~"$instance"}[$__rate_interval])',
            "chatd_webhooks_pending (gauge) under rate()",
        ),
    ]
    for old, new, expected in mistakes:
        found = problems(with_expr(dashboard, old, new), exported)
        assert any(expected in problem for problem in found), (new, found)


# === 1. the JSON model ==================================================================


def test_the_dashboard_is_grafana_json_with_its_variables() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["title"] == "chatd" and dashboard["uid"]
    assert [i["pluginId"] for i in dashboard["__inputs"]] == ["prometheus"]

    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["datasource"] == DATASOURCE
    query = instance["query"]
    assert (query["query"] if isinstance(query, dict) else query) == INSTANCE_QUERY
    assert instance["multi"] is True and instance["includeAll"] is True

    panels = list(all_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    assert tuple(rows) == ROWS
    assert dashboard["panels"][0]["type"] == "row"

    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["title"].strip(), panel["id"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        xs, ys = range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not mine & cells, f"{panel['title']!r} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


# === 2. the queries on their own ===========================================================


def test_every_query_reads_chatd_metrics_filtered_by_instance() -> None:
    found = [p for where, expr in queries(load_dashboard()) for p in query_problems(where, expr)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.99, sum by (le, instance) (rate(chatd_a_bucket"
            '{instance=~"$instance", le!="+Inf"}[$__rate_interval])))',
            ["chatd_a_bucket"],
        ),
        (
            'sum by (instance) (rate(chatd_b_total{instance=~"$instance"}[5m] offset 1h))'
            " / on (instance) group_left"
            ' sum without (mode) (chatd_c{instance=~"$instance"})',
            ["chatd_b_total", "chatd_c"],
        ),
        ('60 * max(chatd_d{instance=~"$instance"}) > bool 1e3', ["chatd_d"]),
    ],
)
def test_the_reader_finds_every_metric(expr: str, names: list[str]) -> None:
    assert [sel.name for sel in selectors(expr)] == names
    assert query_problems("t", expr) == []


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum(up{instance=~"$instance"})', "'up' is not a chatd metric"),
        ('sum(process_open_fds{instance=~"$instance"})', "is not a chatd metric"),
        ("sum(chatd_connections)", 'not filtered by instance=~"$instance"'),
        ('chatd_connections{instance="$instance"}', "not filtered by"),
        ('sum(chatd_connections{job="chatd"})', "not filtered by"),
        ('rated(chatd_messages_total{instance=~"$instance"}[1m])', "unknown function rated()"),
        ('{__name__="chatd_connections", instance=~"$instance"}', "without a metric name"),
        ('sum(chatd_messages_total{instance=~"$instance"}[1m])', "ranged=True under sum()"),
        ('rate(chatd_messages_total{instance=~"$instance"})', "ranged=False under rate()"),
        (
            'histogram_quantile(0.5, rate(chatd_search_seconds_bucket{instance=~"$instance"}[1m]))',
            "outside histogram_quantile",
        ),
        ('sum(rate(chatd_messages_total{instance=~"$instance"}[1m])', "unbalanced"),
        ('sum(chatd_connections{instance=~"$instance"}) $x', "cannot read"),
    ],
)
def test_the_reader_refuses_what_a_dashboard_must_not_have(expr: str, expected: str) -> None:
    found = query_problems("t", expr)
    assert any(expected in problem for problem in found), found


def test_every_dashboard_metric_is_one_chatd_defines() -> None:
    """Against chatd/metrics.py's registry itself, before anything runs."""
    dashboard = load_dashboard()
    exported = exported_series(Metrics().exposition().decode())
    assert_exported(dashboard, exported)
    assert_mistakes_are_caught(dashboard, exported)


# === 3. what running servers export ==========================================================


async def scrape(port: int) -> str:
    reply = await http_request(port, "GET", "/metrics")
    assert reply.status == 200, reply
    return reply.body.decode("utf-8")


async def a_little_traffic(alice: Client, bob: Client) -> None:
    """Both join general, alice says something, bob gets it, bob sends a
    frame that is no JSON (an error frame), alice searches."""
    await alice.join("general")
    await bob.join("general")
    await alice.send("room_message", {"room": "general", "content": "hello there"}, "m")
    assert (await next_of(alice, "room_message", WAIT))["request_id"] == "m"
    assert (await next_of(bob, "room_message", WAIT))["data"]["content"] == "hello there"
    await bob.send_raw("{not json")
    assert (await next_of(bob, "error", WAIT))["data"]["code"] == "INVALID_FORMAT"
    await alice.send("search", {"query": "hello"}, "s")
    assert (await next_of(alice, "search_results", WAIT))["request_id"] == "s"


async def test_a_single_sqlite_node_exports_every_dashboard_metric(
    make_config: Callable[..., Config],
) -> None:
    dashboard = load_dashboard()
    async with running(make_config()) as srv:
        async with connect(srv, 1, "alice") as alice, connect(srv, 2, "bob") as bob:
            await a_little_traffic(alice, bob)
        text = await scrape(srv.port)
    exported = exported_series(text)
    assert sample_total(text, "chatd_messages_total") == 1
    assert sample_total(text, "chatd_errors_total") == 1
    assert_exported(dashboard, exported)
    assert_mistakes_are_caught(dashboard, exported)


async def test_a_cluster_node_exports_every_dashboard_metric(
    make_config: Callable[..., Config], pg_dsn: str, redis: Any, redis_prefix: str
) -> None:
    dashboard = load_dashboard()
    async with running_cluster(make_config, pg_dsn, redis.url, redis_prefix, 2) as cluster:
        async with (
            connect_to(cluster[0], 1, "alice") as alice,
            connect_to(cluster[1], 2, "bob") as bob,
        ):
            await a_little_traffic(alice, bob)
        texts = [await scrape(node.port) for node in cluster.nodes]
    assert [sample_total(text, "chatd_bus_redis_up") for text in texts] == [1, 1]
    # alice's message went over the bus from node 0 to node 1.
    assert sample_total(texts[0], "chatd_bus_events_sent_total") >= 1
    assert sample_total(texts[1], "chatd_bus_events_received_total") >= 1
    for text in texts:
        exported = exported_series(text)
        assert_exported(dashboard, exported)
        assert_mistakes_are_caught(dashboard, exported)
