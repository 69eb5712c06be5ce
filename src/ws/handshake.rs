//! The opening handshake (RFC 6455 §4.2): which upgrade requests are
//! acceptable, and the `Sec-WebSocket-Accept` that proves the server read
//! the client's key.

use sha1::{Digest, Sha1};

use crate::http::{Method, Request, Version};

/// Appended to the client's key before hashing (§1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Checks an upgrade request; the `Sec-WebSocket-Accept` value to answer
/// with, or why it is refused (a 400).
pub fn accept(req: &Request) -> Result<String, &'static str> {
    if req.method != Method::Get || req.version != Version::Http11 {
        return Err("a WebSocket handshake is a GET over HTTP/1.1");
    }
    if !crate::http::conn::is_websocket_upgrade(req) {
        return Err("this endpoint needs `Upgrade: websocket`");
    }
    let upgrade_token = req.header_values("connection").any(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    if !upgrade_token {
        return Err("a WebSocket handshake needs `Connection: Upgrade`");
    }
    let mut versions = req.header_values("sec-websocket-version");
    if versions.next().map(<[u8]>::trim_ascii) != Some(b"13") || versions.next().is_some() {
        return Err("`Sec-WebSocket-Version: 13` is required");
    }
    let mut keys = req.header_values("sec-websocket-key");
    let key = keys.next().map(<[u8]>::trim_ascii).unwrap_or_default();
    if !is_key(key) || keys.next().is_some() {
        return Err("`Sec-WebSocket-Key` must be 16 bytes in base64, given once");
    }
    Ok(accept_key(key))
}

/// A key is 16 bytes in base64: 22 characters of the alphabet, then `==`
/// (whose last character carries only 4 bits, so its low bits are zero).
fn is_key(key: &[u8]) -> bool {
    let [body @ .., last, b'=', b'='] = key else {
        return false;
    };
    body.len() == 21
        && body
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        && b"AQgw".contains(last)
}

/// `base64(SHA-1(key + GUID))`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    base64(&sha.finalize())
}

/// Standard base64 with padding (RFC 4648 §4): the encoding §4.2.2 names.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::codec::{Limits, RequestDecoder};
    use bytes::BytesMut;

    fn request(head: &str) -> Request {
        let text = format!("GET /api/ws HTTP/1.1\r\nHost: x\r\n{head}\r\n");
        RequestDecoder::new(Limits::default())
            .decode(&mut BytesMut::from(text.as_str()))
            .expect("valid")
            .expect("whole")
    }

    const GOOD: &str = "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    #[test]
    fn the_rfc_example_key_gives_its_accept() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept(&request(GOOD)),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into())
        );
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn handshakes_missing_a_part_are_refused() {
        for (from, to) in [
            ("Upgrade: websocket\r\n", "Upgrade: h2c\r\n"),
            (
                "Connection: keep-alive, Upgrade\r\n",
                "Connection: keep-alive\r\n",
            ),
            (
                "Sec-WebSocket-Version: 13\r\n",
                "Sec-WebSocket-Version: 8\r\n",
            ),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ"),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZR=="),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub2!jZQ=="),
        ] {
            assert!(accept(&request(&GOOD.replace(from, to))).is_err(), "{to}");
        }
        let twice = format!("{GOOD}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
        assert!(accept(&request(&twice)).is_err());
    }
}
