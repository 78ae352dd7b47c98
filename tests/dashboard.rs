//! The Grafana dashboard, deploy/grafana/backup-worker.json, against the real worker: the model
//! imports as is (a datasource variable, no hard-coded datasource, unique panel ids), every query
//! parses as PromQL (promql-parser), and every metric a query selects — read from the parsed
//! expression, `_bucket`/`_sum`/`_count` mapped to their histogram — is a family the running
//! binary exports on GET /metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use backup_worker::config::ENV_VARS;
use backup_worker_testkit::{database_url, free_port, http_get};
use promql_parser::label::{MatchOp, METRIC_NAME};
use promql_parser::parser::{self, Expr, VectorSelector};
use serde_json::Value;
use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_backup-worker");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/backup-worker.json"
);

/// Families the operator's view must show (issue 25 item 5).
const REQUIRED: &[&str] = &[
    "instant_customer_backup_by_type_total",
    "instant_customer_backup_succeeded_total",
    "instant_customer_backup_failed_total",
    "instant_customer_backup_duration_seconds",
    "instant_customer_backup_bytes_total",
    "instant_customer_backup_rpo_breached",
    "instant_customer_restore_by_type_total",
    "instant_customer_backup_verified_total",
    "backup_worker_unverified_backups",
    "backup_worker_unprotected_backups",
    "backup_worker_copies_total",
    "backup_worker_copy_reads_total",
    "backup_worker_backup_anomalies_total",
    "instant_propagation_applied_total",
    "instant_propagation_unexpected_skip_total",
    "instant_propagation_dead_lettered_total",
    "instant_propagation_unknown_kind_total",
    "instant_customer_backup_stuck_recovered_total",
    "instant_customer_restore_stuck_recovered_total",
    "backup_worker_orphan_objects_removed_total",
    "backup_worker_backups_expired_total",
    "backup_worker_loop_busy",
    "backup_worker_loop_last_progress_timestamp_seconds",
    "backup_worker_loop_restarts_total",
    "process_resident_memory_bytes",
];

/// Functions that take a counter's range: the only way a counter (or a histogram's series) is
/// meaningful on a graph.
const COUNTER_FUNCTIONS: &[&str] = &["rate", "irate", "increase", "resets"];

/// Grafana's built-in interval variables, replaced by a duration for parsing.
const BUILTIN_INTERVALS: &[&str] = &["__rate_interval", "__interval", "__range"];

fn load() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: not JSON: {e}"))
}

/// Every panel, rows included, and the panels nested in (collapsed) rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect()
}

fn panel_name(p: &Value) -> String {
    format!("panel {} {:?}", p["id"], p["title"].as_str().unwrap_or(""))
}

/// The datasource references a panel may carry: a datasource variable (`${datasource}`) or an
/// `__inputs` datasource (`${DS_PROMETHEUS}`), never a concrete datasource's uid.
fn allowed_datasources(dashboard: &Value) -> BTreeSet<String> {
    let mut allowed = BTreeSet::new();
    for v in variables(dashboard) {
        if v["type"] == "datasource" && v["query"] == "prometheus" {
            if let Some(name) = v["name"].as_str() {
                allowed.insert(format!("${{{name}}}"));
                allowed.insert(format!("${name}"));
            }
        }
    }
    for input in dashboard["__inputs"].as_array().into_iter().flatten() {
        if input["type"] == "datasource" && input["pluginId"] == "prometheus" {
            if let Some(name) = input["name"].as_str() {
                allowed.insert(format!("${{{name}}}"));
            }
        }
    }
    allowed
}

