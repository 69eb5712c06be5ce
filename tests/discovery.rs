//! Discovery against real processes: our etcd client against a real etcd,
//! and (below) gateways balancing over several real RPC servers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use im_server::discovery::etcd::{Etcd as EtcdClient, WatchEvent, WatchMessage};

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<WatchMessage>) -> WatchMessage {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("watch message in time")
        .expect("watch open")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Lease, put, range by prefix, watch from the revision after the range,
/// keepalive, revoke (which deletes the key), and a dead first endpoint.
#[test]
fn etcd_client_speaks_the_json_gateway() {
    let etcd = Etcd::start();
    // The first endpoint refuses connections: every call moves on to etcd.
    let dead = format!("127.0.0.1:{}", free_port());
    let client = EtcdClient::new(vec![dead, etcd.addr().to_string()]);
    runtime().block_on(async {
        let lease = client.grant(10).await.expect("grant");
        assert!(client.keepalive(lease).await.expect("keepalive"));
        client
            .put(b"/t/a", b"127.0.0.1:1", lease)
            .await
            .expect("put");
        client.put(b"/u/x", b"other", 0).await.expect("put outside");
        let (revision, pairs) = client.range_prefix(b"/t/").await.expect("range");
        assert_eq!(pairs, vec![(b"/t/a".to_vec(), b"127.0.0.1:1".to_vec())]);

        // Changes after the range arrive on the watch, none before it.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = {
            let client = EtcdClient::new(vec![etcd.addr().to_string()]);
            tokio::spawn(async move {
                let _ = client
                    .watch_prefix(b"/t/", revision + 1, |m| {
                        let _ = tx.send(m);
                        true
                    })
                    .await;
            })
        };
        assert_eq!(next(&mut rx).await, WatchMessage::Created);
        client
            .put(b"/t/b", b"127.0.0.1:2", lease)
            .await
            .expect("put b");
        assert_eq!(
            next(&mut rx).await,
            WatchMessage::Events(vec![WatchEvent::Put((
                b"/t/b".to_vec(),
                b"127.0.0.1:2".to_vec()
            ))])
        );
        client.delete(b"/t/b").await.expect("delete");
        assert_eq!(
            next(&mut rx).await,
            WatchMessage::Events(vec![WatchEvent::Delete(b"/t/b".to_vec())])
        );
        // Revoking the lease deletes what it held.
        client.revoke(lease).await.expect("revoke");
        assert_eq!(
            next(&mut rx).await,
            WatchMessage::Events(vec![WatchEvent::Delete(b"/t/a".to_vec())])
        );
        assert!(!client.keepalive(lease).await.expect("keepalive answers"));
        let (_, pairs) = client.range_prefix(b"/t/").await.expect("range");
        assert!(pairs.is_empty());
        watcher.abort();
    });
}

/// With no etcd anywhere, calls fail (fast) instead of hanging.
#[test]
fn etcd_client_fails_cleanly_when_etcd_is_down() {
    let client = EtcdClient::new(vec![
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ]);
    let start = Instant::now();
    let result = runtime().block_on(client.range_prefix(b"/t/"));
    assert!(result.is_err());
    assert!(start.elapsed() < Duration::from_secs(5));
}
