//! The pure parts of talking to a Redis Cluster: the slot map (from
//! `CLUSTER SLOTS`, patched by MOVED), and what an error reply means for a
//! command that got it. The I/O around them is in
//! `store::redis::cluster`.

use std::sync::Arc;

use super::Reply;

/// Hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The hash slot of `key` (CRC16 of the hash tag, if any, mod 16384).
pub fn key_slot(key: &[u8]) -> u16 {
    redis_protocol::redis_keyslot(key)
}

/// Which master serves each slot, by `host:port`.
#[derive(Debug, Clone)]
pub struct SlotMap {
    /// Index into `nodes` per slot; `UNKNOWN` if no master serves it.
    owners: Box<[u16]>,
    nodes: Vec<Arc<str>>,
}

const UNKNOWN: u16 = u16::MAX;

impl Default for SlotMap {
    fn default() -> Self {
        SlotMap {
            owners: vec![UNKNOWN; SLOTS].into_boxed_slice(),
            nodes: Vec::new(),
        }
    }
}

impl SlotMap {
    /// A map from `CLUSTER SLOTS` ranges: `(first, last, master address)`.
    pub fn from_ranges(ranges: &[(u16, u16, String)]) -> SlotMap {
        let mut map = SlotMap::default();
        for (first, last, addr) in ranges {
            for slot in *first..=*last {
                map.set(slot, addr);
            }
        }
        map
    }

    /// The master serving `slot`, if known.
    pub fn owner(&self, slot: u16) -> Option<Arc<str>> {
        match self.owners.get(slot as usize) {
            Some(&i) if i != UNKNOWN => self.nodes.get(i as usize).cloned(),
            _ => None,
        }
    }

    /// Records that `addr` serves `slot` (what a MOVED reply says), at once,
    /// without waiting for a full refresh.
    pub fn set(&mut self, slot: u16, addr: &str) {
        let Some(owner) = self.owners.get_mut(slot as usize) else {
            return;
        };
        let index = match self.nodes.iter().position(|n| &**n == addr) {
            Some(i) => i,
            None => {
                self.nodes.push(Arc::from(addr));
                self.nodes.len() - 1
            }
        };
        *owner = index as u16;
    }

