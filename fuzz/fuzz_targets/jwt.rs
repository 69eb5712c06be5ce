//! The Authorization header and JWT parser (src/auth).
//!
//! Input layout: `[mode, bytes...]`.
//!
//! Checked:
//! * no panic on any header value or token;
//! * a token accepted by `verify` re-verifies with the same claims, and
//!   fails once any one byte of it is changed (the signature covers
//!   everything but itself, and the signature is checked exactly);
//! * mode 1 mints a token from the fuzz bytes as `sub` and checks that it
//!   verifies to exactly that `sub`.

#![no_main]

use im_server::auth::{Validation, base64url, jwt};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_795_800_000;

fn rules() -> Validation {
    // Both algorithms on: fuzzed tokens reach the HMAC and the Ed25519 checks.
    Validation {
        secret: Some(b"fuzz secret".to_vec()),
        public_key: Some(ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]).verifying_key()),
        issuer: None,
        audience: None,
        leeway_s: 30,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let rules = rules();
    if mode % 2 == 1 {
        let sub = String::from_utf8_lossy(rest);
        let token = jwt::mint(b"fuzz secret", &serde_json::json!({"sub": sub, "exp": NOW + 60}));
        match jwt::verify(&token, &rules, NOW) {
            Ok(claims) => assert_eq!(claims.sub, sub),
            Err(_) => assert!(sub.is_empty(), "a minted token must verify"),
        }
        return;
    }
    let _ = jwt::bearer_token(rest);
    let _ = base64url::decode(rest);
    let Ok(token) = std::str::from_utf8(rest) else {
        return;
    };
    if let Ok(claims) = jwt::verify(token, &rules, NOW) {
        assert_eq!(jwt::verify(token, &rules, NOW), Ok(claims));
        let mut changed = token.as_bytes().to_vec();
        let at = token.len() / 2;
        changed[at] ^= 1;
        if let Ok(changed) = std::str::from_utf8(&changed) {
            assert!(jwt::verify(changed, &rules, NOW).is_err(), "a changed token verified");
        }
    }
});
