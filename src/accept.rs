//! The accept step shared by the HTTP and RPC servers, and their drain at
//! shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

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
            Ok((socket, peer)) => return Some(prepared(socket, peer)),
            Err(err) => {
                if pause == MIN_PAUSE {
                    crate::logging::warning!("{what} accept failed; retrying with backoff"; err = err);
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

/// An accepted connection made ready for use, with its client's address.
fn prepared(socket: TcpStream, peer: SocketAddr) -> (TcpStream, SocketAddr) {
    // Replies are written whole; Nagle would only delay them.
    let _ = socket.set_nodelay(true);
    // On a dual-stack listener an IPv4 client arrives as ::ffff:a.b.c.d; it
    // is the same client (rate-limit buckets, logs) as on an IPv4 listener.
    (
        socket,
        SocketAddr::new(peer.ip().to_canonical(), peer.port()),
    )
}

/// The connections the kernel has completed on `listener` that no accept
/// has taken yet. Taken at shutdown, just before the listener closes: closing
/// a listening socket resets the connections still in its queue, and a
/// client may already have written calls on one.
///
/// Accepted directly on the descriptor (non-blocking, as tokio set it):
/// tokio's own `poll_accept` answers from the readiness it last saw, which
/// may not include a connection that has just arrived.
pub fn pending(listener: &TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    let mut taken = Vec::new();
    let socket = socket2::SockRef::from(listener);
    while let Ok((accepted, peer)) = socket.accept() {
        let Some(peer) = peer.as_socket() else {
            continue;
        };
        let stream = std::net::TcpStream::from(accepted);
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        if let Ok(stream) = TcpStream::from_std(stream) {
            taken.push(prepared(stream, peer));
        }
    }
    taken
}

/// The shards accepting on one address, each on a socket of its own bound
/// to it with `SO_REUSEPORT`: the address stops taking connections only
/// once the last shard has closed its socket (until then the kernel sends
/// new ones to the sockets left), and [`Accepting::all_closed`] turns true
/// then.
///
/// A server that is shutting down says GOAWAY only after that. Before, a
/// gateway that reconnected the moment it read the GOAWAY was accepted or
/// queued by the dying server in 2 of 20 runs of
/// `tests/discovery.rs::goaway_comes_after_the_listener_closed`: a queued
/// connection is reset when the socket closes, under the calls written on
/// it, and a send whose outcome is unknown fails 503 (a rolling restart in
/// CI failed one send in 6,434 that way, or in a way much like it).
///
/// Shards count themselves in when they start accepting; one that started
/// after every other had already closed would see `all_closed` true early,
/// which is how it was before this existed.
pub struct Accepting {
    open: AtomicUsize,
    closed: watch::Sender<bool>,
}

impl Default for Accepting {
    fn default() -> Accepting {
        Accepting {
            open: AtomicUsize::new(0),
            closed: watch::Sender::new(false),
        }
    }
}

impl Accepting {
    /// A shard starts accepting.
    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::SeqCst);
    }

    /// A shard has closed its socket.
    pub fn closed_one(&self) {
        if self.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.closed.send_replace(true);
        }
    }

    /// Turns true once no shard accepts any more.
    pub fn all_closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }
}

/// Waits, up to `timeout`, until every one of the `all` permits of `slots`
/// is free again: each connection holds one until it has finished, so then
/// none is left. `slots` is shared by every shard accepting on the address,
/// so a shard's drain waits for the other shards' connections too; the
/// permits are released at once, so that their drains see the same.
/// Returns how many were still held when the time ran out, if it did.
pub async fn drain(slots: &Semaphore, all: usize, timeout: Duration) -> Result<(), usize> {
    let permits = u32::try_from(all).unwrap_or(u32::MAX);
    match tokio::time::timeout(timeout, slots.acquire_many(permits)).await {
        Ok(_) => Ok(()),
        Err(_elapsed) => Err(all.saturating_sub(slots.available_permits())),
    }
}