    /// Every master serving at least one slot.
    pub fn masters(&self) -> Vec<Arc<str>> {
        let mut used = vec![false; self.nodes.len()];
        for &i in self.owners.iter() {
            if let Some(u) = used.get_mut(i as usize) {
                *u = true;
            }
        }
        self.nodes
            .iter()
            .zip(used)
            .filter(|(_, used)| *used)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether both maps give every slot the same master.
    pub fn same_owners(&self, other: &SlotMap) -> bool {
        (0..SLOTS as u16).all(|slot| self.owner(slot) == other.owner(slot))
    }

    /// Slots no master serves.
    pub fn uncovered(&self) -> usize {
        self.owners.iter().filter(|&&i| i == UNKNOWN).count()
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal kept).
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

/// Joins a host and a port; an empty host is `default_host` (the node that
/// answered, as Redis means by a NULL or empty endpoint).
fn join(host: &str, port: i64, default_host: &str) -> String {
    let host = if host.is_empty() || host == "?" {
        default_host
    } else {
        host
    };
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Parses a `CLUSTER SLOTS` reply into `(first, last, master)` ranges.
/// `asked` is the `host:port` the command was sent to.
pub fn parse_cluster_slots(reply: &Reply, asked: &str) -> Result<Vec<(u16, u16, String)>, String> {
    let Reply::Array(ranges) = reply else {
        return Err(format!("CLUSTER SLOTS returned {reply:?}"));
    };
    let default_host = host_of(asked);
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Reply::Array(fields) = range else {
            return Err("a CLUSTER SLOTS range is not an array".into());
        };
        let int = |i: usize| match fields.get(i) {
            Some(Reply::Integer(n)) => Ok(*n),
            _ => Err(format!("CLUSTER SLOTS field {i} is not an integer")),
        };
        let (first, last) = (int(0)?, int(1)?);
        if !(0..SLOTS as i64).contains(&first) || !(first..SLOTS as i64).contains(&last) {
            return Err(format!("CLUSTER SLOTS range {first}-{last} is invalid"));
        }
        let Some(Reply::Array(master)) = fields.get(2) else {
            return Err("a CLUSTER SLOTS range has no master".into());
        };
        let host = match master.first() {
            Some(Reply::BulkString(b)) => std::str::from_utf8(b)
                .map_err(|_| "a CLUSTER SLOTS host is not UTF-8".to_string())?,
            Some(Reply::Null) | None => "",
            Some(other) => return Err(format!("CLUSTER SLOTS host is {other:?}")),
        };
        let port = match master.get(1) {
            Some(Reply::Integer(p)) if (1..=65535).contains(p) => *p,
            _ => return Err("a CLUSTER SLOTS port is invalid".into()),
        };
        out.push((first as u16, last as u16, join(host, port, default_host)));
    }
    Ok(out)
}

/// What an error reply means for the command that got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// The slot has moved for good: resend to `addr` and patch the map.
    Moved { slot: u16, addr: String },
    /// The slot is being migrated and this key is on `addr` already: resend
    /// there once, preceded by `ASKING`.
    Ask { slot: u16, addr: String },
    /// The node cannot serve it right now (TRYAGAIN, CLUSTERDOWN, LOADING,
    /// MASTERDOWN, READONLY): retry after a pause. `refresh` when the map
    /// is probably stale (the node is no longer a master).
    Retry { refresh: bool },
}

/// Classifies an error reply. `None`: an error to report (the command ran,
/// or can never succeed). Every `Some` proves the command did not run, so
/// resending it can never store a message twice. `asked` is the node that
/// answered (an empty host in a redirection means that node's host).
pub fn classify(error: &str, asked: &str) -> Option<Redirect> {
    let mut words = error.split_ascii_whitespace();
    let kind = words.next()?;
    match kind {
        "MOVED" | "ASK" => {
            let slot: u16 = words.next()?.parse().ok()?;
            if slot as usize >= SLOTS {
                return None;
            }
            let (host, port) = words.next()?.rsplit_once(':')?;
            let port: i64 = port.parse().ok()?;
            let addr = join(host, port, host_of(asked));
            Some(if kind == "MOVED" {
                Redirect::Moved { slot, addr }
            } else {
                Redirect::Ask { slot, addr }
            })
        }
        "TRYAGAIN" | "LOADING" => Some(Redirect::Retry { refresh: false }),
        "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" => Some(Redirect::Retry { refresh: true }),
        _ => None,
    }
}

/// `INFO cluster` says the node runs in cluster mode.
pub fn is_cluster_info(info: &[u8]) -> bool {
    info.split(|&b| b == b'\n')
        .any(|line| line.trim_ascii() == b"cluster_enabled:1")
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn node(host: Reply, port: i64) -> Reply {
        Reply::Array(vec![host, Reply::Integer(port), bulk("id")])
    }

    #[test]
    fn cluster_slots_with_replicas_and_empty_hosts() {
        let reply = Reply::Array(vec![
            Reply::Array(vec![
                Reply::Integer(0),
                Reply::Integer(5460),
                node(bulk("10.0.0.1"), 7000),
                node(bulk("10.0.0.4"), 7003),
            ]),
            Reply::Array(vec![
                Reply::Integer(5461),
                Reply::Integer(16383),
                node(bulk(""), 7001),
            ]),
            Reply::Array(vec![
                Reply::Integer(100),
                Reply::Integer(100),
                node(Reply::Null, 7002),
            ]),
        ]);
        let ranges = parse_cluster_slots(&reply, "10.0.0.9:7005").expect("valid");
        assert_eq!(
            ranges,
            vec![
                (0, 5460, "10.0.0.1:7000".to_string()),
                (5461, 16383, "10.0.0.9:7001".to_string()),
                (100, 100, "10.0.0.9:7002".to_string()),
            ]
        );
        let map = SlotMap::from_ranges(&ranges);
        assert_eq!(map.owner(0).as_deref(), Some("10.0.0.1:7000"));
        assert_eq!(map.owner(100).as_deref(), Some("10.0.0.9:7002"));
        assert_eq!(map.owner(16383).as_deref(), Some("10.0.0.9:7001"));
        assert_eq!(map.masters().len(), 3);
        assert_eq!(map.uncovered(), 0);
    }

    #[test]
    fn bad_cluster_slots_are_errors() {
        let range = |a, b| {
            Reply::Array(vec![Reply::Array(vec![
                Reply::Integer(a),
                Reply::Integer(b),
                node(bulk("h"), 1),
            ])])
        };
        assert!(parse_cluster_slots(&range(0, 16384), "h:1").is_err());
        assert!(parse_cluster_slots(&range(10, 5), "h:1").is_err());
        assert!(parse_cluster_slots(&range(-1, 5), "h:1").is_err());
        assert!(parse_cluster_slots(&bulk("no"), "h:1").is_err());
        let no_port = Reply::Array(vec![Reply::Array(vec![
            Reply::Integer(0),
            Reply::Integer(1),
            Reply::Array(vec![bulk("h")]),
        ])]);
        assert!(parse_cluster_slots(&no_port, "h:1").is_err());
    }

    #[test]
    fn patching_a_slot_moves_only_that_slot() {
        let mut map = SlotMap::from_ranges(&[(0, 16383, "a:1".into())]);
        let before = map.clone();
        assert!(map.same_owners(&before));
        map.set(42, "b:2");
        assert!(!map.same_owners(&before));
        assert_eq!(map.owner(42).as_deref(), Some("b:2"));
        assert_eq!(map.owner(41).as_deref(), Some("a:1"));
        assert_eq!(map.owner(43).as_deref(), Some("a:1"));
        let empty = SlotMap::default();
        assert_eq!(empty.owner(7), None);
        assert_eq!(empty.uncovered(), SLOTS);
        assert!(empty.masters().is_empty());
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(
            classify("MOVED 3999 127.0.0.1:6381", "127.0.0.1:6379"),
            Some(Redirect::Moved {
                slot: 3999,
                addr: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(
            classify("ASK 3999 :6381", "10.1.2.3:6379"),
            Some(Redirect::Ask {
                slot: 3999,
                addr: "10.1.2.3:6381".into()
            })
        );
        assert_eq!(
            classify("MOVED 1 ::1:7000", "x:1"),
            Some(Redirect::Moved {
                slot: 1,
                addr: "[::1]:7000".into()
            })
        );
        for retry in [
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "LOADING Redis is loading the dataset in memory",
        ] {
            assert_eq!(
                classify(retry, "h:1"),
                Some(Redirect::Retry { refresh: false })
            );
        }
        for stale in [
            "CLUSTERDOWN The cluster is down",
            "MASTERDOWN Link with MASTER is down",
            "READONLY You can't write against a read only replica.",
        ] {
            assert_eq!(
                classify(stale, "h:1"),
                Some(Redirect::Retry { refresh: true })
            );
        }
        for other in [
            "CROSSSLOT Keys in request don't hash to the same slot",
            "ERR Function not found",
            "MOVED",
            "MOVED 16384 h:1",
            "MOVED x h:1",
            "ASK 5 nohostport",
            "",
        ] {
            assert_eq!(classify(other, "h:1"), None, "{other:?}");
        }
    }

    #[test]
    fn cluster_mode_from_info() {
        assert!(is_cluster_info(b"# Cluster\r\ncluster_enabled:1\r\n"));
        assert!(!is_cluster_info(b"# Cluster\r\ncluster_enabled:0\r\n"));
        assert!(!is_cluster_info(b""));
    }

    #[test]
    fn hash_tags_decide_the_slot() {
        assert_eq!(key_slot(b"im:{a:b}"), key_slot(b"{a:b}"));
        assert_eq!(key_slot(b"123456789"), 12739); // the CRC16 check value
    }
}