/// Problems with the dashboard as a Grafana model (importable through the UI and provisioning).
fn model_problems(dashboard: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if dashboard["title"] != "backup-worker" {
        problems.push(format!(
            "title is {}, not \"backup-worker\"",
            dashboard["title"]
        ));
    }
    if !dashboard["uid"].as_str().is_some_and(|u| {
        !u.is_empty()
            && u.len() <= 40
            && u.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    }) {
        problems.push(format!("uid {} is not a fixed uid", dashboard["uid"]));
    }
    if !dashboard["id"].is_null() {
        problems.push(format!(
            "id is {}: an imported dashboard's id must be null",
            dashboard["id"]
        ));
    }
    if dashboard["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
        problems.push(format!("schemaVersion {} < 36", dashboard["schemaVersion"]));
    }

    let allowed = allowed_datasources(dashboard);
    if allowed.is_empty() {
        problems.push(
            "no Prometheus datasource variable and no DS_ input: panels would name a datasource"
                .into(),
        );
    }
    // Every datasource reference anywhere in the model (panels, targets, variables, annotations).
    fn datasources<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a Value)>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    if k == "datasource" {
                        out.push((at.clone(), child));
                    }
                    datasources(child, format!("{at}.{k}"), out);
                }
            }
            Value::Array(list) => {
                for (i, child) in list.iter().enumerate() {
                    datasources(child, format!("{at}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut refs = Vec::new();
    datasources(dashboard, String::new(), &mut refs);
    for (at, ds) in refs {
        let uid = ds.get("uid").unwrap_or(ds);
        let ok = uid.as_str().is_some_and(|u| allowed.contains(u))
            && (ds.get("type").is_none() || ds["type"] == "prometheus");
        if !ok {
            problems.push(format!(
                "{at}: datasource {ds} is not one of {allowed:?} (a hard-coded datasource)"
            ));
        }
    }

    let mut ids = BTreeMap::<u64, usize>::new();
    for p in panels(dashboard) {
        let name = panel_name(p);
        match p["id"].as_u64() {
            Some(id) => *ids.entry(id).or_default() += 1,
            None => problems.push(format!("{name}: no numeric id")),
        }
        let grid = &p["gridPos"];
        let (x, w, h) = (grid["x"].as_u64(), grid["w"].as_u64(), grid["h"].as_u64());
        if !matches!((x, w, h), (Some(x), Some(w), Some(h)) if w > 0 && h > 0 && x + w <= 24) {
            problems.push(format!("{name}: gridPos {grid} is not within 24 columns"));
        }
        if p["type"] == "row" {
            continue;
        }
        if p.get("datasource").is_none() {
            problems.push(format!("{name}: no datasource"));
        }
        if p["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            problems.push(format!("{name}: no unit"));
        }
        let targets: Vec<&Value> = p["targets"].as_array().into_iter().flatten().collect();
        if targets.is_empty() {
            problems.push(format!("{name}: no query"));
        }
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            if !t["refId"].as_str().is_some_and(|r| ref_ids.insert(r)) {
                problems.push(format!("{name}: refId {} missing or repeated", t["refId"]));
            }
            if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                problems.push(format!("{name}: a target without an expr"));
            }
        }
    }
    for (id, n) in ids {
        if n > 1 {
            problems.push(format!("panel id {id} is used {n} times"));
        }
    }
    problems
}

/// One PromQL expression of the dashboard, with where it comes from.
struct Query {
    at: String,
    expr: String,
}

/// The expressions to check: every panel target's `expr`, and every query variable's
/// `label_values(<selector>, <label>)` selector.
fn queries(dashboard: &Value) -> Result<Vec<Query>, String> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for (i, t) in p["targets"].as_array().into_iter().flatten().enumerate() {
            if let Some(expr) = t["expr"].as_str() {
                out.push(Query {
                    at: format!("{} target {i}", panel_name(p)),
                    expr: expr.to_owned(),
                });
            }
        }
    }
    for v in variables(dashboard) {
        if v["type"] != "query" {
            continue;
        }
        let at = format!("variable {}", v["name"]);
        // Grafana ≥ 10 stores the Prometheus variable query as an object; older ones as a string.
        let q = v["query"]
            .get("query")
            .unwrap_or(&v["query"])
            .as_str()
            .ok_or_else(|| format!("{at}: no query"))?;
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("{at}: {q:?} is not label_values(<selector>, <label>)"))?;
        let (selector, label) = inner
            .rsplit_once(',')
            .ok_or_else(|| format!("{at}: {q:?} names no metric to take label values of"))?;
        let label = label.trim();
        if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("{at}: {label:?} is not a label name"));
        }
        out.push(Query {
            at,
            expr: selector.trim().to_owned(),
        });
    }
    Ok(out)
}

