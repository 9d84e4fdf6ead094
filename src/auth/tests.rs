//! Verification against real keys (`tests/fixtures/auth`), hostile tokens, rules, token
//! sources, and keys that change underneath.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::config::{IssuerConfig, KeySource};

const ISS: &str = "https://idp.test/";
const OTHER: &str = "https://other.test/";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(iss: &str) -> Value {
    json!({"iss": iss, "aud": "tailgate", "exp": now() + 600, "sub": "alice", "roles": ["ops"]})
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, key).expect("sign")
}

fn rsa1() -> EncodingKey {
    EncodingKey::from_rsa_pem(&pem("rsa1.key.pem")).expect("rsa1")
}

fn issuer(iss: &str, algorithms: &[Algorithm], keys: KeySource) -> IssuerConfig {
    IssuerConfig {
        iss: iss.into(),
        audience: vec!["tailgate".into()],
        algorithms: algorithms.to_vec(),
        keys,
    }
}

async fn auth(issuers: Vec<IssuerConfig>) -> Arc<Auth> {
    let config = AuthConfig {
        mode: AuthMode::Jwt,
        token_sources: vec![
            TokenSource::Header,
            TokenSource::Cookie("tailgate_token".into()),
            TokenSource::Query("access_token".into()),
        ],
        leeway: Duration::from_secs(5),
        issuers,
    };
    Auth::start(&config, &CancellationToken::new(), &TaskTracker::new())
        .await
        .expect("auth starts")
}

/// An issuer with a JWKS file of RSA, EC and Ed25519 keys, another issuer (with a
/// rotated RSA key) and an HMAC issuer.
async fn standard(secret_dir: &tempfile::TempDir) -> Arc<Auth> {
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "s3cret-for-hmac-tests\n").expect("secret");
    auth(vec![
        issuer(
            ISS,
            &[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
            KeySource::JwksFile(fixture("jwks1.json")),
        ),
        issuer(
            OTHER,
            &[Algorithm::RS256],
            KeySource::JwksFile(fixture("jwks2.json")),
        ),
        issuer(
            "https://hmac.test/",
            &[Algorithm::HS256],
            KeySource::SecretFile(secret),
        ),
    ])
    .await
}

#[tokio::test]
async fn valid_tokens_of_every_key_kind_verify() {
    let dir = tempfile::tempdir().expect("dir");
    let auth = standard(&dir).await;
    let c = claims(ISS);
    let tokens = [
        sign(Algorithm::RS256, Some("rsa1"), &rsa1(), &c),
        sign(
            Algorithm::ES256,
            Some("ec1"),
            &EncodingKey::from_ec_pem(&pem("ec1.key.pem")).expect("ec"),
            &c,
        ),
        sign(
            Algorithm::EdDSA,
            Some("ed1"),
            &EncodingKey::from_ed_pem(&pem("ed1.key.pem")).expect("ed"),
            &c,
        ),
        sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(b"s3cret-for-hmac-tests").expect("secret"),
            &claims("https://hmac.test/"),
        ),
    ];
    for token in &tokens {
        let credential = auth.verify(token).await.expect("valid");
        assert_eq!(credential.subject.as_deref(), Some("alice"));
        assert_eq!(credential.expires, c["exp"].as_u64().expect("exp") + 5);
    }
    // A PEM public key: no `kid` needed.
    let pem_auth = auth_with_pem().await;
    let token = sign(Algorithm::RS256, None, &rsa1(), &c);
    assert!(pem_auth.verify(&token).await.is_ok());
}

