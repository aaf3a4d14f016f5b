//! Deployment files: what can be run here is run (systemd-analyze verify, the configs through
//! --check-config, the Kubernetes YAML through a YAML parser); the image build cannot be (no
//! Docker engine here), so the Dockerfile is checked for its shape only.

use std::process::Command;

use crate::common::output_within;
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn check_config(path: &std::path::Path) {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .arg("--check-config")
            .arg(path),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(format!("{ROOT}/deploy/wsgate.service")).unwrap();
    for hardening in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(hardening), "unit lacks {hardening}");
    }
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = crate::common::TempDir::new();
    let path = dir.path().join("wsgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/wsgate", env!("CARGO_BIN_EXE_wsgate")),
    )
    .unwrap();
    let out = output_within(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn container_config_is_valid() {
    check_config(std::path::Path::new(&format!("{ROOT}/deploy/config.toml")));
}

#[test]
fn dockerfile_is_multi_stage_and_non_root() {
    let text = std::fs::read_to_string(format!("{ROOT}/deploy/Dockerfile")).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build");
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    let user = last_stage
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("final stage sets USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as non-root: {user}"
    );
    // Every local source the build copies exists.
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                std::path::Path::new(&format!("{ROOT}/{src}")).exists(),
                "COPY source {src} missing"
            );
        }
    }
}

#[test]
fn kubernetes_sidecar_probes_grace_and_config() {
    let script = r#"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = next(d for d in docs if d["kind"] == "ConfigMap")
dep = next(d for d in docs if d["kind"] == "Deployment")
pod = dep["spec"]["template"]["spec"]
gate = next(c for c in pod["containers"] if c["name"] == "wsgate")
print(json.dumps({
  "toml": cm["data"]["wsgate.toml"],
  "grace": pod["terminationGracePeriodSeconds"],
  "ready": gate["readinessProbe"]["httpGet"]["path"],
  "live": gate["livenessProbe"]["httpGet"]["path"],
  "prestop": gate["lifecycle"]["preStop"]["sleep"]["seconds"],
  "nonroot": gate["securityContext"]["runAsNonRoot"],
}))
"#;
    let out = output_within(
        Command::new(crate::common::python()).args([
            "-c",
            script,
            &format!("{ROOT}/deploy/kubernetes-sidecar.yaml"),
        ]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ready"], "/readyz");
    assert_eq!(v["live"], "/healthz");
    assert_eq!(v["nonroot"], true);
    let dir = crate::common::TempDir::new();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(&path, v["toml"].as_str().unwrap()).unwrap();
    check_config(&path);
    let config = wsgate::Config::load(&path).unwrap();
    let needed = v["prestop"].as_u64().unwrap()
        + config.limits.drain_timeout.as_secs()
        + config.limits.close_timeout.as_secs();
    assert!(
        v["grace"].as_u64().unwrap() > needed,
        "terminationGracePeriodSeconds must exceed preStop + drain + close ({needed}s)"
    );
}
