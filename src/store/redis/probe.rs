//! What the configured Redis is, asked at start-up, and the one-off
//! commands on connections of their own (`INFO`, `CLUSTER SLOTS`) that
//! neither the probe nor a map refresh sends through the pools.

use bytes::BytesMut;

use crate::mux::Stream;
use crate::resp::cluster::{SlotMap, is_cluster_info};
use crate::resp::protocol::{RespProtocol, decode_reply};
use crate::resp::url::{Address, RedisTarget};
use crate::resp::{Reply, command};

/// What the configured Redis turned out to be at start-up.
pub enum Probe {
    Standalone,
    /// In cluster mode, with the map if `CLUSTER SLOTS` could be read.
    Cluster(Option<SlotMap>),
    /// No node answered.
    Unreachable(String),
}

/// Why `url`, a list of nodes, cannot be served: a list names a Cluster,
/// and its node answered that it is not in cluster mode.
pub fn not_a_cluster(url: &str) -> String {
    format!("{url}: a list of nodes is for a Redis Cluster, and this Redis is not in cluster mode")
}

/// Asks the seed nodes, in order, whether they run in cluster mode
/// (`INFO cluster`), and if so for the slot map.
pub async fn probe(targets: &[RedisTarget]) -> Probe {
    let mut last_error = String::from("no Redis node given");
    for target in targets {
        match probe_one(target).await {
            Ok(probe) => return probe,
            Err(err) => last_error = format!("{target}: {err}"),
        }
    }
    Probe::Unreachable(last_error)
}

async fn probe_one(target: &RedisTarget) -> std::io::Result<Probe> {
    use crate::mux::Protocol as _;
    // Only AUTH: SELECT fails in cluster mode, which is what we ask about.
    let bare = RedisTarget {
        db: 0,
        ..target.clone()
    };
    let stream = RespProtocol::new(bare, &[]).connect().await?;
    let info = one_command(&stream, &[b"INFO", b"cluster"]).await?;
    let Reply::BulkString(info) = info else {
        return Err(std::io::Error::other(format!("INFO returned {info:?}")));
    };
    if !is_cluster_info(&info) {
        return Ok(Probe::Standalone);
    }
    let Address::Tcp(addr) = &target.address else {
        return Ok(Probe::Cluster(None));
    };
    let slots = one_command(&stream, &[b"CLUSTER", b"SLOTS"]).await?;
    let map = crate::resp::cluster::parse_cluster_slots(&slots, addr)
        .ok()
        .map(|ranges| SlotMap::from_ranges(&ranges));
    Ok(Probe::Cluster(map))
}

/// `CLUSTER SLOTS` of the node at `addr`, on a connection of its own.
pub(super) async fn read_slot_map(target: &RedisTarget, addr: &str) -> std::io::Result<SlotMap> {
    use crate::mux::Protocol as _;
    let stream = RespProtocol::new(target.clone(), &[]).connect().await?;
    let reply = one_command(&stream, &[b"CLUSTER", b"SLOTS"]).await?;
    let ranges =
        crate::resp::cluster::parse_cluster_slots(&reply, addr).map_err(std::io::Error::other)?;
    Ok(SlotMap::from_ranges(&ranges))
}

/// One command, one reply, on a connection of its own.
async fn one_command(stream: &Stream, args: &[&[u8]]) -> std::io::Result<Reply> {
    stream.write_all(&command::encode(args)).await?;
    let mut input = BytesMut::new();
    loop {
        if let Some(reply) = decode_reply(&mut input)? {
            return Ok(reply);
        }
        stream.read_some(&mut input).await?;
    }
}