async fn auth_with_pem() -> Arc<Auth> {
    auth(vec![issuer(
        ISS,
        &[Algorithm::RS256],
        KeySource::PublicKeyFile(fixture("rsa1.pub.pem")),
    )])
    .await
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn hostile_tokens_are_refused_for_what_they_are() {
    let dir = tempfile::tempdir().expect("dir");
    let auth = standard(&dir).await;
    let pem_auth = auth_with_pem().await;
    let good = sign(Algorithm::RS256, Some("rsa1"), &rsa1(), &claims(ISS));
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims(ISS);
        f(&mut c);
        sign(Algorithm::RS256, Some("rsa1"), &rsa1(), &c)
    };
    let mut tampered: Vec<String> = good.split('.').map(str::to_string).collect();
    let mut evil = claims(ISS);
    evil["roles"] = json!(["admin"]);
    tampered[1] = b64(&evil);
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(ISS))
    );
    // HS256 with the RSA public key's PEM as the HMAC secret: the old confusion.
    let confused = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(&pem("rsa1.pub.pem")).expect("secret"),
        &claims(ISS),
    );
    let cases: Vec<(&str, String, TokenError)> = vec![
        ("alg none", none, TokenError::Malformed),
        (
            "HS256 with the public key's PEM",
            confused.clone(),
            TokenError::Algorithm,
        ),
        (
            "an algorithm outside the allowlist",
            sign(Algorithm::RS384, Some("rsa1"), &rsa1(), &claims(ISS)),
            TokenError::Algorithm,
        ),
        (
            "a tampered payload",
            tampered.join("."),
            TokenError::Signature,
        ),
        (
            "expired past the leeway",
            with(&|c| c["exp"] = json!(now() - 60)),
            TokenError::Expired,
        ),
        (
            "nbf in the future",
            with(&|c| c["nbf"] = json!(now() + 600)),
            TokenError::NotYetValid,
        ),
        (
            "wrong iss",
            with(&|c| c["iss"] = json!("https://evil.test/")),
            TokenError::UnknownIssuer,
        ),
        (
            "wrong aud",
            with(&|c| c["aud"] = json!("someone-else")),
            TokenError::Audience,
        ),
        (
            "no exp",
            with(&|c| {
                c.as_object_mut().expect("object").remove("exp");
            }),
            TokenError::MissingClaim("exp"),
        ),
        (
            "exp as a string",
            with(&|c| c["exp"] = json!((now() + 600).to_string())),
            TokenError::ClaimType("exp"),
        ),
        (
            "no aud",
            with(&|c| {
                c.as_object_mut().expect("object").remove("aud");
            }),
            TokenError::MissingClaim("aud"),
        ),
        (
            "an unknown kid",
            sign(Algorithm::RS256, Some("nope"), &rsa1(), &claims(ISS)),
            TokenError::UnknownKey,
        ),
        (
            "a kid that only another issuer has",
            sign(
                Algorithm::RS256,
                Some("rsa2"),
                &EncodingKey::from_rsa_pem(&pem("rsa2.key.pem")).expect("rsa2"),
                &claims(ISS),
            ),
            TokenError::UnknownKey,
        ),
        ("a 1 MB token", "a".repeat(1 << 20), TokenError::TooLarge),
        ("garbage", "%%%.@@@.!!!".into(), TokenError::Malformed),
        ("not a JWT", "hello".into(), TokenError::Malformed),
        (
            "sub as a number",
            with(&|c| c["sub"] = json!(42)),
            TokenError::ClaimType("sub"),
        ),
    ];
    for (what, token, want) in &cases {
        let got = auth.verify(token).await.map(|_| ());
        assert_eq!(got, Err(*want), "{what}");
    }
    // The PEM issuer (RS256 only) refuses the confused token as well.
    assert_eq!(
        pem_auth.verify(&confused).await.map(|_| ()),
        Err(TokenError::Algorithm)
    );
    // A token within the leeway is still fine.
    let late = with(&|c| c["exp"] = json!(now() - 2));
    assert!(auth.verify(&late).await.is_ok());
}

fn stream(authorize: Option<Authorize>, public: bool) -> StreamConfig {
    let mut s = crate::config::parse(
        std::path::Path::new("s.toml"),
        "[[streams]]\npath = \"/a\"\nview = \"v\"\n",
    )
    .expect("valid")
    .streams[0]
        .as_ref()
        .clone();
    s.authorize = authorize;
    s.public = public;
    s
}

