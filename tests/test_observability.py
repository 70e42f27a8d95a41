"""The Grafana dashboard and the Prometheus alert rules against a live scrape (issue 4).

``promtool`` (Debian's ``prometheus`` package) checks the rules, the dashboard's PromQL and a
real ``/metrics`` body, and runs unit tests of the alerts; then every metric that a panel or
a rule queries must be in the scrape of a real sseproxy that relayed real streams. Without
promtool these tests fail: a missing checker must not pass as a green run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints
from servers import running, stream

from sseproxy.mockupstream import Scenario

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "sseproxy.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
CHAT = [{"role": "user", "content": "hi"}]


# --- promtool ---------------------------------------------------------------------------


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found on PATH: these tests need it to check the alert "
                    "rules, the dashboard queries and /metrics. Install Debian's `prometheus` "
                    "package (`apt-get install prometheus`); CI's .ci/run must install it too.",
                    pytrace=False)
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def said(proc: subprocess.CompletedProcess[str]) -> str:
    return f"promtool exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


# --- PromQL: which metrics does an expression read? -------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<variable>\$\{?\w+\}?|\[\[\w+\]\])
  | (?P<punct>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:])
""", re.VERBOSE)
_OPERATOR_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names read by ``expr``: no functions, keywords, label names, Grafana variables."""
    tokens: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        m = _TOKEN.match(expr, at)
        if m is None:
            raise ValueError(f"cannot tokenize PromQL at {expr[at:at + 20]!r} in {expr!r}")
        at = m.end()
        if m.lastgroup not in ("space", "string", "variable"):
            tokens.append((str(m.lastgroup), m.group()))
    names: set[str] = set()
    depth = 0  # inside {matchers} or [ranges]
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text in ("{", "["):
            depth += 1
        elif text in ("}", "]"):
            depth -= 1
        elif depth or kind != "ident" or text.lower() in _OPERATOR_WORDS:
            pass
        elif text.lower() in _LABEL_LISTS:
            if following == "(":
                while tokens[i][1] != ")":
                    i += 1
        elif following != "(" and following.lower() not in ("by", "without"):
            names.add(text)  # not a function or an aggregation: "sum(", "sum by ("
        i += 1
    return names


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with something PromQL can parse."""
    def value(m: re.Match[str]) -> str:
        return _GRAFANA_DURATIONS.get(m.group(1), ".*")
    return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", value, expr)


