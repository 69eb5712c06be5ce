//! JSON Web Tokens (RFC 7519) signed with HS256 (RFC 7518 §3.2) or EdDSA
//! over Ed25519 (RFC 8037): parsing, verification and minting, with no I/O
//! and no clock of its own (`now` is passed in, so the rules are testable).
//!
//! The algorithm is an allow-list, checked before the signature, and each
//! algorithm is tied to its own kind of key: `HS256` is accepted only when
//! an HMAC secret is configured and is checked with that secret alone,
//! `EdDSA` only when an Ed25519 public key is. So `none` and algorithm
//! confusion (an HMAC keyed with the public key's bytes, a token claiming
//! the other algorithm) cannot pass. An HMAC is compared in constant time
//! (`hmac`'s `verify_slice`); Ed25519 signatures are verified strictly
//! (`verify_strict`: no small-order keys, no malleable encodings).

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::base64url;

type HmacSha256 = Hmac<Sha256>;

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone)]
pub struct Validation {
    /// HS256's key; `None` = HS256 tokens are refused.
    pub secret: Option<Vec<u8>>,
    /// EdDSA's (Ed25519) public key; `None` = EdDSA tokens are refused.
    pub public_key: Option<VerifyingKey>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required member of `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_s: i64,
}

/// The verified identity a token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user (`sub`).
    pub sub: String,
    /// `chats`: the rooms the token is limited to; `None` = not limited.
    pub chats: Option<Vec<String>>,
    /// The last second the token is accepted in (`exp` plus the leeway),
    /// in seconds since the Unix epoch: what ends a stream opened with it.
    pub until: i64,
    /// `"admin": true`: may delete anyone's message (not edit it).
    pub admin: bool,
}

impl Claims {
    /// Whether the `chats` claim lets this token use `chat`.
    pub fn allows_chat(&self, chat: &str) -> bool {
        match &self.chats {
            None => true,
            Some(chats) => chats.iter().any(|c| c == "*" || c == chat),
        }
    }
}

/// Why a token was refused (for logs and the error message; every variant
/// is a 401 `invalid_token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed(&'static str),
    Algorithm,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
}

impl TokenError {
    pub fn describe(self) -> &'static str {
        match self {
            TokenError::Malformed(why) => why,
            TokenError::Algorithm => "the token's algorithm is not one this server accepts",
            TokenError::Signature => "the token's signature does not verify",
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet",
            TokenError::Issuer => "the token's issuer is not accepted",
            TokenError::Audience => "the token is not meant for this service",
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    /// RFC 7515 §4.1.11: extensions we do not understand must be refused.
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Payload {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iss: Option<String>,
    aud: Option<Audience>,
    chats: Option<Vec<String>>,
    /// Any JSON: only `true` makes an admin (a token is not refused for
    /// another value here).
    admin: Option<serde_json::Value>,
}

fn segment<'a>(parts: &mut std::str::Split<'a, char>) -> Result<&'a str, TokenError> {
    parts.next().ok_or(TokenError::Malformed(
        "a token has three dot-separated parts",
    ))
}

fn decode_json<T: serde::de::DeserializeOwned>(
    b64: &str,
    what: &'static str,
) -> Result<T, TokenError> {
    let raw = base64url::decode(b64.as_bytes()).ok_or(TokenError::Malformed(what))?;
    serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed(what))
}

/// Verifies `token` at `now` (seconds since the Unix epoch).
pub fn verify(token: &str, rules: &Validation, now: i64) -> Result<Claims, TokenError> {
    verify_with_window(token, rules, now).map(|(claims, _)| claims)
}

/// When a verified token is acceptable, in seconds since the Unix epoch,
/// the leeway included: `not_before ..= until`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub not_before: f64,
    pub until: f64,
}

impl Window {
    pub fn contains(&self, now: i64) -> bool {
        let now = now as f64;
        self.not_before <= now && now <= self.until
    }
}

/// [`verify`], also telling for how long the claims hold (to cache them).
pub fn verify_with_window(
    token: &str,
    rules: &Validation,
    now: i64,
) -> Result<(Claims, Window), TokenError> {
    let mut parts = token.split('.');
    let (header_b64, payload_b64, sig_b64) = (
        segment(&mut parts)?,
        segment(&mut parts)?,
        segment(&mut parts)?,
    );
    if parts.next().is_some() {
        return Err(TokenError::Malformed(
            "a token has three dot-separated parts",
        ));
    }
    let header: Header = decode_json(header_b64, "the token header is not base64url JSON")?;
    let key = match (header.alg.as_str(), &rules.secret, &rules.public_key) {
        ("HS256", Some(secret), _) => Key::Hmac(secret),
        ("EdDSA", _, Some(public_key)) => Key::Ed25519(public_key),
        _ => return Err(TokenError::Algorithm),
    };
    if header.crit.is_some() {
        return Err(TokenError::Malformed("the token has critical extensions"));
    }
    let signature = base64url::decode(sig_b64.as_bytes()).ok_or(TokenError::Malformed(
        "the token signature is not base64url",
    ))?;
    let signed_len = header_b64.len() + 1 + payload_b64.len();
    key.verify(&token.as_bytes()[..signed_len], &signature)?;
    // Only a signed payload is worth parsing.
    let payload: Payload = decode_json(payload_b64, "the token claims are not base64url JSON")?;
    check_claims(payload, rules, now)
}