#[tokio::test]
async fn streams_admit_by_their_rules() {
    let dir = tempfile::tempdir().expect("dir");
    let auth = standard(&dir).await;
    let rule = |claim: &str, any_of: &[&str]| {
        Some(Authorize {
            claim: claim.into(),
            any_of: any_of.iter().map(|s| s.to_string()).collect(),
        })
    };
    let token = sign(Algorithm::RS256, Some("rsa1"), &rsa1(), &claims(ISS));
    let open = stream(None, false);
    assert!(auth
        .admit(&open, Some(&token))
        .await
        .expect("admitted")
        .is_some());
    assert_eq!(
        auth.admit(&open, None).await.map(|_| ()),
        Err(Denial::Missing)
    );
    assert_eq!(
        auth.admit(&open, Some("junk")).await.map(|_| ()),
        Err(Denial::Invalid(TokenError::Malformed))
    );
    assert!(auth
        .admit(&stream(None, true), None)
        .await
        .expect("public")
        .is_none());
    // An array claim holding a value, a scalar equal to one, nested pointers.
    for (claim, any_of, ok) in [
        ("/roles", &["ops", "admin"][..], true),
        ("/roles", &["admin"][..], false),
        ("/sub", &["alice"][..], true),
        ("/sub", &["bob"][..], false),
        ("/missing", &["x"][..], false),
        // A value that looks like a claim reference is a literal.
        ("/sub", &["{sub}", "/sub"][..], false),
    ] {
        let got = auth
            .admit(&stream(rule(claim, any_of), false), Some(&token))
            .await;
        assert_eq!(got.is_ok(), ok, "{claim} {any_of:?}");
        if !ok {
            assert_eq!(got.map(|_| ()), Err(Denial::Forbidden));
        }
    }
    let mut nested = claims(ISS);
    nested["https://example.com/claims"] = json!({"tenant": ["t1"]});
    let token = sign(Algorithm::RS256, Some("rsa1"), &rsa1(), &nested);
    let s = stream(
        rule("/https:~1~1example.com~1claims/tenant", &["t1"]),
        false,
    );
    assert!(auth.admit(&s, Some(&token)).await.is_ok());
}

#[tokio::test]
async fn tokens_come_from_the_configured_sources_in_order() {
    let dir = tempfile::tempdir().expect("dir");
    let auth = standard(&dir).await;
    let headers = |h: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            h.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_bytes())
        }
    };
    let bearer = headers(&[
        ("authorization", "Bearer abc.def.ghi"),
        ("cookie", "tailgate_token=from-cookie"),
    ]);
    assert_eq!(
        auth.token(bearer, Some("access_token=q")).as_deref(),
        Some("abc.def.ghi")
    );
    let cookie = headers(&[("cookie", "other=1; tailgate_token=from-cookie; x=2")]);
    assert_eq!(auth.token(cookie, None).as_deref(), Some("from-cookie"));
    assert_eq!(
        auth.token(headers(&[]), Some("a=1&access_token=q%2Eq"))
            .as_deref(),
        Some("q.q")
    );
    assert_eq!(
        auth.token(headers(&[("authorization", "Basic xyz")]), None),
        None
    );
    assert_eq!(auth.token(headers(&[]), Some("token=zz")), None);
    // Without a query source, a query token is not even looked at.
    let header_only = Auth {
        mode: AuthMode::Jwt,
        sources: vec![TokenSource::Header],
        leeway: Duration::ZERO,
        issuers: HashMap::new(),
    };
    assert_eq!(
        header_only.token(headers(&[]), Some("access_token=q")),
        None
    );
}

#[tokio::test]
async fn a_rotated_jwks_file_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("jwks.json");
    std::fs::copy(fixture("jwks1.json"), &path).expect("copy");
    let auth = auth(vec![issuer(
        ISS,
        &[Algorithm::RS256],
        KeySource::JwksFile(path.clone()),
    )])
    .await;
    let old = sign(Algorithm::RS256, Some("rsa1"), &rsa1(), &claims(ISS));
    let new = sign(
        Algorithm::RS256,
        Some("rsa2"),
        &EncodingKey::from_rsa_pem(&pem("rsa2.key.pem")).expect("rsa2"),
        &claims(ISS),
    );
    assert!(auth.verify(&old).await.is_ok());
    assert_eq!(
        auth.verify(&new).await.map(|_| ()),
        Err(TokenError::UnknownKey)
    );
    // A half-written file keeps the last good keys.
    std::fs::write(&path, "{\"keys\": [").expect("write");
    tokio::time::sleep(FILE_POLL_WAIT).await;
    assert!(auth.verify(&old).await.is_ok(), "kept the last good keys");
    std::fs::copy(fixture("jwks2.json"), &path).expect("rotate");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while auth.verify(&new).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotation was never seen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        auth.verify(&old).await.map(|_| ()),
        Err(TokenError::UnknownKey)
    );
}