def variable_expr(query: str) -> str:
    """The PromQL inside a Prometheus template variable query (``label_values(expr, l)``)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\s*(?:query_result|metrics)\((.*)\)\s*", query, re.DOTALL)
    return m.group(1) if m else query


def test_promql_metrics_finds_metric_names_and_nothing_else() -> None:
    expr = ('sum by (le, side) (rate(foo_bucket{a="}b",c=~"$instance"}[$__rate_interval] '
            'offset 1h)) / on (job) group_left (x) bar_total > bool 0.5e3 and baz unless '
            "ignoring(a) max_over_time(qux[5m:1m]) or sum(x_total) without (inf) "
            '+ vector(1) * histogram_quantile(0.9, sum without (instance, le) (h_bucket))')
    assert promql_metrics(expr) == {"foo_bucket", "bar_total", "baz", "qux", "x_total",
                                    "h_bucket"}
    assert variable_expr("label_values(sseproxy_build_info, instance)") == "sseproxy_build_info"
    assert grafana_to_promql('rate(m{i=~"$instance"}[$__rate_interval])') == \
        'rate(m{i=~".*"}[5m])'


# --- the alert rules --------------------------------------------------------------------


def test_alert_rules_pass_promtool_check_rules() -> None:
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, said(proc)
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout, said(proc)


def test_every_alert_rule_has_for_severity_and_a_runbook() -> None:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert [g["name"] for g in doc["groups"]] == ["sseproxy"]
    rules = alert_rules()
    assert len(rules) >= 6
    for rule in rules:
        name = rule.get("alert")
        assert name and "record" not in rule, rule
        assert re.fullmatch(r"(\d+[smh])+", rule.get("for") or ""), f"{name}: no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert len(annotations["summary"]) > 20, name
        assert len(annotations["description"]) > 150, f"{name}: say what to check"
    by_name = {r["alert"]: r for r in rules}
    client = by_name["SseproxyClientSideStalls"]["annotations"]["description"]
    for advice in ("proxy_buffering off", "gzip", "X-Accel-Buffering"):
        assert advice in client
    assert "provider" in by_name["SseproxyUpstreamSideStalls"]["annotations"]["description"]


def _alert_tests(rules: list[dict[str, Any]], series: dict[str, str], eval_time: str,
                 firing: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    """A promtool test case: ``firing`` alerts with those labels, every other alert silent."""
    unknown = set(firing) - {r["alert"] for r in rules}
    assert not unknown, unknown
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [
            {"eval_time": eval_time, "alertname": r["alert"],
             "exp_alerts": [{"exp_labels": labels} for labels in firing.get(r["alert"], [])]}
            for r in rules],
    }


def _s(name: str, instance: str = "a:8080", **labels: str) -> str:
    matchers = {"job": "sseproxy", "instance": instance, **labels}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in matchers.items()) + "}"


def test_alert_rules_fire_when_and_only_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests, on a copy of the rules without annotations (promtool would
    compare the rendered annotation text too; the annotations are checked above)."""
    rules = alert_rules()
    plain = [{k: v for k, v in r.items() if k != "annotations"} for r in rules]
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps({"groups": [{"name": "sseproxy", "rules": plain}]}))
    job = {"job": "sseproxy"}
    a, b = "a:8080", "b:8080"
    stalled, active = "sseproxy_streams_stalled", "sseproxy_streams_active"
    ttft = "sseproxy_time_to_first_token_seconds_bucket"
    upstream = "sseproxy_upstream_requests_total"
    outcomes, reloads = "sseproxy_streams_total", "sseproxy_config_reloads_total"
    loop_lag = "sseproxy_event_loop_lag_seconds_bucket"
    healthy = {
        _s(active, a): "5x40", _s(active, b): "5x40",
        _s(stalled, a, side="client"): "0x40", _s(stalled, a, side="upstream"): "0x40",
        _s(stalled, b, side="client"): "0x40", _s(stalled, b, side="upstream"): "1x40",
        _s(outcomes, a, outcome="completed"): "0+3x40",
        _s(outcomes, b, outcome="completed"): "0+3x40",
        _s(ttft, a, le="1.0"): "0+10x40", _s(ttft, a, le="10.0"): "0+10x40",
        _s(ttft, a, le="+Inf"): "0+10x40",
        _s(upstream, a, status="2xx"): "0+99x40", _s(upstream, a, status="5xx"): "0+1x40",
        _s(reloads, a, result="ok"): "0x10 1x29", _s(reloads, a, result="error"): "0x40",
        _s(loop_lag, a, le="0.001"): "0+590x40", _s(loop_lag, a, le="0.1"): "0+600x40",
        _s(loop_lag, a, le="+Inf"): "0+600x40",
    }
    tests = [
        _alert_tests(rules, healthy, "35m", {}),
        # 6 of 20 active streams (over two processes) stalled on the client side
        _alert_tests(rules, {
            _s(active, a): "10x30", _s(active, b): "10x30",
            _s(stalled, a, side="client"): "6x30", _s(stalled, b, side="client"): "0x30",
            _s(stalled, a, side="upstream"): "0x30", _s(stalled, b, side="upstream"): "1x30",
        }, "10m", {"SseproxyClientSideStalls": [{**job, "side": "client",
                                                 "severity": "warning"}]}),
        _alert_tests(rules, {
            _s(active, a): "10x30", _s(active, b): "10x30",
            _s(stalled, a, side="upstream"): "8x30", _s(stalled, b, side="upstream"): "0x30",
            _s(stalled, a, side="client"): "1x30", _s(stalled, b, side="client"): "0x30",
        }, "10m", {"SseproxyUpstreamSideStalls": [{**job, "side": "upstream",
                                                   "severity": "warning"}]}),
        # nine in ten first tokens take 10-15 s, from two processes
        _alert_tests(rules, {
            _s(ttft, a, le="5.0"): "0+1x30", _s(ttft, a, le="10.0"): "0+1x30",
            _s(ttft, a, le="15.0"): "0+10x30", _s(ttft, a, le="+Inf"): "0+10x30",
            _s(ttft, b, le="5.0"): "0+1x30", _s(ttft, b, le="10.0"): "0+1x30",
            _s(ttft, b, le="15.0"): "0+10x30", _s(ttft, b, le="+Inf"): "0+10x30",
        }, "20m", {"SseproxyTimeToFirstTokenHigh": [{**job, "severity": "warning"}]}),
        # 10 % of upstream requests fail (429 on one process, 5xx on the other)
        _alert_tests(rules, {
            _s(upstream, a, status="2xx"): "0+45x30", _s(upstream, a, status="429"): "0+5x30",
            _s(upstream, b, status="2xx"): "0+45x30", _s(upstream, b, status="5xx"): "0+5x30",
            _s(upstream, b, status="timeout"): "0x30",
        }, "12m", {"SseproxyUpstreamErrorRatioHigh": [{**job, "severity": "critical"}]}),
        # process a has streams but completes none; b keeps completing
        _alert_tests(rules, {
            _s(active, a): "3x40", _s(active, b): "3x40",
            _s(outcomes, a, outcome="completed"): "100x40",
            _s(outcomes, a, outcome="upstream_error"): "0+4x40",
            _s(outcomes, b, outcome="completed"): "100+5x40",
        }, "30m", {"SseproxyNoStreamsCompleting": [{**job, "instance": a,
                                                    "severity": "critical"}]}),
        # one tick in twenty of process a runs 100-250 ms late; b's loop is fine (issue 13)
        _alert_tests(rules, {
            _s(loop_lag, a, le="0.001"): "0+500x30", _s(loop_lag, a, le="0.1"): "0+570x30",
            _s(loop_lag, a, le="0.25"): "0+600x30", _s(loop_lag, a, le="+Inf"): "0+600x30",
            _s(loop_lag, b, le="0.001"): "0+600x30", _s(loop_lag, b, le="0.1"): "0+600x30",
            _s(loop_lag, b, le="0.25"): "0+600x30", _s(loop_lag, b, le="+Inf"): "0+600x30",
        }, "12m", {"SseproxyEventLoopBlocked": [{**job, "instance": a,
                                                 "severity": "warning"}]}),
        # a reload of process a fails at 5m: firing soon after, cleared after 15m
        _alert_tests(rules, {
            _s(reloads, a, result="error"): "0x4 1x30", _s(reloads, b, result="error"): "0x35",
        }, "8m", {"SseproxyConfigReloadFailed": [{**job, "instance": a, "result": "error",
                                                  "severity": "warning"}]}),
        _alert_tests(rules, {
            _s(reloads, a, result="error"): "0x4 1x30",
        }, "25m", {}),
    ]
    test_file = tmp_path / "alerts_test.json"
    test_file.write_text(json.dumps({"rule_files": [str(rules_file)],
                                     "evaluation_interval": "1m", "tests": tests}))
    check = promtool("check", "rules", str(rules_file))
    assert check.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in check.stdout, \
        "the YAML reader of this test lost something: " + said(check)
    proc = promtool("test", "rules", str(test_file))
    assert proc.returncode == 0, said(proc)


