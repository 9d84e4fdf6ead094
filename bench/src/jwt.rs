//! Tokens for the auth scenario: HS256 JWTs with the claims the gateway's
//! `[[auth.issuers]]` entry checks (`iss`, `aud`, `exp`) and a per-client `sub`.

use jsonwebtoken::{crypto::CryptoProvider, encode, Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: String,
    iat: u64,
    exp: u64,
}

/// Signs HS256 tokens with one secret.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    iss: String,
    aud: String,
}

impl Minter {
    pub fn new(secret: &[u8], iss: &str, aud: &str) -> anyhow::Result<Self> {
        // Chosen explicitly: should the workspace ever enable jsonwebtoken's other
        // backend too, the crate could no longer pick one by its features.
        let _ =
            CryptoProvider::install_default(&jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER);
        Ok(Self {
            key: EncodingKey::from_secret(secret)?,
            header: Header::new(Algorithm::HS256),
            iss: iss.into(),
            aud: aud.into(),
        })
    }

    /// A token for `sub`, issued at `now_s` (epoch seconds), valid for `ttl_s`.
    pub fn token(&self, sub: &str, now_s: u64, ttl_s: u64) -> anyhow::Result<String> {
        let claims = Claims {
            iss: &self.iss,
            aud: &self.aud,
            sub: sub.to_string(),
            iat: now_s,
            exp: now_s + ttl_s,
        };
        Ok(encode(&self.header, &claims, &self.key)?)
    }
}

/// A secret of 32 random bytes from the kernel, hex-encoded (an environment variable
/// holds it as text; the gateway uses the text's bytes as the HMAC key).
pub fn random_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    #[derive(serde::Deserialize)]
    struct Back {
        iss: String,
        sub: String,
        exp: u64,
    }

    #[test]
    fn tokens_verify_with_the_secret_issuer_and_audience() {
        let m = Minter::new(b"s3cret", "https://bench.example/", "tailgate").unwrap();
        let now = crate::sys::now_ms() / 1000;
        let a = m.token("client-0", now, 3600).unwrap();
        let b = m.token("client-1", now, 3600).unwrap();
        assert_ne!(a, b, "every client gets its own token");
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&["https://bench.example/"]);
        v.set_audience(&["tailgate"]);
        let back = decode::<Back>(&a, &DecodingKey::from_secret(b"s3cret").unwrap(), &v).unwrap();
        assert_eq!(back.claims.iss, "https://bench.example/");
        assert_eq!(back.claims.sub, "client-0");
        assert_eq!(back.claims.exp, now + 3600);
        assert!(decode::<Back>(&a, &DecodingKey::from_secret(b"other").unwrap(), &v).is_err());
        v.set_audience(&["someone-else"]);
        assert!(decode::<Back>(&a, &DecodingKey::from_secret(b"s3cret").unwrap(), &v).is_err());
    }

    #[test]
    fn secrets_are_random_hex() {
        let (a, b) = (random_secret().unwrap(), random_secret().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
