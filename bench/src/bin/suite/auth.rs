//! The auth scenario: the storm scenario's connect storm (every client at once while
//! the stream runs at 10 ev/s) against tailgate with auth off and with JWT auth on,
//! interleaved (none, jwt, none, jwt, ...; `--reps`), each client sending its own
//! HS256 token (`Authorization: Bearer ...`, distinct `sub`, so a verification cache
//! cannot make them cheap). The ratio is jwt / none of the time until every client
//! holds its first event.
//!
//! A gateway build without `[auth]` refuses the config (`tailgate check`); the
//! scenario then reports "auth not supported by this gateway build" and skips.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use tailgate_bench::jwt::{random_secret, Minter};
use tailgate_bench::probe::Watcher;
use tailgate_bench::sys;

use super::{median, thousands, Kind, Limit, Reps, Run, Spec, Suite};

/// The environment variable holding the HS256 secret, in the gateway's environment.
pub(super) const SECRET_ENV: &str = "TAILGATE_BENCH_SECRET";
pub(super) const ISSUER: &str = "https://bench.example/";
pub(super) const AUDIENCE: &str = "tailgate";

/// The gateway's auth section, as its config documents it.
pub(super) const AUTH_TOML: &str = r#"[auth]
mode = "jwt"
token_sources = ["header"]
leeway = "30s"

[[auth.issuers]]
iss = "https://bench.example/"
audience = ["tailgate"]
algorithms = ["HS256"]
secret_env = "TAILGATE_BENCH_SECRET"

"#;

/// Why this gateway build cannot run the scenario, from `tailgate check`'s answer to
/// a config with `[auth]`: `Ok(())` when it accepts it.
pub(super) fn support(check_ok: bool, output: &str) -> Result<(), String> {
    if check_ok {
        return Ok(());
    }
    // A build without auth names the section as unknown ("unknown section `auth`,
    // expected one of ..."); a build with it that refuses something inside it names
    // that field, which is a problem of this scenario's config, not a missing feature.
    let unknown = output.lines().map(str::trim).find(|l| {
        let l = l.to_ascii_lowercase();
        [
            "unknown section `auth`",
            "unknown key `auth`",
            "unknown field `auth`",
        ]
        .iter()
        .any(|p| l.contains(p))
    });
    match unknown {
        Some(line) => Err(format!(
            "auth not supported by this gateway build (tailgate check: {line})"
        )),
        None => Err(format!(
            "tailgate check refused the auth config: {}",
            output.trim()
        )),
    }
}