/// Replaces Grafana's variables with values PromQL parses: the interval built-ins with a
/// duration, the dashboard's own (multi-value) variables with a regex — which is only valid
/// right after `=~"` or `!~"`, where a multi-value variable has to stand.
fn expand(expr: &str, own: &BTreeSet<String>) -> Result<String, String> {
    if expr.contains("[[") {
        return Err("the deprecated [[variable]] syntax".into());
    }
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, used) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').ok_or("an unclosed ${")?;
                let name = braced[..end].split(':').next().unwrap_or_default();
                (name, end + 2)
            }
            None => {
                let len = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..len], len)
            }
        };
        if name.is_empty() {
            out.push('$'); // a regex's end anchor
            rest = after;
            continue;
        }
        if BUILTIN_INTERVALS.contains(&name) {
            out.push_str("5m");
        } else if own.contains(name) {
            if !(out.ends_with("=~\"") || out.ends_with("!~\"")) {
                return Err(format!(
                    "${name} outside a regex matcher (=~\"${name}\"): its All / multi-value form would not match"
                ));
            }
            out.push_str(".*");
        } else {
            return Err(format!("${name} is not a variable of the dashboard"));
        }
        rest = &after[used..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A series an expression selects, and how.
#[derive(Debug)]
struct Selected {
    name: String,
    /// The function whose range argument it is (`rate`, `increase`, …), if any.
    range_of: Option<&'static str>,
    /// Inside a `histogram_quantile(…)`.
    in_quantile: bool,
}

fn metric_name(vs: &VectorSelector) -> Result<String, String> {
    if !vs.matchers.or_matchers.is_empty() {
        return Err(format!("{vs}: `or` inside a selector is not checked"));
    }
    if let Some(name) = &vs.name {
        return Ok(name.clone());
    }
    vs.matchers
        .matchers
        .iter()
        .find(|m| m.name == METRIC_NAME && matches!(m.op, MatchOp::Equal))
        .map(|m| m.value.clone())
        .ok_or_else(|| format!("{vs}: selects no single metric name"))
}

/// Walks the AST: every vector selector, with its context.
fn selected(expr: &Expr, in_quantile: bool, out: &mut Vec<Selected>) -> Result<(), String> {
    match expr {
        Expr::Aggregate(a) => {
            selected(&a.expr, in_quantile, out)?;
            if let Some(param) = &a.param {
                selected(param, in_quantile, out)?;
            }
        }
        Expr::Unary(u) => selected(&u.expr, in_quantile, out)?,
        Expr::Binary(b) => {
            selected(&b.lhs, in_quantile, out)?;
            selected(&b.rhs, in_quantile, out)?;
        }
        Expr::Paren(p) => selected(&p.expr, in_quantile, out)?,
        Expr::Subquery(s) => selected(&s.expr, in_quantile, out)?,
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) => {}
        Expr::VectorSelector(vs) => out.push(Selected {
            name: metric_name(vs)?,
            range_of: None,
            in_quantile,
        }),
        Expr::MatrixSelector(ms) => out.push(Selected {
            name: metric_name(&ms.vs)?,
            range_of: None,
            in_quantile,
        }),
        Expr::Call(call) => {
            let in_quantile = in_quantile || call.func.name == "histogram_quantile";
            for arg in &call.args.args {
                match arg.as_ref() {
                    Expr::MatrixSelector(ms) => out.push(Selected {
                        name: metric_name(&ms.vs)?,
                        range_of: Some(call.func.name),
                        in_quantile,
                    }),
                    other => selected(other, in_quantile, out)?,
                }
            }
        }
        Expr::Extension(_) => return Err("an extension node".into()),
    }
    Ok(())
}

