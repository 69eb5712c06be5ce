//! The I/O of one WebSocket connection: it reads, writes and waits as the
//! connection's policy ([`super::conn::WsConn`]) says, hands each text
//! message to the application's [`Session`] and frames what the session
//! produces. Replies ready together go out in one write.

use std::future::Future;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::conn::{Settings, Step, WsConn};
use super::frame::close_code;
#[cfg(doc)]
use super::frame::put_frame;

/// The application spoken over the connection.
pub trait Session: Send {
    /// What the session waits for (replies, events of its tasks).
    type Event: Send;
    /// A text message from the peer (UTF-8, checked).
    fn message(&mut self, text: &[u8]);
    /// Waits for the next event; cancel-safe (it is raced against I/O), and
    /// lazy: `select!` makes the future even on turns it does not poll it,
    /// so it must take nothing before it is polled.
    fn next(&mut self) -> impl Future<Output = Self::Event> + Send;
    /// The next event if one is ready now.
    fn try_next(&mut self) -> Option<Self::Event>;
    /// Frames what `event` has to say into `out` (text frames, see
    /// [`put_frame`]), stopping once `out` holds `until` bytes (the session
    /// keeps the rest and says so by its next event); or the close to send.
    fn render(
        &mut self,
        event: Self::Event,
        out: &mut BytesMut,
        until: usize,
    ) -> Option<(u16, &'static str)>;
    /// Whether it takes no more messages for now (too many in flight):
    /// they then wait, undecoded, in the connection's input.
    fn busy(&self) -> bool;
}

/// The driver's limits.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub conn: Settings,
    /// Output queued beyond which the session's output is not taken.
    pub max_output: usize,
}

/// The final text message to a peer whose output lagged.
pub const LAGGED: &[u8] = br#"{"event":"lagged"}"#;

const READ_CHUNK: usize = 16 * 1024;

/// How long a close on shutdown waits for the peer's (as an event stream's
/// last bytes get on shutdown in [`crate::http::conn`]).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Serves one connection until it ends: `input` holds bytes read with the
/// handshake, if the client sent frames right after it.
pub async fn run<S: Session>(
    mut socket: TcpStream,
    mut input: BytesMut,
    mut session: S,
    options: Options,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn = WsConn::new(options.conn, std::time::Instant::now());
    let mut out = BytesMut::new();
    deliver(&mut conn, &mut session, &mut input, &mut out);
    let (mut reader, writer) = socket.split();
    // One timer for the connection: a new `sleep_until` per turn registered
    // and dropped a timer entry per message (1.5 % of the process under
    // ws_load sends), and moving it per message cost 0.8 %. It is moved
    // only to an earlier deadline or once it has fired: a later deadline
    // (each message heard moves the ping deadline on) is found when the
    // timer fires early, once per quiet spell.
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    // Made once too: a `wait_for` made and dropped on every turn registered
    // and removed a waiter each time (`watch` and `Notify` frames: 3.7 % of
    // the process under `ws_load sends`, `perf record --call-graph dwarf`).
    let stopping = async move {
        // An error means the sender is gone: the process is stopping too.
        let _ = shutdown.wait_for(|&stop| stop).await;
    };
    tokio::pin!(stopping);
    let mut told_to_stop = false;
    loop {
        let now = std::time::Instant::now();
        let wake = match conn.next(now, &mut out) {
            Step::Finish => break,
            Step::Lagged => {
                conn.lagged(&mut out, LAGGED, now);
                continue;
            }
            Step::Run(wake) => Instant::from_std(wake),
        };
        // What this turn rendered is written now, not on the next turn of
        // the `select!` below: a reply would otherwise cost one wake-up and
        // one poll of every branch more. The socket is nearly always
        // writable; when it is not, tokio answers WouldBlock without a
        // syscall and the `writable` branch waits for it. After a write the
        // connection's state is read again (a close may now be done).
        if !out.is_empty() {
            let queued = out.len();
            if !write_some(&writer, &mut conn, &mut out) {
                return;
            }
            if out.len() < queued {
                continue;
            }
        }
        if wake < timer.deadline() || timer.is_elapsed() {
            timer.as_mut().reset(wake);
        }
        let takes = conn.is_open() && out.len() < options.max_output;
        // Read on while the session is busy (a pong may come), but hold no
        // more than one message's worth of frames not yet decoded.
        let reads = conn.reads() && input.len() < options.conn.max_message + 14;
        tokio::select! {
            () = &mut stopping, if conn.is_open() && !told_to_stop => {
                told_to_stop = true;
                let deadline = now + SHUTDOWN_GRACE;
                conn.close_within(close_code::GOING_AWAY, "server shutting down", &mut out, deadline);
            }
            read = read_some(&mut reader, &mut input), if reads => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    conn.heard(std::time::Instant::now());
                    deliver(&mut conn, &mut session, &mut input, &mut out);
                }
            },
            written = writer.writable(), if !out.is_empty() => {
                if written.is_err() || !write_some(&writer, &mut conn, &mut out) {
                    return;
                }
            }
            next = session.next(), if takes => {
                render(&mut conn, &mut session, next, &mut out, options.max_output, now);
                if !input.is_empty() {
                    deliver(&mut conn, &mut session, &mut input, &mut out);
                }
            }
            () = &mut timer => {}
        }
    }
    finish(socket, out, options.conn.write_timeout).await;
}

