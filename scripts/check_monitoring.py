#!/usr/bin/env python3
"""Checks ops/monitoring/ against what the binaries export (standard library only).

Subcommands (scripts/check-monitoring.sh runs them; tests/tests/monitoring.rs
runs `names` on the scrapes of the whole distributed stack):

  lint OUT.json
      Checks the dashboard's structure (importable JSON, schemaVersion, the
      DS_PROMETHEUS data source variable, the `model` variable, unique panel
      ids, every query on that data source) and writes every dashboard query,
      with Grafana's variables replaced, as a Prometheus rule file (JSON is
      YAML) so that `promtool check rules OUT.json` parses each one with
      Prometheus's own PromQL parser.

  names --scrapes DIR [--without-kafka]
      Checks that every metric name used by the dashboard (queries and
      variables) and by the alert rules is exported by the binaries, and
      that every label a selector matches on exists on that metric. DIR holds
      /metrics texts (any file names), scraped from the real binaries after
      some traffic. A name passes if:
        1. a scrape has it (for a histogram, `_bucket`, `_sum` and `_count`
           series, which only a histogram renders; a summary renders
           quantiles instead and its `_bucket` fails), or
        2. it is `up` (written by Prometheus itself, not by a target), or
        3. it is listed in ops/monitoring/unscraped-metrics.txt AND the Rust
           source registers it (a `counter!`/`gauge!`/`histogram!` of that
           name in a production crate; `_bucket`/`_sum`/`_count` only for a
           `histogram!`). The list's categories:
             event  a metric the exporter renders only after the event it
                    counts happened once (a failure, a refusal, a reload):
                    the metrics crate registers lazily and the binaries do
                    not describe metrics up front, so a healthy run lacks it;
             kafka  a metric only `kfc` or `embark serve --kafka-brokers`
                    exports: accepted from the source only with
                    --without-kafka (a scrape set without a Kafka broker);
                    otherwise it must be scraped like any other.
      Labels are checked against the scraped series of the metric, or for a
      name accepted from the source, against the labels its macro call
      passes; `job` and `instance` (target labels Prometheus adds) and `le`
      (histogram buckets) are always allowed.
      Every entry of the list must name a metric the source registers, so
      the list cannot go stale after a rename.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "ops" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "embark.json"
RULES = MONITORING / "prometheus" / "embark-alerts.yml"
UNSCRAPED = MONITORING / "unscraped-metrics.txt"
# The production crates: where the binaries' metrics are registered.
SOURCE_DIRS = ["embark", "kfc", "retina", "queue", "store", "ops", "index", "proto"]
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Written by Prometheus for every target, not by the target.
PROMETHEUS_SERIES = {"up"}
# Labels Prometheus attaches to every scraped series (target labels).
TARGET_LABELS = {"job", "instance"}

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = LIST_KEYWORDS | {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        if message not in self.items:
            self.items.append(message)

    def exit(self, what: str) -> None:
        if self.items:
            for m in self.items:
                print(f"FAIL: {m}", file=sys.stderr)
            print(f"{what}: {len(self.items)} problem(s)", file=sys.stderr)
            sys.exit(1)


# --------------------------------------------------------------------------
# PromQL: metric names and the labels their selectors match on


def grafana_to_promql(expr: str, regex_value: str = ".*") -> str:
    """Replaces Grafana's variables: intervals by 5m, others by a regex."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?", "5m", expr)
    expr = re.sub(r"\$__\w+", "5m", expr)
    return re.sub(r"\$\{(\w+)(:\w+)?\}|\$(\w+)", regex_value, expr)


def _skip_string(s: str, i: int) -> int:
    quote = s[i]
    i += 1
    while i < len(s):
        if s[i] == "\\" and quote != "`":
            i += 2
            continue
        if s[i] == quote:
            return i + 1
        i += 1
    raise ValueError("unterminated string")


