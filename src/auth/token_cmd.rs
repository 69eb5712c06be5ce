//! `im-server token --sub alice [--ttl-s 3600] [--chats room1,room2]`: mints
//! a token with the configured secret (`--auth-jwt-secret-file` or
//! `IM_AUTH_JWT_SECRET_FILE`; HS256) or an Ed25519 private key
//! (`--private-key-file`; EdDSA), and `--auth-issuer` / `--auth-audience` if
//! set, for development and tests.

use serde_json::json;

use super::jwt;

/// Shortest accepted HS256 key: RFC 7518 §3.2 requires at least the hash
/// size (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// Reads an HS256 secret; one trailing newline (as `echo` writes) is not part of it.
pub fn load_secret(path: &str) -> Result<Vec<u8>, String> {
    let mut secret = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    if secret.ends_with(b"\n") {
        secret.pop();
        if secret.ends_with(b"\r") {
            secret.pop();
        }
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{path}: a secret must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2 for HS256), got {}",
            secret.len()
        ));
    }
    Ok(secret)
}

pub const USAGE: &str = "Usage: im-server token --sub USER [--ttl-s SECONDS (3600)] [--chats ROOM,ROOM...]\n\
    \x20      [--auth-jwt-secret-file PATH | --private-key-file PATH] [--auth-issuer ISS] [--auth-audience AUD]\n\
    Prints an HS256 token signed with the secret (flag or IM_AUTH_JWT_SECRET_FILE), or with\n\
    --private-key-file (Ed25519, PEM PKCS #8: openssl genpkey -algorithm ed25519) an EdDSA one.\n";

/// The token for `args` (after `token`), with `env` for defaults and `now`
/// in seconds since the Unix epoch.
pub fn mint_from_args(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
    now: i64,
) -> Result<String, String> {
    let mut sub = None;
    let mut ttl: i64 = 3600;
    let mut chats: Option<Vec<String>> = None;
    let mut secret_file = env("IM_AUTH_JWT_SECRET_FILE").filter(|v| !v.is_empty());
    let mut issuer = env("IM_AUTH_ISSUER").filter(|v| !v.is_empty());
    let mut audience = env("IM_AUTH_AUDIENCE").filter(|v| !v.is_empty());
    let mut private_key_file = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--sub" => sub = Some(value()?),
            "--ttl-s" => {
                ttl = value()?
                    .parse()
                    .ok()
                    .filter(|&t: &i64| t > 0)
                    .ok_or("--ttl-s must be a positive integer")?
            }
            "--chats" => chats = Some(value()?.split(',').map(String::from).collect()),
            "--auth-jwt-secret-file" => secret_file = Some(value()?),
            "--private-key-file" => private_key_file = Some(value()?),
            "--auth-issuer" => issuer = Some(value()?),
            "--auth-audience" => audience = Some(value()?),
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    let sub = sub
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("--sub is required\n{USAGE}"))?;
    let mut claims = json!({ "sub": sub, "iat": now, "exp": now + ttl });
    if let Some(chats) = chats {
        claims["chats"] = json!(chats);
    }
    if let Some(iss) = issuer {
        claims["iss"] = json!(iss);
    }
    if let Some(aud) = audience {
        claims["aud"] = json!(aud);
    }
    if let Some(path) = private_key_file {
        return Ok(jwt::mint_eddsa(&jwt::load_private_key(&path)?, &claims));
    }
    let path = secret_file.ok_or(
        "no key: give --auth-jwt-secret-file (or IM_AUTH_JWT_SECRET_FILE) or --private-key-file",
    )?;
    Ok(jwt::mint(&load_secret(&path)?, &claims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Validation;

    #[test]
    fn minted_tokens_verify_with_the_same_secret() {
        let dir = std::env::temp_dir().join(format!("im-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("secret");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").expect("write secret");
        let args = ["--sub", "alice", "--chats", "r1,r2", "--ttl-s=60"].map(String::from);
        let path_str = path.to_string_lossy().to_string();
        let env = |k: &str| (k == "IM_AUTH_JWT_SECRET_FILE").then(|| path_str.clone());
        let token = mint_from_args(args, env, 1_000).expect("minted");
        let rules = Validation {
            secret: Some(b"0123456789abcdef0123456789abcdef".to_vec()),
            public_key: None,
            issuer: None,
            audience: None,
            leeway_s: 0,
        };
        let claims = jwt::verify(&token, &rules, 1_059).expect("valid for its ttl");
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.chats, Some(vec!["r1".into(), "r2".into()]));
        assert!(
            jwt::verify(&token, &rules, 1_061).is_err(),
            "expired after its ttl"
        );

        std::fs::write(&path, "short\n").expect("write secret");
        assert!(mint_from_args(["--sub", "a"].map(String::from), env, 0).is_err());
        assert!(
            mint_from_args(Vec::new(), env, 0).is_err(),
            "--sub is required"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
