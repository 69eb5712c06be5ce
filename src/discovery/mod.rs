//! Where the RPC servers are: the set of endpoints every gateway shard
//! balances over, and the RPC server's registration in etcd.
//!
//! Sources, merged into one sorted, de-duplicated list published on a
//! `tokio::sync::watch` channel:
//! * literal `ip:port` entries of `--rpc`, fixed;
//! * `host:port` entries, re-resolved every [`RESOLVE_EVERY`]; every A/AAAA
//!   record is an endpoint (a Kubernetes headless service lists its pods
//!   that way), and a failed lookup keeps the host's last answer;
//! * the etcd registry (`--registry`): a range of the prefix, then a watch
//!   from the revision after it (no gap), applied live. While etcd is down
//!   the last known registrations stay, and the range + watch is retried
//!   with back-off.
//!
//! Discovery runs on its own thread (one current-thread runtime), off the
//! request path; shards only read the channel.

pub mod etcd;
pub mod http1;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use etcd::{Etcd, RegistryUrl, WatchEvent, WatchMessage};

/// How often host names are looked up again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(2);
/// Lease TTL of a registration; kept alive every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
const MIN_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// A watch is renewed this often: dropped, the prefix read again, then
/// watched anew from that read. A watch connection that died without a
/// reset (a network partition, a proxy that lost it) would otherwise never
/// end, and the gateway would miss every registration after it; a quiet
/// watch cannot be told from a dead one over etcd's JSON gateway. One range
/// and one connection per period is nothing to etcd.
const RENEW_WATCH_EVERY: Duration = Duration::from_secs(10);

/// One `--rpc` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// `host:port`, looked up periodically.
    Host(String),
}

/// Splits a comma-separated `--rpc` list.
pub fn parse_targets(list: &str) -> Result<Vec<Target>, String> {
    let mut targets = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if let Ok(addr) = entry.parse::<SocketAddr>() {
            targets.push(Target::Addr(addr));
            continue;
        }
        match entry.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                targets.push(Target::Host(entry.to_string()));
            }
            _ => return Err(format!("--rpc entry {entry:?} is not host:port")),
        }
    }
    Ok(targets)
}

/// What the gateway's discovery watches.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub targets: Vec<Target>,
    pub registry: Option<RegistryUrl>,
}

fn merged(parts: &[&[SocketAddr]]) -> Vec<SocketAddr> {
    let mut all: Vec<SocketAddr> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    all.sort();
    all.dedup();
    all
}

/// Starts discovery on its own thread and returns the endpoint list at once:
/// the fixed addresses, then whatever DNS and etcd add. The gateway serves
/// meanwhile (its port open from the start), answering 503 with
/// `Retry-After` and `GET /ready` 503 until a server is known: a closed
/// port for the first seconds looked like a dead server, and `curl -s` hid
/// the refusal.
pub fn start(sources: Sources) -> Result<watch::Receiver<Vec<SocketAddr>>, String> {
    let fixed: Vec<SocketAddr> = sources
        .targets
        .iter()
        .filter_map(|t| match t {
            Target::Addr(a) => Some(*a),
            Target::Host(_) => None,
        })
        .collect();
    let (publish, endpoints) = watch::channel(merged(&[&fixed]));
    let hosts: Vec<String> = sources
        .targets
        .iter()
        .filter_map(|t| match t {
            Target::Host(h) => Some(h.clone()),
            Target::Addr(_) => None,
        })
        .collect();
    if hosts.is_empty() && sources.registry.is_none() {
        return Ok(endpoints);
    }
    crate::runtime::spawn_on_own_runtime(
        "discovery",
        discover(fixed, hosts, sources.registry, publish),
    )?;
    Ok(endpoints)
}