/// Parses every query; problems, and each query's selected series.
fn parse_all(dashboard: &Value) -> (Vec<String>, Vec<(String, Vec<Selected>)>) {
    let own: BTreeSet<String> = variables(dashboard)
        .into_iter()
        .filter(|v| v["type"] != "datasource")
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let mut problems = Vec::new();
    let mut parsed = Vec::new();
    let queries = match queries(dashboard) {
        Ok(q) => q,
        Err(e) => return (vec![e], parsed),
    };
    for Query { at, expr } in queries {
        let result = expand(&expr, &own)
            .and_then(|e| parser::parse(&e).map_err(|err| format!("does not parse: {err}")))
            .and_then(|ast| {
                let mut out = Vec::new();
                selected(&ast, false, &mut out)?;
                Ok(out)
            });
        match result {
            Ok(series) if series.is_empty() => {
                problems.push(format!("{at}: {expr:?} selects no metric"))
            }
            Ok(series) => parsed.push((at, series)),
            Err(e) => problems.push(format!("{at}: {expr:?}: {e}")),
        }
    }
    (problems, parsed)
}

/// `# TYPE <family> <type>` lines of a Prometheus text exposition.
fn exported_families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(family, kind)| (family.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// The family a series name belongs to, and its type, or why it is not exported.
fn family_of<'a>(
    name: &'a str,
    families: &'a BTreeMap<String, String>,
) -> Result<(&'a str, &'a str), String> {
    if let Some(kind) = families.get(name) {
        if kind == "histogram" || kind == "summary" {
            return Err(format!(
                "{name} is a {kind}: select its _bucket, _sum or _count series"
            ));
        }
        return Ok((name, kind));
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some((family, kind)) = families.get_key_value(base) {
                if kinds.contains(&kind.as_str()) {
                    return Ok((family, kind));
                }
            }
        }
    }
    Err(format!(
        "{name} is not exported by the worker (no # TYPE line)"
    ))
}

/// Problems with the metrics the dashboard selects, against a live exposition; and the families
/// it uses.
fn metric_problems(dashboard: &Value, exposition: &str) -> (Vec<String>, BTreeSet<String>) {
    let families = exported_families(exposition);
    let (mut problems, parsed) = parse_all(dashboard);
    let mut used = BTreeSet::new();
    for (at, series) in parsed {
        for s in series {
            let (family, kind) = match family_of(&s.name, &families) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(format!("{at}: {e}"));
                    continue;
                }
            };
            used.insert(family.to_owned());
            if (kind == "counter" || kind == "histogram")
                && !s.range_of.is_some_and(|f| COUNTER_FUNCTIONS.contains(&f))
            {
                problems.push(format!(
                    "{at}: {} is a {kind} series: take its rate() or increase()",
                    s.name
                ));
            }
            if s.name.ends_with("_bucket") && kind == "histogram" && !s.in_quantile {
                problems.push(format!("{at}: {} outside histogram_quantile()", s.name));
            }
        }
    }
    for family in REQUIRED {
        if !used.contains(*family) {
            problems.push(format!("no panel shows {family}"));
        }
    }
    (problems, used)
}

/// The dashboard with one string replaced throughout (it must occur).
fn altered(from: &str, to: &str) -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    assert!(text.contains(from), "{from} not in the dashboard");
    serde_json::from_str(&text.replace(from, to)).unwrap()
}

