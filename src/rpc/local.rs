//! A gateway shard's way to the RPC server of its own shard, when one process
//! runs both (`im-server` with no role): an in-process pipe
//! ([`crate::pipe`]), handed to that shard's RPC server, instead of a TCP
//! connection to the shared port.
//!
//! Over TCP, `SO_REUSEPORT` hashed each gateway shard's RPC connection to
//! either shard's listener, so calls crossed threads and, in 5 of 6 starts
//! measured (issue 19), both gateway shards' connections landed on one RPC
//! shard, which then used about twice the CPU of the other and left the
//! machine partly idle. A pair made inside the shard keeps the call on the
//! thread that took the HTTP request, whatever the kernel's hash, and skips
//! the kernel altogether. The frames on it are the same protobuf frames: only the
//! transport differs, so the RPC server serves it with the same loop. (The
//! calls that need none of that loop, un-keyed sends and pulls that do not
//! wait, skip the pipe too: [`super::lane`].)
//!
//! No handshake is run on it: the other end of a pair made in this process
//! cannot be held by anyone else.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::lane::Lane;
use crate::pipe::{self, PipeStream};

/// The client's side: calls to `addr` connect through a new pair, or take
/// the lane, if there is one ([`super::lane`]).
#[derive(Clone)]
pub struct LocalRpc {
    addr: SocketAddr,
    accept: mpsc::UnboundedSender<PipeStream>,
    lane: Option<Arc<Lane>>,
}

/// The server's side: the ends of the pairs this shard's gateway made.
pub struct LocalAccept {
    incoming: mpsc::UnboundedReceiver<PipeStream>,
}

/// A connector for calls to `addr` (this process's RPC server address) and
/// the acceptor its shard's RPC server takes them from; `lane`, if any,
/// takes the calls it can serve without frames.
pub fn channel(addr: SocketAddr, lane: Option<Lane>) -> (LocalRpc, LocalAccept) {
    let (accept, incoming) = mpsc::unbounded_channel();
    let lane = lane.map(Arc::new);
    (LocalRpc { addr, accept, lane }, LocalAccept { incoming })
}

impl LocalRpc {
    /// Whether calls to `target` (as the balancer names it) go through here.
    pub fn serves(&self, target: &str) -> bool {
        target.parse::<SocketAddr>().is_ok_and(|t| t == self.addr)
    }

    /// The lane to this shard's store, if calls may take it.
    pub fn lane(&self) -> Option<&Arc<Lane>> {
        self.lane.as_ref()
    }

    /// A new connection to this shard's RPC server.
    pub fn connect(&self) -> io::Result<PipeStream> {
        let (ours, theirs) = pipe::pair();
        self.accept
            .send(theirs)
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "rpc server stopped"))?;
        Ok(ours)
    }
}

impl fmt::Debug for LocalRpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalRpc({})", self.addr)
    }
}

impl LocalAccept {
    /// The next connection; pending forever once no connector is left (the
    /// accept loop stops on shutdown, not here).
    pub async fn next(&mut self) -> PipeStream {
        match self.incoming.recv().await {
            Some(stream) => stream,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn serves_only_its_own_address() {
        let (local, _accept) = channel("127.0.0.1:8888".parse().expect("addr"), None);
        assert!(local.serves("127.0.0.1:8888"));
        assert!(!local.serves("127.0.0.1:8889"));
        assert!(!local.serves("localhost:8888"));
    }

    #[tokio::test]
    async fn a_connection_reaches_the_acceptor() {
        let (local, mut accept) = channel("127.0.0.1:8888".parse().expect("addr"), None);
        let (_, mut ours) = local.connect().expect("pair").into_split();
        let (mut theirs, _) = accept.next().await.into_split();
        ours.write_all(b"frame").await.expect("write");
        let mut got = [0u8; 5];
        theirs.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"frame");
    }

    #[tokio::test]
    async fn connecting_after_the_server_stopped_is_refused() {
        let (local, accept) = channel("127.0.0.1:8888".parse().expect("addr"), None);
        drop(accept);
        let err = local.connect().expect_err("nobody accepts");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }
}
