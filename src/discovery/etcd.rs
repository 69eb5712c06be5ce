//! An etcd v3 client over etcd's JSON gateway (`/v3/...`, HTTP/1.1), enough
//! for service registration: leases, put, delete, range and watch by prefix.
//!
//! The pure part is the request bodies and the reading of etcd's JSON
//! replies (keys and values are standard base64 with padding; 64-bit numbers
//! are JSON strings); [`Etcd`] does the I/O, trying each configured endpoint
//! in turn.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::http1::{Exchange, JsonStream};

/// Standard base64 (RFC 4648 alphabet, with `=` padding), as etcd's gateway
/// encodes `bytes` fields.
pub mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(input: &[u8]) -> String {
        let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
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

    fn value(c: u8) -> Option<u32> {
        ALPHABET.iter().position(|&a| a == c).map(|p| p as u32)
    }

    /// `None` on any character outside the alphabet or a bad length.
    pub fn decode(input: &str) -> Option<Vec<u8>> {
        let bytes = input.as_bytes();
        if !bytes.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
        for (index, quad) in bytes.chunks(4).enumerate() {
            let last = index + 1 == bytes.len() / 4;
            let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &c in &quad[..4 - pad] {
                n = (n << 6) | value(c)?;
            }
            n <<= 6 * pad as u32;
            let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&three[..3 - pad]);
        }
        Some(out)
    }
}

/// The first key after every key starting with `prefix` (etcd's `range_end`
/// for a prefix query).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// The bodies of the requests we make.
pub mod request {
    use super::*;

    pub fn grant(ttl_s: u64) -> Value {
        json!({ "TTL": ttl_s })
    }

    pub fn lease(id: i64) -> Value {
        json!({ "ID": id.to_string() })
    }

    pub fn put(key: &[u8], value: &[u8], lease: i64) -> Value {
        json!({
            "key": base64::encode(key),
            "value": base64::encode(value),
            "lease": lease.to_string(),
        })
    }

    pub fn delete(key: &[u8]) -> Value {
        json!({ "key": base64::encode(key) })
    }

    pub fn range_prefix(prefix: &[u8]) -> Value {
        json!({
            "key": base64::encode(prefix),
            "range_end": base64::encode(&prefix_end(prefix)),
        })
    }

    /// A watch of `prefix` from `start_revision` on (inclusive).
    pub fn watch_prefix(prefix: &[u8], start_revision: i64) -> Value {
        json!({ "create_request": {
            "key": base64::encode(prefix),
            "range_end": base64::encode(&prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }})
    }
}

/// etcd encodes int64 as a JSON string; accept a number too.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn bytes_field(v: &Value, name: &str) -> Option<Vec<u8>> {
    match v.get(name) {
        // proto3 JSON leaves empty bytes out.
        None => Some(Vec::new()),
        Some(Value::String(s)) => base64::decode(s),
        Some(_) => None,
    }
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The lease id a grant returned.
pub fn parse_grant(reply: &Value) -> Option<i64> {
    reply.get("ID").and_then(int).filter(|&id| id != 0)
}

/// Whether a keepalive found the lease alive: etcd answers an expired or
/// unknown lease with TTL 0 (left out of the JSON).
pub fn parse_keepalive(reply: &Value) -> bool {
    let result = reply.get("result").unwrap_or(reply);
    result.get("TTL").and_then(int).unwrap_or(0) > 0
}

/// A range reply: the store revision it was read at, and the pairs.
pub fn parse_range(reply: &Value) -> Option<(i64, Vec<KeyValue>)> {
    let revision = reply.get("header")?.get("revision").and_then(int)?;
    let mut pairs = Vec::new();
    if let Some(kvs) = reply.get("kvs") {
        for kv in kvs.as_array()? {
            pairs.push((bytes_field(kv, "key")?, bytes_field(kv, "value")?));
        }
    }
    Some((revision, pairs))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    Created,
    Events(Vec<WatchEvent>),
    /// The watch ended on etcd's side (e.g. the start revision was
    /// compacted): start over from a fresh range.
    Canceled(String),
}

/// One message of the watch stream; `None` if it is not one we understand.
pub fn parse_watch(message: &Value) -> Option<WatchMessage> {
    if let Some(error) = message.get("error") {
        return Some(WatchMessage::Canceled(error.to_string()));
    }
    let result = message.get("result")?;
    if result.get("canceled").and_then(Value::as_bool) == Some(true)
        || result.get("compact_revision").and_then(int).unwrap_or(0) > 0
    {
        let why = result.get("cancel_reason").and_then(Value::as_str);
        return Some(WatchMessage::Canceled(why.unwrap_or("canceled").into()));
    }
    let mut events = Vec::new();
    if let Some(list) = result.get("events") {
        for event in list.as_array()? {
            let kv = event.get("kv")?;
            let key = bytes_field(kv, "key")?;
            // PUT is the enum's zero value, so proto3 JSON leaves it out.
            match event.get("type").and_then(Value::as_str) {
                None | Some("PUT") => {
                    events.push(WatchEvent::Put((key, bytes_field(kv, "value")?)))
                }
                Some("DELETE") => events.push(WatchEvent::Delete(key)),
                Some(_) => return None,
            }
        }
    }
    if events.is_empty() && result.get("created").and_then(Value::as_bool) == Some(true) {
        return Some(WatchMessage::Created);
    }
    Some(WatchMessage::Events(events))
}

/// Where the registry is: `etcd://h1:2379,h2:2379/im/rpc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    pub endpoints: Vec<String>,
    /// Ends with `/`, so that `/im/rpc` does not also match `/im/rpc2/...`.
    pub prefix: String,
}

