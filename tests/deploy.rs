//! The operations package (deploy/): the alert rules pass promtool's checks and unit tests, the
//! PrometheusRule matches them, and the manifests use only what the daemon really reads.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use backup_worker::config::{Config, ENV_VARS};
use serde_yaml::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(Path::new(ROOT).join("deploy/prometheus"))
        .output()
        .expect("promtool is installed by scripts/test (Debian package prometheus)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    promtool(&["check", "rules", "rules.yml"]);
    promtool(&["test", "rules", "rules_test.yml"]);
}

#[test]
fn every_alert_has_a_unit_test_and_a_runbook_section() {
    let rules = yaml("deploy/prometheus/rules.yml");
    let tests =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/rules_test.yml")).unwrap();
    let runbook = std::fs::read_to_string(Path::new(ROOT).join("docs/runbook.md"))
        .unwrap()
        .to_lowercase();
    let mut n = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "{name} has no promtool test"
            );
            assert!(
                runbook.contains(&format!("## {}", name.to_lowercase())),
                "{name} has no runbook section"
            );
            n += 1;
        }
    }
    assert_eq!(n, 19);
}

#[test]
fn the_prometheus_rule_resource_matches_the_tested_rules() {
    assert_eq!(
        yaml("deploy/base/prometheusrule.yaml")["spec"],
        yaml("deploy/prometheus/rules.yml")
    );
}

#[test]
fn the_plans_config_map_is_the_repository_plans_yaml() {
    let shipped = std::fs::read_to_string(Path::new(ROOT).join("deploy/base/plans.yaml")).unwrap();
    assert_eq!(shipped, backup_worker::plans::EMBEDDED_PLANS);
}

/// Resources exist, and generators' files exist inside their kustomization's directory (kustomize
/// refuses files outside it by default).
#[test]
fn kustomizations_reference_existing_files() {
    for dir in ["deploy/base", "deploy/overlays/example", "deploy/grafana"] {
        let k = yaml(&format!("{dir}/kustomization.yaml"));
        for r in k["resources"].as_sequence().into_iter().flatten() {
            let p = Path::new(ROOT).join(dir).join(r.as_str().unwrap());
            assert!(p.exists(), "{}", p.display());
        }
        for g in k["configMapGenerator"].as_sequence().into_iter().flatten() {
            for f in g["files"].as_sequence().unwrap() {
                // `key=path` or `path`
                let f = f.as_str().unwrap();
                let file = f.split_once('=').map_or(f, |(_, path)| path);
                assert!(
                    Path::new(file)
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_))),
                    "{dir}: {file} is outside the kustomization's directory"
                );
                let p = Path::new(ROOT).join(dir).join(file);
                assert!(p.is_file(), "{}", p.display());
            }
        }
    }
}

/// The Grafana dashboard reaches Grafana's sidecar: a ConfigMap of deploy/grafana/backup-worker.json
/// labelled grafana_dashboard: "1", under a fixed name, included by the base.
#[test]
fn the_dashboard_ships_as_a_config_map_for_grafanas_sidecar() {
    let k = yaml("deploy/grafana/kustomization.yaml");
    let generators = k["configMapGenerator"].as_sequence().unwrap();
    assert_eq!(generators.len(), 1);
    let g = &generators[0];
    assert_eq!(g["files"].as_sequence().unwrap(), &["backup-worker.json"]);
    assert_eq!(g["options"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(g["options"]["disableNameSuffixHash"], true);
    let base = yaml("deploy/base/kustomization.yaml");
    assert!(
        base["resources"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|r| r == "../grafana"),
        "deploy/base does not include deploy/grafana"
    );
}

/// Env names in the Deployment (and the example overlay's patches) are ones the daemon reads,
/// the literal values form a valid configuration, and ports, probes and grace agree with it.
#[test]
fn the_deployment_uses_only_what_the_daemon_reads() {
    let d = yaml("deploy/base/deployment.yaml");
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let extra = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "TMPDIR",
        "RUST_LOG",
    ];
    let mut env: HashMap<String, String> = HashMap::new();
    for e in c["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        assert!(
            ENV_VARS.contains(&name.as_str()) || extra.contains(&name.as_str()),
            "{name} is not read by the daemon"
        );
        let value = match (e["value"].as_str(), e.get("valueFrom")) {
            (Some(v), _) => v.to_owned(),
            (None, Some(from)) if from.get("fieldRef").is_some() => "pod-0".into(),
            (None, Some(_)) if name == "DATABASE_URL" => "postgres://u:p@db/app".into(),
            (None, Some(_)) if name == "STORAGE_URL" => "s3://backups/prod".into(),
            (None, Some(_)) => "secret".into(),
            (None, None) => panic!("{name} has no value"),
        };
        env.insert(name, value);
    }
    for required in [
        "DATABASE_URL",
        "STORAGE_URL",
        "WORKER_ID",
        "METRICS_ADDR",
        "PLANS_PATH",
    ] {
        assert!(env.contains_key(required), "{required} missing");
    }
    assert!(c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "WORKER_ID"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"));
    assert!(c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "DATABASE_URL" && e["valueFrom"].get("secretKeyRef").is_some()));
    let config = Config::from_lookup(|k| env.get(k).cloned())
        .expect("the Deployment's env is a valid configuration");

    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(port, u64::from(config.metrics_addr.port()));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let needed = config.shutdown_grace + config.shutdown_abort_window + Duration::from_secs(3);
    assert!(
        Duration::from_secs(grace) >= needed,
        "terminationGracePeriodSeconds {grace} must cover SHUTDOWN_GRACE + SHUTDOWN_ABORT_WINDOW + 3 s"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(
        mounts.contains(&env["TMPDIR"].as_str()),
        "TMPDIR must be a writable volume"
    );
    assert!(env["PLANS_PATH"].starts_with(mounts.iter().find(|m| m.starts_with("/etc")).unwrap()));

    let svc = yaml("deploy/base/service.yaml");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");

    // The overlay may add variables: they must be read by the daemon too.
    let overlay =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/overlays/example/kustomization.yaml"))
            .unwrap();
    for line in overlay.lines().filter(|l| l.contains("value: { name: ")) {
        let name = line
            .split("name: ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .trim();
        assert!(
            ENV_VARS.contains(&name),
            "overlay sets {name}, which the daemon does not read"
        );
    }
}
