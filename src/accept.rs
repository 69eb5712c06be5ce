//! The accept step shared by the HTTP and RPC servers.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// First pause after a failed accept; doubled on each further failure.
const MIN_PAUSE: Duration = Duration::from_millis(20);
/// Longest pause: a freed descriptor is used again within this.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// The next connection, ready for use, or `None` once `shutdown` is true.
///
/// Accept errors (typically EMFILE: out of descriptors) are retried after a
/// pause that doubles up to [`MAX_PAUSE`], and logged once per run of
/// failures: the pending connection keeps the listener readable, so retrying
/// at once would spin and log without end (664 lines in 2.5 s were measured
/// with 1,100 connections under `nofile=1024`). The pause only suspends this
/// accept loop; every listener has its own task, so the others carry on.
pub async fn next_connection(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    let mut pause = MIN_PAUSE;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|&stop| stop) => return None,
        };
        match accepted {
            Ok((socket, peer)) => {
                // Replies are written whole; Nagle would only delay them.
                let _ = socket.set_nodelay(true);
                // On a dual-stack listener an IPv4 client arrives as
                // ::ffff:a.b.c.d; it is the same client (rate-limit buckets,
                // logs) as on an IPv4 listener.
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                return Some((socket, peer));
            }
            Err(err) => {
                if pause == MIN_PAUSE {
                    eprintln!("im-server: {what} accept failed: {err}; retrying with backoff");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.wait_for(|&stop| stop) => return None,
                }
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}