/// The key a token's algorithm selected.
enum Key<'a> {
    Hmac(&'a [u8]),
    Ed25519(&'a VerifyingKey),
}

impl Key<'_> {
    fn verify(&self, signed: &[u8], signature: &[u8]) -> Result<(), TokenError> {
        match self {
            Key::Hmac(secret) => {
                let mut mac =
                    HmacSha256::new_from_slice(secret).map_err(|_| TokenError::Signature)?;
                mac.update(signed);
                mac.verify_slice(signature)
                    .map_err(|_| TokenError::Signature)
            }
            Key::Ed25519(key) => {
                let signature = ed25519_dalek::Signature::from_slice(signature)
                    .map_err(|_| TokenError::Signature)?;
                key.verify_strict(signed, &signature)
                    .map_err(|_| TokenError::Signature)
            }
        }
    }
}

/// Reads an Ed25519 public key: PEM, `-----BEGIN PUBLIC KEY-----`
/// (SubjectPublicKeyInfo, what `openssl pkey -pubout` writes).
pub fn load_public_key(path: &str) -> Result<VerifyingKey, String> {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| {
        format!("{path}: not an Ed25519 public key in PEM (SubjectPublicKeyInfo): {e}")
    })
}

/// Reads an Ed25519 private key: PEM, `-----BEGIN PRIVATE KEY-----` (PKCS #8,
/// what `openssl genpkey -algorithm ed25519` writes).
pub fn load_private_key(path: &str) -> Result<SigningKey, String> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    SigningKey::from_pkcs8_pem(pem.trim())
        .map_err(|e| format!("{path}: not an Ed25519 private key in PEM (PKCS #8): {e}"))
}

/// Signs `claims` (a JSON object) with EdDSA (Ed25519).
pub fn mint_eddsa(key: &SigningKey, claims: &serde_json::Value) -> String {
    let signing_input = format!(
        "{}.{}",
        base64url::encode(br#"{"alg":"EdDSA","typ":"JWT"}"#),
        base64url::encode(claims.to_string().as_bytes())
    );
    let signature = key.sign(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        base64url::encode(&signature.to_bytes())
    )
}

fn check_claims(
    payload: Payload,
    rules: &Validation,
    now: i64,
) -> Result<(Claims, Window), TokenError> {
    let now = now as f64;
    let leeway = rules.leeway_s as f64;
    // Tokens without an expiry are refused: a leaked one would be valid forever.
    let exp = payload
        .exp
        .ok_or(TokenError::Malformed("the token has no `exp` claim"))?;
    if now > exp + leeway {
        return Err(TokenError::Expired);
    }
    if payload.nbf.is_some_and(|nbf| now + leeway < nbf) {
        return Err(TokenError::NotYetValid);
    }
    if let Some(issuer) = &rules.issuer
        && payload.iss.as_deref() != Some(issuer.as_str())
    {
        return Err(TokenError::Issuer);
    }
    if let Some(audience) = &rules.audience {
        let ok = match &payload.aud {
            Some(Audience::One(aud)) => aud == audience,
            Some(Audience::Many(auds)) => auds.iter().any(|a| a == audience),
            None => false,
        };
        if !ok {
            return Err(TokenError::Audience);
        }
    }
    let sub = payload
        .sub
        .filter(|s| !s.is_empty())
        .ok_or(TokenError::Malformed("the token has no `sub` claim"))?;
    let window = Window {
        not_before: payload.nbf.map_or(f64::NEG_INFINITY, |nbf| nbf - leeway),
        until: exp + leeway,
    };
    let claims = Claims {
        sub,
        chats: payload.chats,
        until: window.until.floor() as i64,
        admin: payload.admin == Some(serde_json::Value::Bool(true)),
    };
    Ok((claims, window))
}

/// Signs `claims` (a JSON object) with HS256.
pub fn mint(secret: &[u8], claims: &serde_json::Value) -> String {
    sign_with_header(r#"{"alg":"HS256","typ":"JWT"}"#, claims, secret)
}

/// A token with any header (`alg` included), HMAC-SHA256-signed with
/// `secret`: [`mint`]'s one step, also what tests forge tokens with.
pub fn sign_with_header(header: &str, claims: &serde_json::Value, secret: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        base64url::encode(header.as_bytes()),
        base64url::encode(claims.to_string().as_bytes())
    );
    let signature = sign(secret, signing_input.as_bytes());
    format!("{signing_input}.{}", base64url::encode(&signature))
}

fn sign(secret: &[u8], input: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return Vec::new(),
    };
    mac.update(input);
    mac.finalize().into_bytes().to_vec()
}

