//! The real binary: `check` exit codes, and SIGHUP reloading a running gateway.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::{config_text, embedded_body, wait_for, write_config, ChildGateway, SseClient};

/// `tailgate check --config <config>`.
fn check(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("run")
}

#[test]
fn check_exits_zero_on_a_good_file_and_64_on_a_bad_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect("write");
    assert_eq!(check(&good).status.code(), Some(0));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[streams]]\npath = \"/a\"\nview = \"v\"\nquery = \"SELECT 1\"\n[[streams]]\npath = \"/a\"\nview = \"w\"\ndelay = \"x\"\n",
    )
    .expect("write");
    let out = check(&bad);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:3:8"), "{stderr}");
    assert!(stderr.contains("bad.toml:8:9"), "{stderr}");
    assert!(stderr.contains("duplicate path"), "{stderr}");
    assert!(stderr.contains("bad duration"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_unreloadable_fields_are_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let body = |extra: &str| {
        embedded_body(
            "",
            &format!("[[streams]]\npath = \"/a\"\nview = \"t\"\n{extra}"),
        )
    };
    let path = write_config(
        dir.path(),
        &body(""),
        &[("init.sql", "CREATE TABLE t (a int);\n")],
    );
    let (mut gw, addr) = ChildGateway::start(&path);

    // Hold the file open after writing: no close event reaches the watcher, and the
    // poll stays out of the way of a write it knows is open, so the reload is
    // SIGHUP's; the log line names its trigger.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("open");
    let text = config_text(&body("[[streams]]\npath = \"/hup\"\nview = \"t\"\n"))
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    f.write_all(text.as_bytes()).expect("write");
    f.flush().expect("flush");
    gw.signal("-HUP");
    // One line per reload, naming what needs a restart.
    let reloaded = gw.wait_line("Config reloaded", Duration::from_secs(10));
    assert!(
        reloaded.contains("needs_restart") && reloaded.contains("server.listen"),
        "{reloaded}"
    );
    assert!(
        reloaded.contains("trigger=Signal"),
        "reloaded by the signal: {reloaded}"
    );
    let hup = SseClient::connect(addr, "/hup", &[]).await;
    assert_eq!(hup.status, 200);
    drop(f);

    // SIGTERM: a graceful exit with status 0.
    gw.signal("-TERM");
    let status = wait_for(
        "the gateway to exit after SIGTERM",
        Duration::from_secs(10),
        || std::future::ready(gw.child.try_wait().expect("wait")),
    )
    .await;
    assert!(status.success(), "{status}");
}

/// The shipped sample configs parse and validate, so a sample that drifts from the
/// code fails CI.
#[test]
fn the_shipped_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("streams.toml")];
    for entry in std::fs::read_dir(root.join("examples")).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let config = tailgate::config::load(&file)
            .unwrap_or_else(|e| panic!("{} is not valid:\n{e}", file.display()));
        assert!(!config.streams.is_empty(), "{}", file.display());
    }
}

/// The Kubernetes example parses as YAML, its config passes `tailgate check`, and its
/// probes point at the admin listener's routes.
#[test]
fn the_kubernetes_example_is_valid() {
    use yaml_rust2::YamlLoader;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("examples/kubernetes.yaml")).expect("read");
    let docs = YamlLoader::load_from_str(&text).expect("valid YAML");
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let config = kind("ConfigMap")["data"]["streams.toml"]
        .as_str()
        .expect("streams.toml in the ConfigMap");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("streams.toml");
    std::fs::write(&path, config).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run tailgate check");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed = tailgate::config::load(&path).expect("valid");
    let admin = parsed.server.admin_listen.expect("an admin listener");
    let container = &kind("Deployment")["spec"]["template"]["spec"]["containers"][0];
    let admin_port = container["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .and_then(|p| p["containerPort"].as_i64())
        .expect("an admin port");
    assert_eq!(admin_port, i64::from(admin.port()));
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/livez")
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("admin"));
    }
    // The password comes from a Secret, through the variable the config names.
    let env = container["env"].as_vec().expect("env");
    let var = env
        .iter()
        .find(|e| e["valueFrom"]["secretKeyRef"]["name"].as_str().is_some())
        .expect("a secret env var");
    assert_eq!(
        parsed.upstream.password,
        Some(tailgate::config::PasswordSource::Env(
            var["name"].as_str().expect("name").to_string()
        ))
    );
    assert!(container["resources"]["requests"]["memory"]
        .as_str()
        .is_some());
}
