//! Access control over real HTTP, with tokens minted here with real keys
//! (`tests/fixtures/auth`): hostile tokens, token sources, expiry mid-stream on both
//! response paths and resuming with a fresh token, reloads that tighten the rules,
//! and key rotation through the JWKS file, on a real gateway process whose log is
//! checked for tokens.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tailgate::sse::Item;

use crate::support::{
    config_text, get, initial, metric, ChildGateway, SseClient, ITEMS_INIT, WAIT,
};

const ISS: &str = "https://idp.test/";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn key(name: &str) -> EncodingKey {
    let pem = std::fs::read(fixture(name)).expect("key");
    if name.starts_with("ec") {
        EncodingKey::from_ec_pem(&pem).expect("ec key")
    } else {
        EncodingKey::from_rsa_pem(&pem).expect("rsa key")
    }
}

/// A token from the test issuer, signed by `rsa1` unless the claims say otherwise.
fn token(claims: Value) -> String {
    sign(
        Algorithm::RS256,
        Some("rsa1"),
        &key("rsa1.key.pem"),
        &claims,
    )
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, key).expect("sign")
}

fn claims(roles: &[&str], ttl: u64) -> Value {
    json!({"iss": ISS, "aud": "tailgate", "exp": now() + ttl, "sub": "alice", "roles": roles})
}

fn body(sources: &str, items_rule: &str) -> String {
    format!(
        "log_format = \"json\"\n[embedded]\ninit = \"init.sql\"\n\
         [auth]\nmode = \"jwt\"\ntoken_sources = [{sources}]\nleeway = \"0s\"\n\
         [[auth.issuers]]\niss = \"{ISS}\"\naudience = [\"tailgate\"]\n\
         algorithms = [\"RS256\"]\njwks_file = \"jwks.json\"\n\
         [[streams]]\npath = \"/items\"\nview = \"items_v\"\n{items_rule}\n\
         [[streams]]\npath = \"/open\"\nview = \"items_v\"\npublic = true\n"
    )
}

const OPS: &str = "authorize = { claim = \"/roles\", any_of = [\"ops\", \"admin\"] }";