impl Suite {
    /// Runs `tailgate check` on a config like the one `start` writes with auth on.
    fn auth_check(&mut self, secret: &str) -> anyhow::Result<Result<(), String>> {
        let dir = self.tmp.join("work").join("auth-check");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("ticks.sql"), super::ticks_sql())?;
        let port = self.port();
        let cfg = dir.join("tailgate.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[upstream]\nurl = \"embedded\"\n\n[embedded]\ninit = \"ticks.sql\"\n\n{AUTH_TOML}[[streams]]\npath = \"/ticks\"\nquery = \"SELECT seq, sent_ms, pad FROM ticks\"\n"
            ),
        )?;
        let mut child = Command::new(&self.args.tailgate)
            .arg("--config")
            .arg(&cfg)
            .arg("check")
            .env(SECRET_ENV, secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running tailgate check")?;
        let end = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("tailgate check did not finish within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Name the file as the scenario writes it, not by its temporary path.
        let text = text.replace(&cfg.display().to_string(), "tailgate.toml");
        Ok(support(status.success(), &text))
    }

    /// One token per client, `Authorization: Bearer <jwt>` lines, in a header file.
    fn auth_tokens(&self, secret: &str, n: usize) -> anyhow::Result<std::path::PathBuf> {
        let minter = Minter::new(secret.as_bytes(), ISSUER, AUDIENCE)?;
        let now = sys::now_ms() / 1000;
        let path = self.tmp.join("auth-tokens.txt");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..n {
            writeln!(
                f,
                "Authorization: Bearer {}",
                minter.token(&format!("client-{i}"), now, 3600)?
            )?;
        }
        f.flush()?;
        Ok(path)
    }

    pub(super) fn auth(&mut self) -> anyhow::Result<()> {
        let secret = random_secret()?;
        if let Err(why) = self.auth_check(&secret)? {
            eprintln!("  auth: {why}");
            self.skipped.push(format!("auth: {why}"));
            self.missing("auth", "connect storm with JWT auth vs none", &why);
            return Ok(());
        }
        let mut load = self.storm_load();
        let n = load.clients;
        let tokens = self.auth_tokens(&secret, n)?;
        let mut by: BTreeMap<bool, Reps> = BTreeMap::new();
        for _ in 0..self.args.reps.max(1) {
            for on in [false, true] {
                let spec = Spec {
                    auth_secret: on.then(|| secret.clone()),
                    ..Spec::new(Kind::Tailgate, 10.0)
                };
                load.header_file = on.then(|| tokens.clone());
                let what = format!("auth/{}", if on { "jwt" } else { "none" });
                if let Some(r) = self.measure_or_skip(&what, "auth", &spec, &load) {
                    by.entry(on).or_default().0.push(r);
                }
            }
        }
        let none = by.get(&false);
        let jwt = by.get(&true);
        let max = |r: &Reps| {
            median(
                r.0.iter()
                    .map(|x| x.f("first_event_since_start.max_ms"))
                    .collect(),
            )
        };
        let p99 = |r: &Reps| {
            median(
                r.0.iter()
                    .map(|x| x.f("first_event_since_start.p99_ms"))
                    .collect(),
            )
        };
        let each = |r: Option<&Reps>| {
            r.map(|r| {
                r.0.iter()
                    .map(|x| format!("{:.0}", x.f("first_event_since_start.max_ms")))
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_default()
        };
        self.goal(
            "auth",
            &format!(
                "time until all {} hold their first event, JWT auth vs none",
                thousands(n)
            ),
            jwt.zip(none).map(|(j, o)| (max(j), max(o))),
            Limit::Report,
            "ms",
            &format!(
                "medians of interleaved runs; per run jwt {} ms, none {} ms; p99 {:.0} vs {:.0} ms; {} distinct tokens (one per client), HS256",
                each(jwt),
                each(none),
                jwt.map_or(f64::NAN, p99),
                none.map_or(f64::NAN, p99),
                thousands(n)
            ),
        );
        self.goal(
            "auth",
            "failed connects or clients without a first event, JWT auth on",
            jwt.map(|j| (j.sum("failed") + j.sum("clients_without_event"), 0.0)),
            Limit::Zero,
            "clients",
            &format!("over {} runs", jwt.map_or(0, |j| j.0.len())),
        );
        // Auth must really be on: without a token the stream is refused (any 4xx),
        // with one it is served (checked before each storm, with one client).
        let statuses = |r: &Run| {
            (
                r.extra.get("status_without_token").and_then(|v| v.as_u64()),
                r.extra.get("status_with_token").and_then(|v| v.as_u64()),
            )
        };
        let enforced = jwt.map(|j| {
            let ok =
                j.0.iter()
                    .all(|r| matches!(statuses(r), (Some(400..=499), Some(200))));
            (if ok { 1.0 } else { 0.0 }, 1.0)
        });
        self.goal(
            "auth",
            "a stream request without a token is refused, one with a token served",
            enforced,
            Limit::Exactly(1.0),
            "",
            &format!(
                "status without / with a token per run: {}",
                jwt.map(|j| j
                    .0
                    .iter()
                    .map(|r| {
                        let (a, b) = statuses(r);
                        format!(
                            "{}/{}",
                            a.map_or("-".into(), |v| v.to_string()),
                            b.map_or("-".into(), |v| v.to_string())
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "))
                    .unwrap_or_default()
            ),
        );
        Ok(())
    }
}

/// Before the storm: the status of one stream request without a token and of one
/// with the first client's token (auth off: both 200).
pub(super) fn probe_statuses(
    port: u16,
    header_file: Option<&Path>,
) -> BTreeMap<String, serde_json::Value> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let status = |headers: &[String]| {
        let end = Instant::now() + Duration::from_secs(10);
        let w = Watcher::start(addr, "/ticks", headers, end);
        while w.status().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        w.status()
    };
    let token: Vec<String> = header_file
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| t.lines().next().map(str::to_string))
        .into_iter()
        .collect();
    let mut out = BTreeMap::new();
    out.insert("status_without_token".to_string(), json!(status(&[])));
    if !token.is_empty() {
        out.insert("status_with_token".to_string(), json!(status(&token)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_auth_section_means_unsupported() {
        assert_eq!(support(true, ""), Ok(()));
        // What `tailgate check` says today.
        let e = support(
            false,
            "1 problem(s) in t.toml\n  t.toml:10:2: unknown section `auth`, expected one of `server`, `upstream`, `embedded`, `defaults`, `streams`\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("auth not supported by this gateway build"),
            "{e}"
        );
        assert!(e.contains("t.toml:10:2"), "{e}");
        let e = support(false, "t.toml:11:1: unknown key `tokens` in `auth`\n").unwrap_err();
        assert!(
            e.starts_with("tailgate check refused the auth config"),
            "{e}"
        );
        let e = support(
            false,
            "tailgate.toml:12:1: auth.leeway: bad duration \"x\"\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("tailgate check refused the auth config"),
            "{e}"
        );
    }

    #[test]
    fn the_auth_section_has_the_agreed_keys() {
        let v: toml::Table = toml::from_str(AUTH_TOML).unwrap();
        let auth = v["auth"].as_table().unwrap();
        assert_eq!(auth["mode"].as_str(), Some("jwt"));
        assert_eq!(
            auth["token_sources"].as_array().unwrap()[0].as_str(),
            Some("header")
        );
        assert_eq!(auth["leeway"].as_str(), Some("30s"));
        let issuers = auth["issuers"].as_array().unwrap();
        assert_eq!(issuers.len(), 1);
        let i = issuers[0].as_table().unwrap();
        assert_eq!(i["iss"].as_str(), Some(ISSUER));
        assert_eq!(
            i["audience"].as_array().unwrap()[0].as_str(),
            Some(AUDIENCE)
        );
        assert_eq!(
            i["algorithms"].as_array().unwrap()[0].as_str(),
            Some("HS256")
        );
        assert_eq!(i["secret_env"].as_str(), Some(SECRET_ENV));
        assert_eq!(auth.len(), 4, "mode, token_sources, leeway, issuers");
        assert_eq!(i.len(), 4, "iss, audience, algorithms, secret_env");
    }
}