def _skip_parens(s: str, i: int) -> int:
    """`s[i]` is '(': the index after its matching ')'."""
    depth = 0
    while i < len(s):
        c = s[i]
        if c in "\"'`":
            i = _skip_string(s, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced parentheses")


def _matchers(s: str, i: int) -> tuple[list[tuple[str, str, str]], int]:
    """`s[i]` is '{': the (label, op, value) matchers and the index after '}'."""
    out = []
    i += 1
    while i < len(s):
        while i < len(s) and s[i] in " \t\n,":
            i += 1
        if i < len(s) and s[i] == "}":
            return out, i + 1
        m = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*").match(s, i)
        if not m:
            raise ValueError(f"bad label matcher at {s[i:i + 30]!r}")
        i = m.end()
        if i >= len(s) or s[i] not in "\"'`":
            raise ValueError(f"label {m.group(1)}: value is not a string")
        end = _skip_string(s, i)
        out.append((m.group(1), m.group(2), s[i + 1:end - 1]))
        i = end
    raise ValueError("unterminated label matchers")


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """The metric selectors of a PromQL expression: (name, matched labels)."""
    s = grafana_to_promql(expr)
    out: list[tuple[str, list[str]]] = []
    i = 0
    ident = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
    number = re.compile(r"(0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?)([smhdwy]|ms)?([0-9]+([smhdwy]|ms))*")

    def next_char(j: int) -> tuple[str, int]:
        while j < len(s) and s[j].isspace():
            j += 1
        return (s[j] if j < len(s) else ""), j

    while i < len(s):
        c = s[i]
        if c in "\"'`":
            i = _skip_string(s, i)
        elif c == "#":
            j = s.find("\n", i)
            i = len(s) if j < 0 else j
        elif c == "[":
            j = s.find("]", i)
            if j < 0:
                raise ValueError("unterminated range")
            i = j + 1
        elif c == "{":
            found, i = _matchers(s, i)
            names = [v for (label, op, v) in found if label == "__name__" and op == "="]
            if not names:
                raise ValueError("a selector without a metric name: name it so it can be checked")
            out.append((names[0], [label for (label, _, _) in found if label != "__name__"]))
        elif c.isdigit() or (c == "." and i + 1 < len(s) and s[i + 1].isdigit()):
            m = number.match(s, i)
            i = m.end() if m and m.end() > i else i + 1
        elif ident.match(s, i):
            m = ident.match(s, i)
            name = m.group(0)
            i = m.end()
            nc, j = next_char(i)
            low = name.lower()
            if low in LIST_KEYWORDS and nc == "(":
                i = _skip_parens(s, j)
            elif nc == "(":
                pass  # a function or an aggregation: its arguments follow
            elif low in KEYWORDS or (low in AGGREGATIONS and s[j:j + 2] in ("by", "wi")):
                pass
            else:
                labels: list[str] = []
                if nc == "{":
                    found, i = _matchers(s, j)
                    labels = [label for (label, _, _) in found]
                out.append((name, labels))
        else:
            i += 1
    return out


def label_values_query(query: str) -> list[tuple[str, list[str]]]:
    """Metric selectors of a Grafana Prometheus variable query."""
    q = query.strip()
    m = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)", q, re.S)
    if m:
        return [(name, labels + [m.group(2)]) for name, labels in selectors(m.group(1))]
    m = re.fullmatch(r"(query_result|metrics)\((.*)\)", q, re.S)
    if m and m.group(1) == "query_result":
        return selectors(m.group(2))
    if re.fullmatch(r"label_values\(\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)", q) or m:
        return []
    raise ValueError(f"variable query not understood: {query!r}")


# --------------------------------------------------------------------------
# The dashboard and the rules