/// A gateway process serving `body`, with `jwks1.json` as its JWKS file.
fn start(body: &str) -> (tempfile::TempDir, ChildGateway, std::net::SocketAddr) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("init.sql"), ITEMS_INIT).expect("init");
    std::fs::copy(fixture("jwks1.json"), dir.path().join("jwks.json")).expect("jwks");
    let path = dir.path().join("streams.toml");
    std::fs::write(&path, config_text(body)).expect("config");
    let (gw, addr) = ChildGateway::start(&path);
    (dir, gw, addr)
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// The status and `WWW-Authenticate` of a stream request with these headers.
async fn refused(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut c = SseClient::connect(addr, path, headers).await;
    let challenge = c
        .headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let mut body = String::new();
    if c.status != 200 {
        // A refusal's body is short JSON; read it whole.
        while let Some(item) = c.next_item(Duration::from_millis(500)).await {
            body.push_str(&format!("{item:?}"));
        }
    }
    (c.status, challenge, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_and_never_logged() {
    let (_dir, mut gw, addr) = start(&body("\"header\", \"cookie:tailgate_token\"", OPS));
    let good = token(claims(&["ops"], 600));

    let mut tampered: Vec<String> = good.split('.').map(str::to_string).collect();
    let mut evil = claims(&["admin"], 600);
    evil["sub"] = json!("mallory");
    tampered[1] = b64(&evil);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims(&["ops"], 600);
        f(&mut c);
        token(c)
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg":"none"})),
                b64(&claims(&["ops"], 600))
            ),
        ),
        (
            "HS256 signed with the RSA public key's PEM",
            sign(
                Algorithm::HS256,
                Some("rsa1"),
                &EncodingKey::from_secret(&std::fs::read(fixture("rsa1.pub.pem")).expect("pem"))
                    .expect("secret"),
                &claims(&["ops"], 600),
            ),
        ),
        (
            "an algorithm outside the allowlist",
            sign(
                Algorithm::ES256,
                Some("ec1"),
                &key("ec1.key.pem"),
                &claims(&["ops"], 600),
            ),
        ),
        ("a tampered payload", tampered.join(".")),
        ("expired", with(&|c| c["exp"] = json!(now() - 10))),
        (
            "nbf in the future",
            with(&|c| c["nbf"] = json!(now() + 600)),
        ),
        (
            "wrong iss",
            with(&|c| c["iss"] = json!("https://evil.test/")),
        ),
        ("wrong aud", with(&|c| c["aud"] = json!("nope"))),
        (
            "missing exp",
            with(&|c| {
                c.as_object_mut().expect("obj").remove("exp");
            }),
        ),
        (
            "exp as a string",
            with(&|c| c["exp"] = json!((now() + 600).to_string())),
        ),
        (
            "an unknown kid",
            sign(
                Algorithm::RS256,
                Some("nope"),
                &key("rsa1.key.pem"),
                &claims(&["ops"], 600),
            ),
        ),
        (
            "a kid of another issuer's key set",
            sign(
                Algorithm::RS256,
                Some("rsa2"),
                &key("rsa2.key.pem"),
                &claims(&["ops"], 600),
            ),
        ),
        ("a 20 KB token", format!("{good}{}", "A".repeat(20_000))),
        ("garbage base64", "!!!.@@@.###".to_string()),
    ];
    for (what, bad) in &cases {
        let header = format!("Bearer {bad}");
        for reused in [false, true] {
            let mut c = if reused {
                SseClient::connect_reused(addr, "/items", &[("authorization", &header)]).await
            } else {
                SseClient::connect(addr, "/items", &[("authorization", &header)]).await
            };
            assert_eq!(c.status, 401, "{what} (hyper path: {reused})");
            let challenge = c.headers.get("www-authenticate").expect("a challenge");
            assert!(
                challenge
                    .to_str()
                    .unwrap_or("")
                    .contains("error=\"invalid_token\""),
                "{what}: {challenge:?}"
            );
            while c.next_item(Duration::from_millis(200)).await.is_some() {}
        }
    }
    // A 1 MB token does not get through either (the head is too large).
    let huge = format!("Bearer {}", "A".repeat(1 << 20));
    let (status, _) = get(addr, "/items", &[("authorization", &huge)]).await;
    assert!((400..500).contains(&status) && status != 404, "{status}");

    // No token: 401 with a plain challenge; a valid token without the role: 403.
    let (status, challenge, body) = refused(addr, "/items", &[]).await;
    assert_eq!(status, 401);
    assert!(
        challenge.starts_with("Bearer") && !challenge.contains("invalid_token"),
        "{challenge}"
    );
    assert!(!body.contains("eyJ"), "{body}");
    let viewer = token(claims(&["viewer"], 600));
    let (status, _, body) = refused(
        addr,
        "/items",
        &[("authorization", &format!("Bearer {viewer}"))],
    )
    .await;
    assert_eq!(status, 403);
    assert!(!body.contains(&viewer), "the body never echoes the token");
    // A public stream needs nothing.
    let mut open = SseClient::connect(addr, "/open", &[]).await;
    assert_eq!(open.status, 200);
    initial(&mut open).await;

    let (_, metrics) = get(addr, "/metrics", &[]).await;
    let denied = |reason: &str| {
        metric(
            &metrics,
            &format!("auth_denied_total{{stream=\"/items\",reason=\"{reason}\"}}"),
        )
        .unwrap_or(0)
    };
    assert!(denied("invalid") >= 20, "{metrics}");
    assert!(denied("expired") >= 2, "{metrics}");
    assert!(
        denied("missing") >= 1 && denied("forbidden") >= 1,
        "{metrics}"
    );

    // Nothing in the log holds a token, and refusals are logged as `denied`.
    gw.wait_line("\"end\":\"denied\"", WAIT);
    let lines = gw.all_lines().to_vec();
    for line in &lines {
        for (what, bad) in &cases {
            if bad.len() > 20 {
                assert!(!line.contains(bad.as_str()), "{what} in the log: {line}");
            }
        }
        assert!(
            !line.contains(&good) && !line.contains(&viewer),
            "a token in the log: {line}"
        );
        assert!(
            !line.contains("eyJ"),
            "something token-like in the log: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_come_by_header_cookie_and_query_only_when_enabled() {
    let t = token(claims(&["ops"], 600));
    let (_dir, _gw, addr) = start(&body("\"header\", \"cookie:tailgate_token\"", OPS));
    for headers in [
        vec![("authorization", format!("Bearer {t}"))],
        vec![("cookie", format!("theme=dark; tailgate_token={t}"))],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut c = SseClient::connect(addr, "/items", &headers).await;
        assert_eq!(c.status, 200, "{headers:?}");
        initial(&mut c).await;
    }
    // The query is not a source here: 401.
    let c = SseClient::connect(addr, &format!("/items?access_token={t}"), &[]).await;
    assert_eq!(c.status, 401);

    let (_dir2, mut gw2, addr2) = start(&body("\"header\", \"query:access_token\"", OPS));
    let mut c = SseClient::connect(addr2, &format!("/items?access_token={t}"), &[]).await;
    assert_eq!(c.status, 200);
    initial(&mut c).await;
    drop(c);
    // The access line names the subject and redacts the token.
    let line = gw2.wait_line("\"end\":\"client-gone\"", WAIT);
    assert!(line.contains("access_token=REDACTED"), "{line}");
    assert!(line.contains("\"sub\":\"alice\""), "{line}");
    assert!(!line.contains(&t), "{line}");
}

/// Reads events into a model until `end` with `token-expired` arrives; returns the
/// last event id.
async fn until_expired(client: &mut SseClient) -> String {
    let mut last = None;
    loop {
        match client.next_item(WAIT).await {
            Some(Item::Event(e)) if e.event == "end" => {
                assert_eq!(e.data, "{\"reason\":\"token-expired\"}");
                break;
            }
            Some(Item::Event(e)) if e.id.is_some() => last = e.id.clone(),
            Some(_) => {}
            None => panic!("no end(token-expired); ended: {}", client.ended),
        }
    }
    client.expect_closed(WAIT).await;
    last.expect("an event id before the expiry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_ends_the_stream_and_a_fresh_one_resumes_it() {
    let (dir, mut gw, addr) = start(&body("\"header\"", OPS));
    let engine: std::net::SocketAddr = gw
        .seen
        .iter()
        .find(|l| l.contains("Embedded development engine started"))
        .and_then(|l| crate::support::log_field(l, "addr"))
        .and_then(|a| a.parse().ok())
        .expect("engine address");
    let db = crate::support::sql(engine).await;
    let short = token(claims(&["ops"], 3));
    let auth = format!("Bearer {short}");
    let mut fast = SseClient::connect(addr, "/items", &[("authorization", &auth)]).await;
    let mut hyper = SseClient::connect_reused(addr, "/items", &[("authorization", &auth)]).await;
    assert_eq!((fast.status, hyper.status), (200, 200));
    db.batch_execute("INSERT INTO items VALUES (7, 'seven', 70)")
        .await
        .expect("insert");
    let (fast_id, hyper_id) =
        futures::future::join(until_expired(&mut fast), until_expired(&mut hyper)).await;
    gw.wait_line("\"end\":\"token-expired\"", WAIT);

    // Changes while the browser gets a new token.
    db.batch_execute("INSERT INTO items VALUES (8, 'eight', 80)")
        .await
        .expect("insert");
    // The expired token is refused; a fresh one resumes with no snapshot.
    let (status, _, _) = refused(addr, "/items", &[("authorization", &auth)]).await;
    assert_eq!(status, 401);
    let fresh = format!("Bearer {}", token(claims(&["ops"], 600)));
    for (id, reused) in [(fast_id, false), (hyper_id, true)] {
        let headers = [
            ("authorization", fresh.as_str()),
            ("last-event-id", id.as_str()),
        ];
        let mut c = if reused {
            SseClient::connect_reused(addr, "/items", &headers).await
        } else {
            SseClient::connect(addr, "/items", &headers).await
        };
        assert_eq!(c.status, 200);
        let e = c.next_data_event(WAIT).await;
        assert_eq!(e.event, "update", "resumed without a snapshot: {e:?}");
        assert!(e.data.contains("eight"), "{e:?}");
    }
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_tightens_the_rules_ends_exactly_the_denied_connections() {
    let (dir, mut gw, addr) = start(&body("\"header\"", OPS));
    let ops = format!("Bearer {}", token(claims(&["ops"], 600)));
    let admin = format!("Bearer {}", token(claims(&["admin"], 600)));
    let mut as_ops = SseClient::connect(addr, "/items", &[("authorization", &ops)]).await;
    let mut as_admin =
        SseClient::connect_reused(addr, "/items", &[("authorization", &admin)]).await;
    let mut anonymous = SseClient::connect(addr, "/open", &[]).await;
    for c in [&mut as_ops, &mut as_admin, &mut anonymous] {
        assert_eq!(c.status, 200);
        initial(c).await;
    }
    // Only admins now; and /open stops being public.
    let tightened = body(
        "\"header\"",
        "authorize = { claim = \"/roles\", any_of = [\"admin\"] }",
    )
    .replace("public = true\n", "");
    std::fs::write(dir.path().join("streams.toml"), config_text(&tightened)).expect("rewrite");
    gw.wait_line("Config reloaded", WAIT);
    for (who, c) in [("ops", &mut as_ops), ("anonymous", &mut anonymous)] {
        let e = c
            .wait_item(
                "end",
                WAIT,
                |i| matches!(i, Item::Event(e) if e.event == "end"),
            )
            .await;
        let Item::Event(e) = e else {
            unreachable!("an event")
        };
        assert_eq!(e.data, "{\"reason\":\"forbidden\"}", "{who}");
        c.expect_closed(WAIT).await;
    }
    // The admin stays, and keeps streaming.
    as_admin.expect_quiet(Duration::from_millis(500)).await;
    let again = SseClient::connect(addr, "/items", &[("authorization", &admin)]).await;
    assert_eq!(again.status, 200);
    let (status, _, _) = refused(addr, "/items", &[("authorization", &ops)]).await;
    assert_eq!(status, 403);
    let (status, _, _) = refused(addr, "/open", &[]).await;
    assert_eq!(status, 401);
    gw.wait_line("\"end\":\"forbidden\"", WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_through_the_jwks_file_without_a_restart() {
    let (dir, _gw, addr) = start(&body("\"header\"", OPS));
    let old = format!("Bearer {}", token(claims(&["ops"], 600)));
    let new = format!(
        "Bearer {}",
        sign(
            Algorithm::RS256,
            Some("rsa2"),
            &key("rsa2.key.pem"),
            &claims(&["ops"], 600)
        )
    );
    assert_eq!(
        SseClient::connect(addr, "/items", &[("authorization", &old)])
            .await
            .status,
        200
    );
    assert_eq!(
        SseClient::connect(addr, "/items", &[("authorization", &new)])
            .await
            .status,
        401
    );
    // Rename-over, as a secret manager writes it.
    let tmp = dir.path().join("jwks.json.tmp");
    std::fs::copy(fixture("jwks2.json"), &tmp).expect("copy");
    std::fs::rename(&tmp, dir.path().join("jwks.json")).expect("rotate");
    crate::support::wait_for("the new key", WAIT, || async {
        let c = SseClient::connect(addr, "/items", &[("authorization", &new)]).await;
        (c.status == 200).then_some(())
    })
    .await;
    assert_eq!(
        SseClient::connect(addr, "/items", &[("authorization", &old)])
            .await
            .status,
        401
    );
}