async fn discover(
    fixed: Vec<SocketAddr>,
    hosts: Vec<String>,
    registry: Option<RegistryUrl>,
    publish: watch::Sender<Vec<SocketAddr>>,
) {
    let (dns_tx, mut dns) = watch::channel(Vec::new());
    let (etcd_tx, mut etcd) = watch::channel(Vec::new());
    // The senders stay alive here, so `changed()` below only wakes on news.
    if !hosts.is_empty() {
        tokio::spawn(resolve_loop(hosts, dns_tx.clone()));
    }
    if let Some(registry) = registry {
        tokio::spawn(registry_loop(registry, etcd_tx.clone()));
    }
    loop {
        let list = merged(&[&fixed, &dns.borrow_and_update(), &etcd.borrow_and_update()]);
        publish.send_if_modified(|current| {
            if *current == list {
                return false;
            }
            crate::logging::info!("rpc endpoints: {list:?}");
            *current = list;
            true
        });
        tokio::select! {
            _ = dns.changed() => {}
            _ = etcd.changed() => {}
            _ = publish.closed() => return,
        }
    }
}

/// Looks every host up, every [`RESOLVE_EVERY`]; a host whose lookup fails
/// keeps its previous addresses.
async fn resolve_loop(hosts: Vec<String>, publish: watch::Sender<Vec<SocketAddr>>) {
    let mut known: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    loop {
        for host in &hosts {
            match tokio::net::lookup_host(host.as_str()).await {
                Ok(addrs) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    known.insert(host.clone(), addrs);
                }
                Err(err) => crate::logging::warning!("cannot resolve {host}"; err = err),
            }
        }
        let all: Vec<SocketAddr> = known.values().flatten().copied().collect();
        let all = merged(&[&all]);
        publish.send_if_modified(|current| {
            let changed = *current != all;
            *current = all;
            changed
        });
        tokio::time::sleep(RESOLVE_EVERY).await;
    }
}

/// The address a registration's value names.
fn registered_addr(value: &[u8]) -> Option<SocketAddr> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Applies watch events to the registrations known.
fn apply(entries: &mut BTreeMap<Vec<u8>, SocketAddr>, events: Vec<WatchEvent>) {
    for event in events {
        match event {
            WatchEvent::Put((key, value)) => match registered_addr(&value) {
                Some(addr) => entries.insert(key, addr),
                None => entries.remove(&key),
            },
            WatchEvent::Delete(key) => entries.remove(&key),
        };
    }
}