def dashboard_panels(panels: list) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(dashboard_panels(p.get("panels") or []))
    return out


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, expression) of every query of the dashboard."""
    out = []
    for p in dashboard_panels(dash.get("panels", [])):
        for t in p.get("targets") or []:
            if t.get("expr"):
                out.append((f"panel {p.get('id')} {p.get('title')!r} query {t.get('refId')}", t["expr"]))
    return out


def variable_queries(dash: dict) -> list[tuple[str, str]]:
    out = []
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query", "")
        out.append((f"variable ${v.get('name')}", q or v.get("definition", "")))
    return out


def rule_exprs(path: Path) -> list[tuple[str, str]]:
    """(alert or record name, expr) from a rule file, by a small reader of
    the YAML this file uses: `expr:` inline or as a block scalar."""
    lines = path.read_text().splitlines()
    out: list[tuple[str, str]] = []
    names = 0
    current = "?"
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)(?:- )?(alert|record):\s*(.+?)\s*$", line)
        if m:
            names += 1
            current = m.group(3).strip("'\"")
        m = re.match(r"^(\s*)(?:- )?expr:\s*(.*?)\s*$", line)
        if not m:
            i += 1
            continue
        indent = len(m.group(1)) + (2 if line.lstrip().startswith("- ") else 0)
        value = m.group(2)
        if value in ("|", "|-", "|+", ">", ">-", ">+"):
            block = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            out.append((current, "\n".join(block).strip()))
            continue
        if value[:1] in "'\"":
            value = value[1:-1] if value[0] == "'" else json.loads(value)
        out.append((current, value))
        i += 1
    if names != len(out):
        raise ValueError(f"{path}: {names} alert/record entries but {len(out)} expr: the reader lost some")
    return out


# --------------------------------------------------------------------------
# What the binaries export: scrapes and source


def parse_scrape(text: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Sample names with their label names, and the TYPE of each family."""
    series: dict[str, set[str]] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+", line)
        if not m:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
        series.setdefault(m.group(1), set()).update(labels)
    return series, types


def source_metrics() -> dict[str, tuple[str, set[str]]]:
    """Metric name -> (counter|gauge|histogram, label names) registered in
    the production crates' Rust source."""
    found: dict[str, tuple[str, set[str]]] = {}
    macro = re.compile(r"\b(counter|gauge|histogram)!\s*\(")
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*.rs")):
            text = path.read_text()
            for m in macro.finditer(text):
                start = m.end() - 1
                try:
                    args = text[start + 1:_skip_parens(text, start) - 1]
                except ValueError:
                    continue
                labels = set(re.findall(r'"([a-zA-Z_][a-zA-Z0-9_]*)"\s*=>', args))
                first = args.strip()
                lit = re.match(r'"([a-zA-Z_:][a-zA-Z0-9_:]*)"', first)
                if lit:
                    names = [lit.group(1)]
                else:
                    # `counter!(name)` with `let name = if .. { "a" } else { "b" }`:
                    # the metric-like literals the file assigns to that name.
                    var = re.match(r"([a-z_][a-z0-9_]*)", first)
                    if not var:
                        continue
                    names = []
                    for a in re.finditer(rf"let\s+{var.group(1)}\s*=([^;]*);", text, re.S):
                        names += re.findall(r'"([a-z][a-z0-9_]*_(?:total|seconds|bytes))"', a.group(1))
                for name in names:
                    kind, old = found.get(name, (m.group(1), set()))
                    found[name] = (kind, old | labels)
    return found


def read_unscraped(path: Path, fails: Failures) -> dict[str, str]:
    out = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("event", "kafka"):
            fails.add(f"{path.name}:{n}: expected `NAME event|kafka  # why`, got {raw!r}")
            continue
        out[parts[0]] = parts[1]
    return out


# --------------------------------------------------------------------------
# Subcommands


