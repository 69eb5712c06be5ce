//! The accept step shared by the HTTP and RPC servers.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The next connection, ready for use, or `None` once `shutdown` is true.
/// Accept errors (typically EMFILE) are logged and retried after a pause
/// instead of spinning.
pub async fn next_connection(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|&stop| stop) => return None,
        };
        match accepted {
            Ok((socket, peer)) => {
                // Replies are written whole; Nagle would only delay them.
                let _ = socket.set_nodelay(true);
                return Some((socket, peer));
            }
            Err(err) => {
                eprintln!("im-server: {what} accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