/// Range + watch of the registry prefix, forever; keeps the last known set
/// while etcd is unreachable.
async fn registry_loop(registry: RegistryUrl, publish: watch::Sender<Vec<SocketAddr>>) {
    let client = Etcd::new(registry.endpoints.clone());
    let prefix = registry.prefix.as_bytes();
    let mut retry = MIN_RETRY;
    let mut reported = false;
    loop {
        let mut entries: BTreeMap<Vec<u8>, SocketAddr> = BTreeMap::new();
        let publish_entries = |entries: &BTreeMap<Vec<u8>, SocketAddr>| {
            let list = merged(&[&entries.values().copied().collect::<Vec<_>>()]);
            publish.send_if_modified(|current| {
                let changed = *current != list;
                *current = list;
                changed
            });
        };
        let result = async {
            let (revision, pairs) = client.range_prefix(prefix).await?;
            for (key, value) in pairs {
                if let Some(addr) = registered_addr(&value) {
                    entries.insert(key, addr);
                }
            }
            publish_entries(&entries);
            if reported {
                crate::logging::info!("etcd registry reachable again");
                reported = false;
            }
            retry = MIN_RETRY;
            let watching = client.watch_prefix(prefix, revision + 1, |message| match message {
                WatchMessage::Created => true,
                WatchMessage::Canceled(why) => {
                    crate::logging::warning!("etcd watch canceled; reading again"; why = why);
                    false
                }
                WatchMessage::Events(events) => {
                    apply(&mut entries, events);
                    publish_entries(&entries);
                    true
                }
            });
            // Time to renew: `Ok`, read again at once.
            match tokio::time::timeout(RENEW_WATCH_EVERY, watching).await {
                Ok(ended) => ended,
                Err(_renew) => Ok(()),
            }
        }
        .await;
        let Err(err) = result else { continue };
        if !reported {
            crate::logging::warning!(
                "etcd registry unreachable; keeping the last known endpoints, retrying";
                err = err
            );
            reported = true;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// An RPC server's registration: `prefix + advertise` → `advertise`, under a
/// lease kept alive every third of its TTL. Re-registers (new lease) after
/// any failure, so it comes back by itself when etcd does.
pub struct Registration {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Registration {
    pub fn start(registry: RegistryUrl, advertise: SocketAddr) -> Result<Registration, String> {
        let (stop, stopping) = watch::channel(false);
        let thread = crate::runtime::spawn_on_own_runtime(
            "registration",
            register(registry, advertise, stopping),
        )?;
        Ok(Registration {
            stop,
            thread: Some(thread),
        })
    }

    /// Revokes the lease (deleting the key) and waits for that to be done or
    /// to have failed: gateways watching the prefix drop this server at once.
    pub fn deregister(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn register(registry: RegistryUrl, advertise: SocketAddr, mut stop: watch::Receiver<bool>) {
    let client = Arc::new(Etcd::new(registry.endpoints.clone()));
    let key = format!("{}{advertise}", registry.prefix).into_bytes();
    let value = advertise.to_string().into_bytes();
    let mut retry = MIN_RETRY;
    let mut lease = None;
    let mut reported = false;
    while !*stop.borrow() {
        let attempt = async {
            let id = client.grant(LEASE_TTL.as_secs()).await?;
            lease = Some(id);
            client.put(&key, &value, id).await?;
            crate::logging::info!("registered {advertise} in etcd (lease {id:x})");
            retry = MIN_RETRY;
            reported = false;
            loop {
                tokio::time::sleep(LEASE_TTL / 3).await;
                if !client.keepalive(id).await? {
                    return Err(std::io::Error::other("lease expired"));
                }
            }
        };
        let result: std::io::Result<()> = tokio::select! {
            result = attempt => result,
            _ = stop.wait_for(|&s| s) => break,
        };
        if let Err(err) = result
            && !reported
        {
            crate::logging::warning!("etcd registration of {advertise} failed; retrying"; err = err);
            reported = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stop.wait_for(|&s| s) => break,
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
    if let Some(id) = lease {
        match client.revoke(id).await {
            Ok(()) => crate::logging::info!("deregistered {advertise} from etcd"),
            Err(err) => {
                // The lease expires by itself within its TTL.
                crate::logging::warning!("could not deregister {advertise} from etcd"; err = err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_lists() {
        let a: SocketAddr = "10.0.0.2:8888".parse().expect("addr");
        let v6: SocketAddr = "[::1]:9".parse().expect("addr");
        assert_eq!(
            parse_targets("10.0.0.2:8888, rpc.internal:8888,[::1]:9,"),
            Ok(vec![
                Target::Addr(a),
                Target::Host("rpc.internal:8888".into()),
                Target::Addr(v6)
            ])
        );
        assert!(parse_targets("rpc.internal").is_err());
        assert!(parse_targets("host:http").is_err());
        assert!(parse_targets(":80").is_err());
    }

    #[test]
    fn merged_is_sorted_and_unique() {
        let a: SocketAddr = "127.0.0.1:2".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert_eq!(merged(&[&[a, b], &[a]]), vec![b, a]);
    }

    #[test]
    fn watch_events_update_the_registrations() {
        let mut entries = BTreeMap::new();
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        apply(
            &mut entries,
            vec![
                WatchEvent::Put((b"/p/a".to_vec(), b"127.0.0.1:1".to_vec())),
                WatchEvent::Put((b"/p/b".to_vec(), b"127.0.0.1:2".to_vec())),
                WatchEvent::Delete(b"/p/b".to_vec()),
                WatchEvent::Put((b"/p/c".to_vec(), b"junk".to_vec())),
            ],
        );
        assert_eq!(
            entries.into_iter().collect::<Vec<_>>(),
            vec![(b"/p/a".to_vec(), a)]
        );
    }

    #[test]
    fn registered_values() {
        assert_eq!(
            registered_addr(b"127.0.0.1:9000"),
            "127.0.0.1:9000".parse().ok()
        );
        assert_eq!(registered_addr(b"not an address"), None);
    }
}