# --- the dashboard ----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def dashboard_panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        out.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL as written) for every panel target and template variable query."""
    out = [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
           for p in dashboard_panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            query = query["query"] if isinstance(query, dict) else query
            out.append((f"variable {var['name']}", variable_expr(query)))
    return out


def test_dashboard_is_a_grafana_dashboard_with_described_panels() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["multi"] and instance["includeAll"]
    assert "label_values(sseproxy_build_info, instance)" in json.dumps(instance["query"])
    ids = [p["id"] for p in dash["panels"]]
    ids += [n["id"] for p in dash["panels"] for n in p.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = []
    for panel in dashboard_panels():
        titles.append(panel["title"])
        where = f"panel {panel['title']!r}"
        assert panel["type"] in ("timeseries", "stat"), where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert len(panel.get("description", "")) > 80, f"{where}: say how to read it"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            assert 'instance=~"$instance"' in target["expr"], f"{where}: {target['expr']}"
    assert len(titles) == len(set(titles)) >= 11
    stall_panels = [p for p in dashboard_panels() if "stall" in p["title"].lower()]
    assert len(stall_panels) == 2
    for panel in stall_panels:
        for advice in ('side="client"', 'side="upstream"', "proxy_buffering", "gzip"):
            assert advice in panel["description"], (panel["title"], advice)
    assert [p["type"] for p in dashboard_panels() if "reload" in p["title"].lower()] == ["stat"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query, given as a recording rule (Grafana variables replaced)."""
    exprs = dashboard_exprs()
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
             for i, (_where, expr) in enumerate(exprs)]
    rules_file = tmp_path / "dashboard_rules.json"
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = promtool("check", "rules", str(rules_file))
    assert proc.returncode == 0, said(proc) + "\n" + json.dumps(rules, indent=1)
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout, said(proc)


# --- a live scrape ----------------------------------------------------------------------


def sample_names(exposition: str) -> set[str]:
    names = set()
    for line in exposition.splitlines():
        m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        if m:
            names.add(m.group())
    return names


async def test_live_scrape_passes_promtool_and_has_every_queried_metric(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=5)
    async with running(scenario) as r:
        for _ in range(2):
            got = await stream("GET", r.url + "/v1/chat/stream?prompt=hi")
            assert got.status == 200 and got.events[-1].event == "done", got.raw
            got = await stream("POST", r.url + "/v1/chat/completions", json={
                "model": scenario.to_model(), "messages": CHAT, "stream": True})
            assert got.status == 200 and got.data()[-1] == "[DONE]", got.raw
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(r.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    body = response.text

    lint = promtool("check", "metrics", stdin=body)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), said(lint)

    scraped = sample_names(body)
    queried = [(where, expr) for where, expr in dashboard_exprs()]
    queried += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    missing = []
    for where, expr in queried:
        names = promql_metrics(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        missing += [f"{where}: {name}" for name in sorted(names - scraped)]
    assert not missing, ("queried but not in the scrape of /metrics:\n" + "\n".join(missing)
                         + "\n\nscraped: " + " ".join(sorted(scraped)))
