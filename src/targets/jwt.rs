//! `backend = "token-jwt:KEYFILE"`: websockify's `JWTTokenApi`. The token is a JWS whose
//! claims hold `host` and `port`; `nbf` and `exp`, when present, are checked (no leeway, as
//! websockify). KEYFILE is a PEM public key — RSA (RS256/384/512, PS256/384/512) or EC
//! (ES256 for P-256, ES384 for P-384) — or, for HS256/384/512, a file whose text is the key as
//! websockify reads it: base64url of the key bytes (jwcrypto's `import_key(k=…, kty="oct")`),
//! trailing whitespace ignored (a file saved with a final newline breaks websockify; not
//! wsgate). The key fixes the algorithm family: no `none`, no HS with a public key.
//! Invalid, expired, not-yet-valid, claim-less and encrypted (JWE) tokens are refused like
//! unknown ones (404); the reason is logged, the token never.

use std::path::Path;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::{target, LookupError};

/// A key and the algorithms it may verify.
pub struct JwtKey {
    key: DecodingKey,
    validation: Validation,
    /// "RSA", "EC" or "HMAC", for logs.
    kind: &'static str,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtKey({})", self.kind)
    }
}

impl JwtKey {
    /// Reads KEYFILE: a PEM public key, else an HMAC key as base64url text.
    pub fn load(path: &Path) -> Result<JwtKey, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        JwtKey::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<JwtKey, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "the key file is not text")?;
        let (key, algorithms, kind): (DecodingKey, &[Algorithm], &'static str) =
            if text.contains("-----BEGIN") {
                if text.contains("PRIVATE KEY") {
                    return Err("give the public key, not the private one".into());
                }
                if let Ok(k) = DecodingKey::from_rsa_pem(bytes) {
                    (
                        k,
                        &[
                            Algorithm::RS256,
                            Algorithm::RS384,
                            Algorithm::RS512,
                            Algorithm::PS256,
                            Algorithm::PS384,
                            Algorithm::PS512,
                        ],
                        "RSA",
                    )
                } else if let Ok(k) = DecodingKey::from_ec_pem(bytes) {
                    (k, &[Algorithm::ES256, Algorithm::ES384], "EC")
                } else {
                    return Err("not an RSA or EC public key in PEM".into());
                }
            } else {
                let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(text.trim_end().trim_end_matches('='))
                    .map_err(|_| {
                        "an HMAC key file holds base64url text (as websockify's jwcrypto reads it)"
                    })?;
                if secret.is_empty() {
                    return Err("the HMAC key is empty".into());
                }
                (
                    DecodingKey::from_secret(&secret),
                    &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                    "HMAC",
                )
            };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.to_vec();
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = 0;
        Ok(JwtKey {
            key,
            validation,
            kind,
        })
    }

    /// The target a token names, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<String, LookupError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.split('.').count() == 5 {
            return Err(LookupError::Refused("an encrypted token (JWE)"));
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map_err(|e| {
                LookupError::Refused(match e.kind() {
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not valid yet",
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        "an algorithm this key does not verify"
                    }
                    _ => "not a valid signed token",
                })
            })?;
        claims_target(&data.claims)
    }
}

/// `host` and `port` from verified claims (the port a number or a string).
pub fn claims_target(claims: &serde_json::Value) -> Result<String, LookupError> {
    let host = claims
        .get("host")
        .and_then(serde_json::Value::as_str)
        .ok_or(LookupError::Refused("no host claim"))?;
    let port = match claims.get("port") {
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => return Err(LookupError::Refused("no port claim")),
    };
    target(host, &port).ok_or(LookupError::Refused("host and port are not a target"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn hmac_keys_as_websockify_reads_them_final_newline_included() {
        let secret = b"a shared secret of some length!!";
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret) + "\n";
        let key = JwtKey::from_bytes(text.as_bytes()).unwrap();
        let sign = |alg, claims: serde_json::Value| {
            encode(
                &Header::new(alg),
                &claims,
                &EncodingKey::from_secret(secret),
            )
            .unwrap()
        };
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let t = sign(alg, json!({"host": "10.0.0.1", "port": 5901}));
            assert_eq!(key.verify(&t), Ok("10.0.0.1:5901".into()), "{alg:?}");
        }
        let t = sign(
            Algorithm::HS256,
            json!({"host": "vm", "port": "5902", "exp": now() + 60}),
        );
        assert_eq!(key.verify(&t), Ok("vm:5902".into()));
        for (claims, why) in [
            (
                json!({"host": "vm", "port": 1, "exp": now() - 5}),
                "expired",
            ),
            (
                json!({"host": "vm", "port": 1, "nbf": now() + 60}),
                "not valid yet",
            ),
            (json!({"port": 1}), "no host claim"),
            (json!({"host": "vm"}), "no port claim"),
            (
                json!({"host": "vm", "port": 70000}),
                "host and port are not a target",
            ),
        ] {
            assert_eq!(
                key.verify(&sign(Algorithm::HS256, claims)),
                Err(LookupError::Refused(why))
            );
        }
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({"host": "vm", "port": 1}),
            &EncodingKey::from_secret(b"another secret"),
        )
        .unwrap();
        assert_eq!(
            key.verify(&other),
            Err(LookupError::Refused("bad signature"))
        );
        // alg "none", a JWE's five parts, garbage.
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"host":"vm","port":1}"#)
        );
        assert!(key.verify(&none).is_err());
        assert_eq!(
            key.verify("a.b.c.d.e"),
            Err(LookupError::Refused("an encrypted token (JWE)"))
        );
        assert!(key.verify("not a token").is_err());
        assert!(JwtKey::from_bytes(b"\n").is_err());
        assert!(JwtKey::from_bytes(
            b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"
        )
        .is_err());
    }
}