pub fn parse_registry(url: &str) -> Result<RegistryUrl, String> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("registry {url:?} must start with etcd://"))?;
    let (hosts, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/im/rpc"),
    };
    let endpoints: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h.contains(':') {
                h.to_string()
            } else {
                format!("{h}:2379")
            }
        })
        .collect();
    if endpoints.is_empty() {
        return Err(format!("registry {url:?} names no etcd host"));
    }
    let path = path.trim_end_matches('/');
    let prefix = if path.is_empty() {
        "/im/rpc/".to_string()
    } else {
        format!("{path}/")
    };
    Ok(RegistryUrl { endpoints, prefix })
}

/// How long one unary call may take on one endpoint.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn etcd_error(why: impl Into<String>) -> io::Error {
    io::Error::other(why.into())
}

/// A client for one etcd cluster; calls go to the endpoint that last
/// answered, moving on to the next when one fails.
pub struct Etcd {
    endpoints: Vec<String>,
    current: AtomicUsize,
}

impl Etcd {
    pub fn new(endpoints: Vec<String>) -> Etcd {
        Etcd {
            endpoints,
            current: AtomicUsize::new(0),
        }
    }

    /// Opens `path` with `body` on the first endpoint that answers 200.
    async fn open(&self, path: &str, body: &Value, timeout: Duration) -> io::Result<Exchange> {
        let body = body.to_string();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = etcd_error("no etcd endpoint configured");
        for i in 0..self.endpoints.len() {
            let index = (start + i) % self.endpoints.len();
            let host = &self.endpoints[index];
            match Exchange::post(host, path, body.as_bytes(), timeout).await {
                Ok(exchange) if exchange.head.status == 200 => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(exchange);
                }
                Ok(mut exchange) => {
                    let status = exchange.head.status;
                    let body = tokio::time::timeout(timeout, exchange.body()).await;
                    let body = body.ok().and_then(Result::ok).unwrap_or_default();
                    last = etcd_error(format!(
                        "etcd {host}{path}: status {status}: {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                Err(err) => last = etcd_error(format!("etcd {host}{path}: {err}")),
            }
        }
        Err(last)
    }

    async fn call(&self, path: &str, body: &Value) -> io::Result<Value> {
        let mut exchange = self.open(path, body, CALL_TIMEOUT).await?;
        let body = tokio::time::timeout(CALL_TIMEOUT, exchange.body())
            .await
            .map_err(|_| etcd_error(format!("etcd {path}: reply timed out")))??;
        // The keepalive reply is one streamed object; others are plain JSON.
        let mut values = JsonStream::default().push(&body)?;
        if values.is_empty() {
            return Err(etcd_error(format!("etcd {path}: empty reply")));
        }
        Ok(values.swap_remove(0))
    }

    pub async fn grant(&self, ttl_s: u64) -> io::Result<i64> {
        let reply = self.call("/v3/lease/grant", &request::grant(ttl_s)).await?;
        parse_grant(&reply).ok_or_else(|| etcd_error(format!("bad lease grant reply {reply}")))
    }

    /// Refreshes the lease; `Ok(false)` if it has expired.
    pub async fn keepalive(&self, lease: i64) -> io::Result<bool> {
        let reply = self
            .call("/v3/lease/keepalive", &request::lease(lease))
            .await?;
        Ok(parse_keepalive(&reply))
    }

    /// Revokes the lease, deleting every key attached to it.
    pub async fn revoke(&self, lease: i64) -> io::Result<()> {
        self.call("/v3/lease/revoke", &request::lease(lease))
            .await
            .map(drop)
    }

    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> io::Result<()> {
        self.call("/v3/kv/put", &request::put(key, value, lease))
            .await
            .map(drop)
    }

    pub async fn delete(&self, key: &[u8]) -> io::Result<()> {
        self.call("/v3/kv/deleterange", &request::delete(key))
            .await
            .map(drop)
    }

    pub async fn range_prefix(&self, prefix: &[u8]) -> io::Result<(i64, Vec<KeyValue>)> {
        let reply = self
            .call("/v3/kv/range", &request::range_prefix(prefix))
            .await?;
        parse_range(&reply).ok_or_else(|| etcd_error(format!("bad range reply {reply}")))
    }

    /// Watches `prefix` from `start_revision`, handing every message to
    /// `on_message`, until the stream ends or breaks (always an `Err`: a
    /// watch is not supposed to end).
    pub async fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
        mut on_message: impl FnMut(WatchMessage) -> bool,
    ) -> io::Result<()> {
        let body = request::watch_prefix(prefix, start_revision);
        let mut exchange = self.open("/v3/watch", &body, CALL_TIMEOUT).await?;
        let mut stream = JsonStream::default();
        while let Some(data) = exchange.next_data().await? {
            for value in stream.push(&data)? {
                match parse_watch(&value) {
                    Some(message) => {
                        if !on_message(message) {
                            return Err(etcd_error("watch canceled"));
                        }
                    }
                    None => return Err(etcd_error(format!("bad watch message {value}"))),
                }
            }
        }
        Err(etcd_error("watch stream ended"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (raw, text) in vectors {
            assert_eq!(base64::encode(raw), text);
            assert_eq!(base64::decode(text).as_deref(), Some(raw));
        }
        // As etcd printed it for "im/rpc/127.0.0.1:1".
        assert_eq!(
            base64::encode(b"im/rpc/127.0.0.1:1"),
            "aW0vcnBjLzEyNy4wLjAuMTox"
        );
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64::decode(&base64::encode(&all)), Some(all));
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9-", "****"] {
            assert_eq!(base64::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/im/rpc/"), b"/im/rpc0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn replies_as_etcd_3_4_sends_them() {
        // Captured from etcd 3.4.23's gateway.
        let grant: Value = serde_json::from_str(
            r#"{"header":{"cluster_id":"1","member_id":"2","revision":"1","raft_term":"2"},"ID":"7587899207166086662","TTL":"10"}"#,
        ).expect("json");
        assert_eq!(parse_grant(&grant), Some(7587899207166086662));
        let alive: Value =
            serde_json::from_str(r#"{"result":{"header":{},"ID":"7","TTL":"10"}}"#).expect("json");
        let expired: Value =
            serde_json::from_str(r#"{"result":{"header":{},"ID":"7"}}"#).expect("json");
        assert!(parse_keepalive(&alive));
        assert!(!parse_keepalive(&expired));
        let range: Value = serde_json::from_str(
            r#"{"header":{"revision":"2"},"kvs":[{"key":"aW0vcnBjLzEyNy4wLjAuMTox","create_revision":"2","mod_revision":"2","version":"1","value":"MTI3LjAuMC4xOjE=","lease":"7"}],"count":"1"}"#,
        ).expect("json");
        assert_eq!(
            parse_range(&range),
            Some((
                2,
                vec![(b"im/rpc/127.0.0.1:1".to_vec(), b"127.0.0.1:1".to_vec())]
            ))
        );
        let empty: Value = serde_json::from_str(r#"{"header":{"revision":"9"}}"#).expect("json");
        assert_eq!(parse_range(&empty), Some((9, vec![])));
    }

    #[test]
    fn watch_messages() {
        let parse = |s: &str| parse_watch(&serde_json::from_str(s).expect("json"));
        assert_eq!(
            parse(r#"{"result":{"header":{"revision":"2"},"created":true}}"#),
            Some(WatchMessage::Created)
        );
        assert_eq!(
            parse(
                r#"{"result":{"header":{},"events":[{"kv":{"key":"YQ==","value":"Yg=="}},{"type":"DELETE","kv":{"key":"Yw==","mod_revision":"3"}}]}}"#
            ),
            Some(WatchMessage::Events(vec![
                WatchEvent::Put((b"a".to_vec(), b"b".to_vec())),
                WatchEvent::Delete(b"c".to_vec()),
            ]))
        );
        assert!(matches!(
            parse(r#"{"result":{"canceled":true,"compact_revision":"5"}}"#),
            Some(WatchMessage::Canceled(_))
        ));
        assert!(matches!(
            parse(r#"{"error":{"grpc_code":14,"message":"unavailable"}}"#),
            Some(WatchMessage::Canceled(_))
        ));
        assert_eq!(parse(r#"{"nothing":1}"#), None);
    }

    #[test]
    fn registry_urls() {
        assert_eq!(
            parse_registry("etcd://h1:2379,h2/im/rpc"),
            Ok(RegistryUrl {
                endpoints: vec!["h1:2379".into(), "h2:2379".into()],
                prefix: "/im/rpc/".into()
            })
        );
        assert_eq!(
            parse_registry("etcd://127.0.0.1:1").map(|r| r.prefix),
            Ok("/im/rpc/".into())
        );
        assert!(parse_registry("http://x/im").is_err());
        assert!(parse_registry("etcd:///im").is_err());
    }
}