/// The token of an `Authorization` header value: scheme `Bearer`
/// (case-insensitive, RFC 9110 §11.1), one space, a token68 (RFC 6750 §2.1).
pub fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim_start_matches(' ');
    let token68 = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    (!token.is_empty() && token.chars().all(token68)).then_some(token)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_795_800_000;

    fn rules() -> Validation {
        Validation {
            secret: Some(b"test secret".to_vec()),
            public_key: None,
            issuer: None,
            audience: None,
            leeway_s: 30,
        }
    }

    fn token(claims: serde_json::Value) -> String {
        mint(b"test secret", &claims)
    }

    #[test]
    fn a_valid_token_yields_its_subject_and_chats() {
        let t = token(json!({"sub": "alice", "exp": NOW + 60, "chats": ["r1", "r2"]}));
        let claims = verify(&t, &rules(), NOW).expect("valid");
        assert_eq!(claims.sub, "alice");
        assert!(claims.allows_chat("r1") && !claims.allows_chat("r3"));
        let t = token(json!({"sub": "bob", "exp": NOW + 60, "chats": ["*"]}));
        assert!(
            verify(&t, &rules(), NOW)
                .expect("valid")
                .allows_chat("anything")
        );
    }

    #[test]
    fn time_claims_with_leeway() {
        let expired = token(json!({"sub": "a", "exp": NOW - 31}));
        assert_eq!(verify(&expired, &rules(), NOW), Err(TokenError::Expired));
        let within_leeway = token(json!({"sub": "a", "exp": NOW - 29}));
        assert!(verify(&within_leeway, &rules(), NOW).is_ok());
        let early = token(json!({"sub": "a", "exp": NOW + 600, "nbf": NOW + 31}));
        assert_eq!(verify(&early, &rules(), NOW), Err(TokenError::NotYetValid));
        let no_exp = token(json!({"sub": "a"}));
        assert!(matches!(
            verify(&no_exp, &rules(), NOW),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn only_hs256_with_the_right_key_passes() {
        let claims = json!({"sub": "a", "exp": NOW + 60});
        let good = sign_with_header(r#"{"alg":"HS256"}"#, &claims, b"test secret");
        assert!(verify(&good, &rules(), NOW).is_ok());
        let other_key = sign_with_header(r#"{"alg":"HS256"}"#, &claims, b"another secret");
        assert_eq!(
            verify(&other_key, &rules(), NOW),
            Err(TokenError::Signature)
        );
        // A public key's bytes used as the HMAC key: still just a wrong key.
        let pem = b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA...\n-----END PUBLIC KEY-----\n";
        let confused = sign_with_header(r#"{"alg":"HS256"}"#, &claims, pem);
        assert_eq!(verify(&confused, &rules(), NOW), Err(TokenError::Signature));
        for alg in ["none", "None", "HS512", "RS256", "ES256", "EdDSA"] {
            let t = sign_with_header(&format!(r#"{{"alg":"{alg}"}}"#), &claims, b"test secret");
            assert_eq!(
                verify(&t, &rules(), NOW),
                Err(TokenError::Algorithm),
                "{alg}"
            );
        }
        // alg none with an empty signature.
        let unsigned = format!(
            "{}.{}.",
            base64url::encode(br#"{"alg":"none"}"#),
            base64url::encode(claims.to_string().as_bytes())
        );
        assert_eq!(verify(&unsigned, &rules(), NOW), Err(TokenError::Algorithm));
        let crit = sign_with_header(r#"{"alg":"HS256","crit":["x"]}"#, &claims, b"test secret");
        assert!(matches!(
            verify(&crit, &rules(), NOW),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let t = token(json!({"sub": "alice", "exp": NOW + 60}));
        let forged_payload = base64url::encode(
            json!({"sub": "mallory", "exp": NOW + 60})
                .to_string()
                .as_bytes(),
        );
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[1] = &forged_payload;
        assert_eq!(
            verify(&parts.join("."), &rules(), NOW),
            Err(TokenError::Signature)
        );
    }

    #[test]
    fn malformed_tokens_are_refused_not_panicked_on() {
        let t = token(json!({"sub": "a", "exp": NOW + 60}));
        let (head, rest) = t.split_once('.').expect("dots");
        let cases = [
            String::new(),
            "a.b".into(),
            "a.b.c.d".into(),
            format!("{t}."),
            format!("!!.{rest}"),
            format!("{}.{rest}", base64url::encode(b"not json")),
            format!("{head}.{}", rest.replace('.', ".=")),
            t.replace('.', ".."),
        ];
        for case in cases {
            assert!(verify(&case, &rules(), NOW).is_err(), "{case:?}");
        }
        let no_sub = token(json!({"exp": NOW + 60}));
        assert!(verify(&no_sub, &rules(), NOW).is_err());
        let empty_sub = token(json!({"sub": "", "exp": NOW + 60}));
        assert!(verify(&empty_sub, &rules(), NOW).is_err());
        let wrong_types = token(json!({"sub": 7, "exp": "soon"}));
        assert!(verify(&wrong_types, &rules(), NOW).is_err());
    }

    #[test]
    fn issuer_and_audience() {
        let mut r = rules();
        r.issuer = Some("https://idp".into());
        r.audience = Some("im".into());
        let ok =
            token(json!({"sub": "a", "exp": NOW + 60, "iss": "https://idp", "aud": ["x", "im"]}));
        assert!(verify(&ok, &r, NOW).is_ok());
        let ok = token(json!({"sub": "a", "exp": NOW + 60, "iss": "https://idp", "aud": "im"}));
        assert!(verify(&ok, &r, NOW).is_ok());
        let bad_iss =
            token(json!({"sub": "a", "exp": NOW + 60, "iss": "https://evil", "aud": "im"}));
        assert_eq!(verify(&bad_iss, &r, NOW), Err(TokenError::Issuer));
        let bad_aud =
            token(json!({"sub": "a", "exp": NOW + 60, "iss": "https://idp", "aud": "other"}));
        assert_eq!(verify(&bad_aud, &r, NOW), Err(TokenError::Audience));
        let no_aud = token(json!({"sub": "a", "exp": NOW + 60, "iss": "https://idp"}));
        assert_eq!(verify(&no_aud, &r, NOW), Err(TokenError::Audience));
    }

    #[test]
    fn bearer_header_values() {
        assert_eq!(bearer_token(b"Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer_token(b"bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer a b"), None);
        assert_eq!(bearer_token(b"Bearer \xff"), None);
    }

    /// RFC 8032 §7.1, test 1: the secret key and its public key.
    fn rfc8032_keys() -> (SigningKey, VerifyingKey) {
        let secret = hex32("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let signing = SigningKey::from_bytes(&secret);
        let public = hex32("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let verifying = signing.verifying_key();
        assert_eq!(verifying.to_bytes(), public);
        (signing, verifying)
    }

    fn hex32(hex: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
        }
        out
    }

    #[test]
    fn eddsa_tokens_verify_only_with_their_key_and_only_when_configured() {
        let (signing, public) = rfc8032_keys();
        let claims = json!({"sub": "ed", "exp": NOW + 60});
        let eddsa = mint_eddsa(&signing, &claims);
        let only_key = Validation {
            secret: None,
            public_key: Some(public),
            ..rules()
        };
        assert_eq!(
            verify(&eddsa, &only_key, NOW).map(|c| c.sub),
            Ok("ed".into())
        );
        // Not accepted where no public key is configured, HS256 not where no secret is.
        assert_eq!(verify(&eddsa, &rules(), NOW), Err(TokenError::Algorithm));
        assert_eq!(
            verify(&token(claims.clone()), &only_key, NOW),
            Err(TokenError::Algorithm)
        );
        let both = Validation {
            public_key: Some(public),
            ..rules()
        };
        assert!(
            verify(&eddsa, &both, NOW).is_ok()
                && verify(&token(claims.clone()), &both, NOW).is_ok()
        );
        // Another key's signature, a changed payload, a cut signature.
        let other = SigningKey::from_bytes(&[7u8; 32]);
        assert_eq!(
            verify(&mint_eddsa(&other, &claims), &only_key, NOW),
            Err(TokenError::Signature)
        );
        let (head, sig) = eddsa.rsplit_once('.').expect("three parts");
        let forged_claims = base64url::encode(
            json!({"sub": "root", "exp": NOW + 60})
                .to_string()
                .as_bytes(),
        );
        let header = head.split('.').next().expect("header");
        let forged = format!("{header}.{forged_claims}.{sig}");
        assert_eq!(verify(&forged, &only_key, NOW), Err(TokenError::Signature));
        // 60 bytes, not 64.
        let cut = format!("{head}.{}", &sig[..80]);
        assert_eq!(verify(&cut, &only_key, NOW), Err(TokenError::Signature));
        // HS256 keyed with the public key's bytes: still only the secret checks HS256.
        let confused = sign_with_header(r#"{"alg":"HS256"}"#, &claims, public.as_bytes());
        assert_eq!(verify(&confused, &both, NOW), Err(TokenError::Signature));
    }
}