def cmd_lint(args: argparse.Namespace) -> None:
    fails = Failures()
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        print(f"FAIL: {DASHBOARD}: not JSON: {e}", file=sys.stderr)
        sys.exit(1)
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        fails.add(f"schemaVersion {dash.get('schemaVersion')!r}: want 36 or later (Grafana 9+)")
    for key in ("uid", "title"):
        if not dash.get(key):
            fails.add(f"the dashboard has no {key}")
    if dash.get("id") is not None:
        fails.add("`id` must be null in an exported dashboard (Grafana assigns it on import)")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fails.add("no data source variable DS_PROMETHEUS of type datasource (query prometheus)")
    if "model" not in variables or variables["model"].get("type") != "query":
        fails.add("no query variable `model`")
    want_ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = set()
    panels = dashboard_panels(dash.get("panels", []))
    for p in panels:
        pid = p.get("id")
        if pid in ids:
            fails.add(f"panel id {pid} is used twice")
        ids.add(pid)
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")) or g.get("x", 0) + g.get("w", 0) > 24:
            fails.add(f"panel {pid} {p.get('title')!r}: bad gridPos {g}")
        if p.get("type") == "row":
            continue
        if p.get("datasource") != want_ds:
            fails.add(f"panel {pid} {p.get('title')!r}: datasource {p.get('datasource')} is not {want_ds}")
        if not p.get("targets"):
            fails.add(f"panel {pid} {p.get('title')!r}: no query")
        refs = [t.get("refId") for t in p.get("targets") or []]
        if len(refs) != len(set(refs)):
            fails.add(f"panel {pid} {p.get('title')!r}: refIds repeat: {refs}")
        for t in p.get("targets") or []:
            if t.get("datasource") != want_ds:
                fails.add(f"panel {pid} query {t.get('refId')}: datasource is not {want_ds}")
            if not t.get("expr"):
                fails.add(f"panel {pid} query {t.get('refId')}: no expr")
    # Overlapping panels render on top of each other.
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p.get("gridPos") or {}
        for yy in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
            for xx in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
                if (xx, yy) in cells:
                    fails.add(f"panels {cells[(xx, yy)]} and {p.get('id')} overlap at x={xx} y={yy}")
                    break
                cells[(xx, yy)] = p.get("id")
            else:
                continue
            break
    exprs = dashboard_exprs(dash)
    rules = []
    for n, (where, expr) in enumerate(exprs):
        rules.append({"alert": f"DashboardQuery{n}", "expr": grafana_to_promql(expr),
                      "annotations": {"where": where}})
    for where, query in variable_queries(dash):
        try:
            label_values_query(query)
        except ValueError as e:
            fails.add(f"{where}: {e}")
    fails.exit("dashboard lint")
    Path(args.out).write_text(json.dumps({"groups": [{"name": "dashboard-queries", "rules": rules}]}, indent=1))
    print(f"dashboard: {len(panels)} panels, {len(exprs)} queries, {len(variables)} variables: structure ok; "
          f"queries written to {args.out} for promtool")