#[test]
fn the_model_is_importable_as_is() {
    let dashboard = load();
    let problems = model_problems(&dashboard);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        panels(&dashboard).len() > 30,
        "the walk misses panels: {}",
        panels(&dashboard).len()
    );
    // Panels nested in a collapsed row are walked too.
    let nested = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|r| r["panels"].as_array().map_or(0, Vec::len))
        .sum::<usize>();
    assert!(nested > 0, "no collapsed row: the nested walk is untested");

    // The check fails what it must fail.
    let hard_coded = altered(r#""uid": "${datasource}""#, r#""uid": "P1809F7CD0C75ACF3""#);
    assert!(model_problems(&hard_coded)
        .iter()
        .any(|p| p.contains("hard-coded")));
    let mut duplicate = load();
    let first = dashboard["panels"][1]["id"].clone();
    duplicate["panels"][2]["id"] = first.clone();
    assert!(model_problems(&duplicate)
        .iter()
        .any(|p| p == &format!("panel id {first} is used 2 times")));
}

#[test]
fn every_query_parses_as_promql() {
    let dashboard = load();
    let (problems, parsed) = parse_all(&dashboard);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let targets = panels(&dashboard)
        .iter()
        .map(|p| p["targets"].as_array().map_or(0, Vec::len))
        .sum::<usize>();
    let variables = variables(&dashboard)
        .iter()
        .filter(|v| v["type"] == "query")
        .count();
    assert!(variables > 0, "no query variable: their check is untested");
    assert_eq!(parsed.len(), targets + variables);

    for (from, to, expect) in [
        (
            "[$__rate_interval]))",
            "[$__rate_interval])",
            "does not parse",
        ),
        ("=~\\\"$job\\\"", "=~\\\"$jbo\\\"", "$jbo is not a variable"),
        (
            "=~\\\"$instance\\\"",
            "=\\\"$instance\\\"",
            "outside a regex matcher",
        ),
    ] {
        let (problems, _) = parse_all(&altered(from, to));
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "{from} → {to}: {problems:?}"
        );
    }
}

/// Starts `backup-worker run` (its own database, a file:// store, /metrics on a free port) and
/// returns its /metrics body once it answers.
async fn live_exposition(pool: &PgPool, dir: &Path) -> String {
    let port = free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let log = dir.join("worker.log");
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    let mut cmd = tokio::process::Command::new(BIN);
    for v in ENV_VARS {
        cmd.env_remove(v);
    }
    let mut child = cmd
        .arg("run")
        .env("DATABASE_URL", database_url(pool))
        .env("STORAGE_URL", format!("file://{}", store.display()))
        .env("METRICS_ADDR", &addr)
        .env("WORKER_ID", "dashboard-test")
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let sock = addr.parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok((200, body)) = http_get(sock, "/metrics").await {
            break body;
        }
        let exited = child.try_wait().unwrap();
        if exited.is_some() || tokio::time::Instant::now() >= deadline {
            panic!(
                "the worker did not serve /metrics on {addr} ({}): {}",
                exited.map_or("within 30 s".into(), |s| format!("exited {s}")),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    body
}

#[sqlx::test]
async fn every_metric_it_shows_is_exported_by_the_running_worker(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let exposition = live_exposition(&pool, dir.path()).await;
    let dashboard = load();
    let (problems, used) = metric_problems(&dashboard, &exposition);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(used.len() >= REQUIRED.len(), "{used:?}");

    // The check fails what it must fail, against the same exposition.
    for (from, to, expect) in [
        (
            "backup_worker_unprotected_backups{",
            "backup_worker_unprotected_backup{",
            "backup_worker_unprotected_backup is not exported",
        ),
        (
            "instant_customer_backup_duration_seconds_sum{",
            "instant_customer_backup_duration_second_sum{",
            "instant_customer_backup_duration_second_sum is not exported",
        ),
        (
            "increase(backup_worker_backups_expired_total{",
            "sum_over_time(backup_worker_backups_expired_total{",
            "take its rate() or increase()",
        ),
        (
            "process_resident_memory_bytes{",
            "process_heap_bytes{",
            "no panel shows process_resident_memory_bytes",
        ),
    ] {
        let (problems, _) = metric_problems(&altered(from, to), &exposition);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "{from} → {to}: {problems:?}"
        );
    }
}