/// Renders `first` and whatever else the session has ready into `out`, up
/// to `max_output`; a render that says so closes the connection.
fn render<S: Session>(
    conn: &mut WsConn,
    session: &mut S,
    first: S::Event,
    out: &mut BytesMut,
    max_output: usize,
    now: std::time::Instant,
) {
    let mut next = Some(first);
    while let Some(event) = next.take() {
        if let Some((code, reason)) = session.render(event, out, max_output) {
            conn.close(code, reason, out, now);
        }
        if out.len() < max_output && conn.is_open() {
            next = session.try_next();
        }
    }
    conn.queued(out.len(), std::time::Instant::now());
}

/// Hands the whole messages read to the session while it takes them.
fn deliver<S: Session>(
    conn: &mut WsConn,
    session: &mut S,
    input: &mut BytesMut,
    out: &mut BytesMut,
) {
    let now = std::time::Instant::now();
    // A busy session takes no more: the rest waits in `input`, and the
    // connection is not read, until replies go out.
    while !session.busy() {
        let Some(text) = conn.received(input, out, now) else {
            break;
        };
        session.message(&text);
    }
}

/// Reads what has arrived (waiting for it first).
///
/// With `read_buf` (tokio's `poll_read`), not `try_read_buf`: a read shorter
/// than the room offered has drained the socket, and `poll_read` then
/// clears its readiness, where `try_read` clears it only on `EAGAIN` (as in
/// [`crate::http::server`]). With `try_read_buf` every message cost one
/// more `recvfrom` answering `EAGAIN`: 2.17 `recvfrom` per WebSocket send
/// against 1.28 per HTTP send (`perf stat -e syscalls:sys_enter_recvfrom`,
/// ws_load sends, 100 connections).
async fn read_some(socket: &mut ReadHalf<'_>, input: &mut BytesMut) -> std::io::Result<usize> {
    socket.readable().await?;
    crate::buf::reserve_for_read(input, 2048, READ_CHUNK);
    socket.read_buf(input).await
}

/// Writes what the socket takes now; false if the connection is broken.
fn write_some(socket: &WriteHalf<'_>, conn: &mut WsConn, out: &mut BytesMut) -> bool {
    match socket.try_write(out) {
        Ok(0) => false,
        Ok(n) => {
            out.advance(n);
            conn.wrote(n, std::time::Instant::now());
            if out.is_empty() && out.capacity() > 64 * 1024 {
                *out = BytesMut::new();
            }
            true
        }
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// Writes the last frames (by `deadline`), then closes without resetting
/// the connection: half-close, and drop what the peer still sends until
/// it closes too (its close frame, if it answers ours), briefly.
async fn finish(mut socket: TcpStream, out: BytesMut, write_timeout: Duration) {
    let _ = tokio::time::timeout(write_timeout, socket.write_all(&out)).await;
    let _ = socket.shutdown().await;
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut drained = 0usize;
    while drained < 1 << 20 {
        let read = tokio::time::timeout_at(
            deadline,
            tokio::io::AsyncReadExt::read(&mut socket, &mut sink),
        );
        match read.await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}
