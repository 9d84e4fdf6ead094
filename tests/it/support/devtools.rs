//! Headless Chromium driven over the DevTools protocol: open a page, evaluate
//! JavaScript in it, take a screenshot. The tests read what a page shows from its DOM,
//! as a person would see it, instead of asking the page to report.
//!
//! One websocket to the browser, one page attached with a flat session; commands are
//! sent one at a time and events are skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Where Chromium is; `.ci/run` installs it.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Whether Chromium is there; a missing one fails the test unless
/// `TAILGATE_SKIP_BROWSER=1` says to skip it.
pub fn have_chromium() -> bool {
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    assert!(
        std::env::var_os("TAILGATE_SKIP_BROWSER").is_some_and(|v| v == "1"),
        "{CHROMIUM} is missing: install Chromium (.ci/run does), \
         or set TAILGATE_SKIP_BROWSER=1 to skip this test"
    );
    eprintln!("{CHROMIUM} missing and TAILGATE_SKIP_BROWSER=1: skipping");
    false
}

/// Headless Chromium with a fresh `profile`, quiet and killed on drop: the switches
/// every browser test needs; the caller adds its own and the URL.
pub fn headless(profile: &tempfile::TempDir) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(CHROMIUM);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// A headless Chromium with one page; the browser is killed when this is dropped.
pub struct Browser {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

/// How long one protocol command may take.
const COMMAND_WAIT: Duration = Duration::from_secs(30);

impl Browser {
    /// Starts Chromium with a fresh profile and a blank page of `width`×`height` CSS
    /// pixels. Every script in `init` runs in each document the page opens, before the
    /// document's own scripts (the page's Content-Security-Policy does not apply to it).
    pub async fn launch(width: u32, height: u32, init: &str) -> Browser {
        Self::launch_with(width, height, init, &[]).await
    }

    /// [`Browser::launch`], with more command-line switches for Chromium.
    pub async fn launch_with(width: u32, height: u32, init: &str, extra: &[String]) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let child = headless(&profile)
            .args([
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .args(extra)
            .arg("about:blank")
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it chose, and the browser's websocket path, here.
        let active = profile.path().join("DevToolsActivePort");
        let endpoint = super::wait_for("Chromium's DevTools port", Duration::from_secs(60), || {
            let active = active.clone();
            async move {
                let text = std::fs::read_to_string(active).ok()?;
                let mut lines = text.lines();
                let port = lines.next()?.trim().parse::<u16>().ok()?;
                let path = lines.next()?.trim().to_string();
                Some(format!("ws://127.0.0.1:{port}{path}"))
            }
        })
        .await;
        let (ws, _) =
            tokio::time::timeout(COMMAND_WAIT, tokio_tungstenite::connect_async(endpoint))
                .await
                .expect("DevTools connect in time")
                .expect("DevTools websocket");
        let mut browser = Browser {
            ws,
            session: String::new(),
            next_id: 0,
            _child: child,
            _profile: profile,
        };
        let target = browser
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        browser.call("Page.enable", json!({})).await;
        browser
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await;
        if !init.is_empty() {
            browser
                .call(
                    "Page.addScriptToEvaluateOnNewDocument",
                    json!({ "source": init }),
                )
                .await;
        }
        browser
    }

    /// Sends one command (to the browser, or to the page's session) and returns its
    /// result, failing the test on an error answer.
    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let answer = self.exchange(session, method, params).await;
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// Sends one command and returns the whole answer, error or result.
    async fn exchange(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let exchange = async {
            self.ws
                .send(Message::text(command.to_string()))
                .await
                .expect("send a DevTools command");
            loop {
                let message = self
                    .ws
                    .next()
                    .await
                    .expect("DevTools connection open")
                    .expect("DevTools message");
                let Message::Text(text) = message else {
                    continue;
                };
                let answer: Value = serde_json::from_str(&text).expect("DevTools JSON");
                if answer["id"].as_u64() == Some(id) {
                    return answer;
                }
            }
        };
        tokio::time::timeout(COMMAND_WAIT, exchange)
            .await
            .unwrap_or_else(|_| panic!("{method} took longer than {COMMAND_WAIT:?}"))
    }

    /// A command to the page.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    /// Opens `url` in the page.
    pub async fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({ "url": url })).await;
        assert!(r.get("errorText").is_none(), "navigating to {url}: {r}");
    }

    /// The value of `expression` in the page (awaited if it is a promise), as JSON.
    pub async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// The value of `expression`, or why there is none (it threw, or the page was
    /// between documents).
    async fn try_eval(&mut self, expression: &str) -> Result<Value, String> {
        let session = self.session.clone();
        let answer = self
            .exchange(
                Some(&session),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(error) = answer.get("error") {
            return Err(error.to_string());
        }
        let r = &answer["result"];
        match r.get("exceptionDetails") {
            Some(e) => Err(format!("threw {e}")),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Evaluates `expression` until `done` accepts its value, failing after `limit`. An
    /// evaluation that fails gives `done` the error as a string.
    pub async fn until(
        &mut self,
        what: &str,
        limit: Duration,
        expression: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // While a navigation replaces the document, evaluating can fail: try again.
            let value = self
                .try_eval(expression)
                .await
                .unwrap_or_else(Value::String);
            if done(&value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}; last: {value}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A PNG of the page's viewport, written to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

/// Where tests put files for a person to look at: `target/test-output/`.
pub fn output_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-output")
}