def cmd_names(args: argparse.Namespace) -> None:
    fails = Failures()
    scrape_dir = Path(args.scrapes)
    files = sorted(p for p in scrape_dir.iterdir() if p.is_file()) if scrape_dir.is_dir() else []
    if not files:
        print(f"FAIL: no scrape files in {scrape_dir}", file=sys.stderr)
        sys.exit(1)
    scraped: dict[str, set[str]] = {}
    where: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    for f in files:
        try:
            series, t = parse_scrape(f.read_text())
        except ValueError as e:
            fails.add(f"{f}: {e}")
            continue
        if not series:
            fails.add(f"{f}: no samples (is it a /metrics text?)")
        types.update(t)
        for name, labels in series.items():
            scraped.setdefault(name, set()).update(labels)
            where.setdefault(name, []).append(f.name)
    source = source_metrics()
    if not source:
        fails.add("found no counter!/gauge!/histogram! in the Rust source: is the checkout complete?")
    unscraped = read_unscraped(UNSCRAPED, fails)
    for name in unscraped:
        if name not in source:
            fails.add(f"{UNSCRAPED.name} lists {name}, which no production crate registers (renamed or removed?)")

    used: list[tuple[str, str, list[str]]] = []  # (where, name, labels)
    dash = json.loads(DASHBOARD.read_text())
    for w, expr in dashboard_exprs(dash):
        try:
            used += [(f"dashboard {w}", n, ls) for n, ls in selectors(expr)]
        except ValueError as e:
            fails.add(f"dashboard {w}: {e}")
    for w, q in variable_queries(dash):
        try:
            used += [(f"dashboard {w}", n, ls) for n, ls in label_values_query(q)]
        except ValueError as e:
            fails.add(f"dashboard {w}: {e}")
    try:
        for alert, expr in rule_exprs(RULES):
            used += [(f"rule {alert}", n, ls) for n, ls in selectors(expr)]
    except ValueError as e:
        fails.add(f"{RULES}: {e}")

    status: dict[str, str] = {}
    for w, name, labels in used:
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                base = name[: -len(suffix)]
        allowed_labels: set[str] | None = None
        if name in PROMETHEUS_SERIES:
            status[name] = "written by Prometheus"
            continue
        if name in scraped:
            status[name] = "scraped (" + ", ".join(sorted(set(where[name]))) + ")"
            allowed_labels = scraped[name]
        else:
            key = name if name in source else base
            category = unscraped.get(key)
            kind, src_labels = source.get(key, ("", set()))
            is_hist_series = key == base and name != base
            if key not in source:
                hint = ""
                if base in scraped or base + "_count" in scraped:
                    hint = f" (the scrape has {base} as a {types.get(base, '?')})"
                fails.add(f"{w}: metric {name} is not exported by the binaries{hint}")
                status[name] = "UNKNOWN"
                continue
            if is_hist_series and kind != "histogram":
                fails.add(f"{w}: {name}: {base} is a {kind} in the source, not a histogram")
                status[name] = "UNKNOWN"
                continue
            if category is None:
                fails.add(f"{w}: metric {name} is registered in the source but absent from every scrape "
                          f"in {scrape_dir}: scrape a run that exports it, or list {key} in "
                          f"{UNSCRAPED.relative_to(ROOT)} (event or kafka) if it cannot appear in a healthy run")
                status[name] = "UNSCRAPED"
                continue
            if category == "kafka" and not args.without_kafka:
                fails.add(f"{w}: metric {name} (kafka) is absent from the scrapes in {scrape_dir}, "
                          f"which include a Kafka run: it must be scraped")
                status[name] = "UNSCRAPED"
                continue
            status[name] = f"not scraped; registered in the source ({kind}), listed as {category}"
            allowed_labels = src_labels | ({"le"} if name.endswith("_bucket") else set())
        extra = [lab for lab in labels if lab not in allowed_labels and lab not in TARGET_LABELS]
        if extra:
            fails.add(f"{w}: {name} has no label {', '.join(extra)} "
                      f"(its labels: {', '.join(sorted(allowed_labels)) or 'none'})")

    width = max(len(n) for n in status) if status else 0
    for name in sorted(status):
        print(f"  {name:<{width}}  {status[name]}")
    print(f"{len(status)} metric names in {len(used)} selectors (dashboard and rules), "
          f"checked against {len(files)} scrape(s) in {scrape_dir} and {len(source)} metrics in the source")
    fails.exit("metric names")
    print("metric names: ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lint = sub.add_parser("lint", help="dashboard structure; write its queries as a rule file for promtool")
    lint.add_argument("out")
    names = sub.add_parser("names", help="metric names and labels against scraped /metrics texts")
    names.add_argument("--scrapes", required=True, help="directory of /metrics texts")
    names.add_argument("--without-kafka", action="store_true",
                       help="the scrapes come from runs without Kafka: accept `kafka` metrics from the source")
    args = parser.parse_args()
    {"lint": cmd_lint, "names": cmd_names}[args.command](args)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