/// Longer than the JWKS file poll, for the one check that something did not change.
const FILE_POLL_WAIT: Duration = Duration::from_millis(2500);

/// Moves the clock past the refetch floor without waiting for it.
async fn past_the_floor() {
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(31)).await;
    tokio::time::resume();
}

/// A JWKS server on loopback that counts its requests and serves what it is told.
struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    body: Arc<std::sync::Mutex<(u16, String)>>,
}

impl JwksServer {
    async fn start(body: &str) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
        let hits = Arc::new(AtomicUsize::new(0));
        let body = Arc::new(std::sync::Mutex::new((200, body.to_string())));
        let (h, b) = (Arc::clone(&hits), Arc::clone(&body));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (h, b) = (Arc::clone(&h), Arc::clone(&b));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let (status, text) = b.lock().expect("body").clone();
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        JwksServer { url, hits, body }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn serve(&self, status: u16, body: &str) {
        *self.body.lock().expect("body") = (status, body.to_string());
    }
}

#[tokio::test]
async fn a_jwks_url_is_refetched_at_most_every_30s_for_unknown_kids() {
    let jwks1 = std::fs::read_to_string(fixture("jwks1.json")).expect("jwks1");
    let jwks2 = std::fs::read_to_string(fixture("jwks2.json")).expect("jwks2");
    let server = JwksServer::start(&jwks1).await;
    let auth = auth(vec![issuer(
        ISS,
        &[Algorithm::RS256],
        KeySource::JwksUrl {
            url: server.url.clone(),
            refresh: Duration::from_secs(3600),
        },
    )])
    .await;
    assert_eq!(server.hits(), 1, "fetched at start");
    let old = sign(Algorithm::RS256, Some("rsa1"), &rsa1(), &claims(ISS));
    assert!(auth.verify(&old).await.is_ok());
    assert_eq!(server.hits(), 1, "a known kid fetches nothing");

    // Within 30 s of the fetch at start, an unknown kid fetches nothing.
    let stranger = sign(Algorithm::RS256, Some("stranger"), &rsa1(), &claims(ISS));
    assert_eq!(
        auth.verify(&stranger).await.map(|_| ()),
        Err(TokenError::UnknownKey)
    );
    assert_eq!(server.hits(), 1, "at most one fetch per 30 s");
    past_the_floor().await;

    // The identity provider rotates; a burst of tokens with the new kid makes one
    // fetch, which finds it.
    server.serve(200, &jwks2);
    let new = sign(
        Algorithm::RS256,
        Some("rsa2"),
        &EncodingKey::from_rsa_pem(&pem("rsa2.key.pem")).expect("rsa2"),
        &claims(ISS),
    );
    let burst = (0..10).map(|_| auth.verify(&new));
    for got in futures::future::join_all(burst).await {
        assert!(got.is_ok());
    }
    assert_eq!(server.hits(), 2, "one fetch for the burst");

    // Unknown kids within 30 s of a fetch fetch nothing more.
    for _ in 0..5 {
        assert_eq!(
            auth.verify(&stranger).await.map(|_| ()),
            Err(TokenError::UnknownKey)
        );
    }
    assert_eq!(server.hits(), 2, "at most one fetch per 30 s");

    // Past 30 s, a failed fetch keeps the last good keys.
    past_the_floor().await;
    server.serve(500, "oops");
    assert_eq!(
        auth.verify(&stranger).await.map(|_| ()),
        Err(TokenError::UnknownKey)
    );
    assert_eq!(server.hits(), 3);
    assert!(auth.verify(&new).await.is_ok(), "the last good keys stay");
}
