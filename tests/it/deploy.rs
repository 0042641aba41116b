//! What deploy/ ships: the Prometheus rules pass `promtool check rules` and their unit tests
//! (Debian's prometheus package; `scripts/promtool.sh install`, which `make test` runs), the
//! dashboard's panels all
//! query something, and the Kubernetes manifests agree with the configuration they carry. That
//! every metric they use is exported is checked on running processes in `metrics.rs`.

use redrive::Config;
use std::path::{Path, PathBuf};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap()
}

/// Runs `program` with `args` in `dir`, asserts that it succeeds, and returns what it printed.
fn passes(program: &str, args: &[&str], dir: &str, missing: &str) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(deploy(dir))
        .output()
        .expect(missing);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?}: {text}");
    text
}

const NO_PROMTOOL: &str = "promtool is installed: run scripts/promtool.sh install (make test does)";

#[test]
fn the_alert_rules_pass_promtool() {
    let args = ["check", "rules", "redrive-alerts.yml"];
    let text = passes("promtool", &args, "prometheus", NO_PROMTOOL);
    assert!(text.contains("SUCCESS: 7 rules found"), "{text}");
}

/// The rules' unit tests (`deploy/prometheus/redrive-alerts.test.yml`): each alert fires for the
/// group whose series call for it, and not for the group beside it.
#[test]
fn the_alert_rules_fire_for_the_group_in_trouble() {
    let args = ["test", "rules", "redrive-alerts.test.yml"];
    let text = passes("promtool", &args, "prometheus", NO_PROMTOOL);
    assert!(text.contains("SUCCESS"), "{text}");
}

/// The manifests decode strictly into their Kubernetes API types and agree with each other
/// (`deploy/kubernetes/check`, Go and k8s.io/api: no cluster needed).
#[test]
fn the_manifests_are_valid_kubernetes_objects() {
    let text = passes(
        "go",
        &["run", ".", ".."],
        "kubernetes/check",
        "go is installed",
    );
    assert!(
        text.contains(
            "ok: 1 deployment(s), 1 job(s), 1 service(s), 1 configmap(s), 1 secret(s), 1 pdb(s)"
        ),
        "{text}"
    );
}

#[test]
fn every_dashboard_panel_queries_a_redrive_metric() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/redrive-dashboard.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            assert!(t["expr"].as_str().unwrap().contains("redrive_"), "{t}");
        }
    }
}

/// The ConfigMap's redrive.toml, out of its YAML block.
fn configmap_toml() -> String {
    let yaml = read("kubernetes/configmap.yaml");
    let (_, block) = yaml.split_once("redrive.toml: |\n").unwrap();
    block
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_manifests_agree_with_their_configuration() {
    // The Secret supplies the database URL.
    let text = format!(
        "[postgres]\nurl = \"postgres://u:p@postgres/db\"\n{}",
        configmap_toml()
    );
    let config = Config::from_toml(&text).unwrap();
    let deployment = read("kubernetes/deployment.yaml");
    let grace: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        grace > config.shutdown.timeout.as_secs() + 10,
        "the kubelet would kill redrive before its drain ({grace}s, shutdown.timeout {:?})",
        config.shutdown.timeout
    );
    let port = config.http.listen.port();
    assert!(
        !config.http.listen.ip().is_loopback(),
        "probes could not reach {}",
        config.http.listen
    );
    assert!(deployment.contains(&format!("containerPort: {port}")));
    assert!(deployment.contains("path: /healthz") && deployment.contains("path: /readyz"));
    assert!(deployment.contains("name: REDRIVE_POSTGRES__URL"));
    assert!(read("kubernetes/service.yaml").contains(&format!("port: {port}")));
    assert!(read("kubernetes/job-migrate.yaml").contains(r#"args: ["migrate"]"#));
    let kustomization = read("kubernetes/kustomization.yaml");
    for file in [
        "configmap",
        "secret",
        "job-migrate",
        "deployment",
        "service",
        "pdb",
    ] {
        assert!(kustomization.contains(&format!("{file}.yaml")), "{file}");
    }
}
