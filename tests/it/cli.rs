//! The real binary: `check` exit codes, and SIGHUP reloading a running gateway.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{config_text, ChildGateway};

const BIN: &str = env!("CARGO_BIN_EXE_tailgate");

#[test]
fn check_exits_zero_on_a_good_file_and_64_on_a_bad_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[streams]]\npath = \"/a\"\nview = \"v\"\nquery = \"SELECT 1\"\n[[streams]]\npath = \"/a\"\nview = \"w\"\ndelay = \"x\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
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
    std::fs::write(dir.path().join("init.sql"), "CREATE TABLE t (a int);\n").expect("init");
    let path = dir.path().join("streams.toml");
    let body = |extra: &str| {
        config_text(&format!(
            "[embedded]\ninit = \"init.sql\"\n[[streams]]\npath = \"/a\"\nview = \"t\"\n{extra}"
        ))
    };
    std::fs::write(&path, body("")).expect("config");
    let (mut gw, addr) = ChildGateway::start(&path);

    // Hold the file open after writing: no close event reaches the watcher, and the
    // fallback poll needs two intervals, so a prompt reload can only be SIGHUP's.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("open");
    let text = body("[[streams]]\npath = \"/hup\"\nview = \"t\"\n")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    f.write_all(text.as_bytes()).expect("write");
    f.flush().expect("flush");
    let sent = Instant::now();
    gw.signal("-HUP");
    let refused = gw.wait_line("needs a restart", Duration::from_secs(10));
    assert!(refused.contains("server.listen"), "{refused}");
    gw.wait_line("Config reloaded", Duration::from_secs(10));
    assert!(
        sent.elapsed() < Duration::from_millis(1900),
        "reloaded by the signal, not the poll"
    );
    let hup = crate::support::SseClient::connect(addr, "/hup", &[]).await;
    assert_eq!(hup.status, 200);
    drop(f);

    // SIGTERM: a graceful exit with status 0.
    gw.signal("-TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = gw.child.try_wait().expect("wait") {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
