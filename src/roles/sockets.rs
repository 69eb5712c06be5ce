//! Listening sockets: bound once, before the shards start, then one socket
//! per shard on each shared port (`SO_REUSEPORT`), and the socket options
//! that make the IPv6 wildcard dual-stack.

use std::net::{SocketAddr, TcpListener as StdListener};

use tokio::net::TcpListener;

/// One shard's listening sockets. The RPC and HTTP ones are each shard's
/// own socket on the shared port (`SO_REUSEPORT`), so the kernel spreads
/// new connections over the shards by a hash of their addresses. Shards
/// that shared one socket (duplicated descriptors) raced to accept, and the
/// first awake took them all: `wrk -c100` against two shards landed every
/// connection on one of them in 3 runs of 5 (one thread serving all HTTP,
/// 41-47k sends/s with 10,000 rooms; 51k/s when they were split). New
/// connections are refused once every shard has closed its socket.
#[derive(Default)]
pub(super) struct Listeners {
    pub rpc: Option<StdListener>,
    pub http: Option<StdListener>,
    /// `--metrics-addr`: served by one shard only (scrapes are rare).
    pub metrics: Option<StdListener>,
}

impl Listeners {
    /// Every listener but the metrics one, which only the last shard takes.
    pub fn try_clone(&self) -> Result<Listeners, String> {
        let dup = |l: &Option<StdListener>| -> Result<Option<StdListener>, String> {
            l.as_ref()
                .map(|l| {
                    l.local_addr()
                        .and_then(shared_port_listener)
                        .map_err(|e| format!("cannot open a shard's listener: {e}"))
                })
                .transpose()
        };
        Ok(Listeners {
            rpc: dup(&self.rpc)?,
            http: dup(&self.http)?,
            metrics: None,
        })
    }
}

/// Registers one of this shard's own listening sockets with its runtime.
pub(super) fn shard_listener(listener: Option<StdListener>) -> Result<TcpListener, String> {
    let listener = listener.ok_or("a shard is missing its listener")?;
    TcpListener::from_std(listener).map_err(|e| format!("cannot register a listener: {e}"))
}

/// A non-blocking listening socket on `addr`, and the address it got.
pub(super) fn bind(addr: &str, what: &str) -> Result<(StdListener, SocketAddr), String> {
    let listener = listen(addr).map_err(|e| format!("cannot listen for {what} on {addr}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot configure the {what} socket: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the {what} address: {e}"))?;
    Ok((listener, local))
}

/// [`bind`] for an address every shard listens on with a socket of its own
/// ([`Listeners`]). A first bind, without `SO_REUSEPORT`, checks the port
/// is free and resolves port 0: a second server started on a port in use
/// must fail, not join the first one's group and take a share of its
/// connections.
pub(super) fn bind_shared(addr: &str, what: &str) -> Result<(StdListener, SocketAddr), String> {
    let (probe, local) = bind(addr, what)?;
    drop(probe);
    let listener = shared_port_listener(local)
        .map_err(|e| format!("cannot listen for {what} on {local}: {e}"))?;
    Ok((listener, local))
}

/// A non-blocking listening socket on `local` (an address [`listen`] has
/// bound, so dual-stack if it is the IPv6 wildcard) with `SO_REUSEPORT`.
fn shared_port_listener(local: SocketAddr) -> std::io::Result<StdListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if local.is_ipv6() && local.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&local.into())?;
    socket.listen(libc::SOMAXCONN)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A listening socket on `addr`. The IPv6 wildcard (`[::]:port`, the
/// gateway's default) is made dual-stack: `IPV6_V6ONLY` off, whatever the
/// system's `net.ipv6.bindv6only` says, so IPv4 clients connect too and
/// `localhost` works whether it resolves to 127.0.0.1 or ::1. Where the OS
/// has no IPv6 at all, it falls back to `0.0.0.0:port`, and says so.
fn listen(addr: &str) -> std::io::Result<StdListener> {
    let v6 = match addr.parse::<SocketAddr>() {
        Ok(SocketAddr::V6(v6)) if v6.ip().is_unspecified() => v6,
        _ => return StdListener::bind(addr),
    };
    match dual_stack(SocketAddr::V6(v6)) {
        Err(err) if no_ipv6(&err) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], v6.port()));
            crate::logging::warning!(
                "no IPv6 on this host ({err}); listening on {v4} instead of {addr}"
            );
            StdListener::bind(v4)
        }
        result => result,
    }
}

fn dual_stack(addr: SocketAddr) -> std::io::Result<StdListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    // As std's bind does: a restarted server can take its port back while
    // the old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    // The kernel caps it at net.core.somaxconn.
    socket.listen(libc::SOMAXCONN)?;
    Ok(socket.into())
}

/// Errors that mean the host cannot do IPv6 (no kernel support, or IPv6
/// disabled so `::` is not an address it has), as opposed to a port in use.
fn no_ipv6(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections queued before anyone accepts: one socket per shard means
    /// each shard's queue gets a share (with a shared socket, the first
    /// shard to accept would drain them all).
    #[test]
    fn each_shard_listener_gets_a_share_of_new_connections() {
        let (first, local) = bind_shared("127.0.0.1:0", "test").expect("binds");
        let shards = Listeners {
            http: Some(first),
            ..Listeners::default()
        };
        let second = shards.try_clone().expect("second shard");
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(local).expect("connects"))
            .collect();
        let drain = |l: &Option<StdListener>| {
            let l = l.as_ref().expect("listener");
            std::iter::from_fn(|| l.accept().ok()).count()
        };
        let (a, b) = (drain(&shards.http), drain(&second.http));
        assert_eq!(a + b, clients.len());
        // All 64 on one socket: a chance of 2^-63 with the kernel's hash.
        assert!(a > 0 && b > 0, "one shard took them all: {a} and {b}");
    }

    #[test]
    fn a_second_server_on_a_port_in_use_fails_to_bind() {
        let (_first, local) = bind_shared("127.0.0.1:0", "test").expect("binds");
        let err = bind_shared(&local.to_string(), "http").expect_err("port in use");
        assert!(err.contains("cannot listen for http"), "{err}");
    }
}
