//! The accept loop and the per-connection loop: read, decode every complete
//! request in the buffer, start them all, then write their responses in
//! order with one write.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::codec::{HttpError, Limits, Method, Request, RequestDecoder, Version};
use super::response::{Response, write_response};
use crate::accept::next_connection;
use crate::unwind::{catch_panic, catch_panic_sync};

/// What the HTTP layer asks of the application behind it.
pub trait Handler: Send + Sync + 'static {
    /// A request that has been started and not yet answered.
    type Pending: Send;
    /// Starts serving `req` without waiting (parsing, validation, enqueueing
    /// an RPC), so that all pipelined requests are in flight together.
    fn start(&self, req: &Request) -> Self::Pending;
    /// Waits for the response to a started request.
    fn finish(&self, pending: Self::Pending) -> impl Future<Output = Response> + Send;
    /// The response to a request that could not be decoded.
    fn reject(&self, err: HttpError) -> Response;
}

#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    pub limits: Limits,
    /// How long an idle keep-alive connection is kept open.
    pub idle_timeout: Duration,
    /// How long a client may take to send one whole request, from its first byte.
    pub request_timeout: Duration,
    /// Open connections; beyond it new ones get 503 and are closed.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            limits: Limits::default(),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Most requests of one connection in flight at once; more pipelined
/// requests wait in the input buffer.
const MAX_PIPELINE: usize = 64;
/// Bytes asked of each read.
const READ_CHUNK: usize = 16 * 1024;
/// Reads are made into at least this much free space.
const MIN_READ: usize = 2048;
const INITIAL_BUFFER: usize = 4096;

/// One permit per open connection, shared by every thread accepting on the
/// same address: the connection limit, and the drain barrier at shutdown.
pub fn connection_slots(options: &ServerOptions) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(options.max_connections))
}

/// Accepts connections, one task each, until `shutdown` turns true; then
/// stops accepting and waits (up to the drain timeout) until every
/// connection holding one of `slots` has finished its in-flight requests.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ServerOptions,
    slots: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((socket, _)) = next_connection(&listener, &mut shutdown, "http").await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(&socket, handler.as_ref());
            continue;
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ = connection(socket, handler, options, shutdown).await;
            drop(slot);
        });
    }
    drop(listener);
    let all = u32::try_from(options.max_connections).unwrap_or(u32::MAX);
    // Holding every permit means no connection is left; release them at once
    // so that the other threads' drains see the same.
    if tokio::time::timeout(options.drain_timeout, slots.acquire_many(all))
        .await
        .is_err()
    {
        eprintln!(
            "im-server: http drain timed out with {} connections open",
            options.max_connections - slots.available_permits()
        );
    }
}

/// Answers a connection over the limit with 503 and closes it, without
/// waiting on the client: a best-effort write into the empty socket buffer.
fn refuse<H: Handler>(socket: &TcpStream, handler: &H) {
    let mut output = BytesMut::new();
    write_response(
        &mut output,
        &handler.reject(HttpError::TooManyConnections),
        false,
        false,
        false,
    );
    let _ = socket.try_write(&output);
}

/// What must be remembered of a started request to write its response.
struct ResponseFraming {
    head_only: bool,
    keep_alive: bool,
    http10: bool,
}

async fn connection<H: Handler>(
    mut socket: TcpStream,
    handler: Arc<H>,
    options: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut decoder = RequestDecoder::new(options.limits);
    // Small to start: thousands of idle connections should cost little.
    let mut input = BytesMut::with_capacity(INITIAL_BUFFER);
    let mut output = BytesMut::with_capacity(INITIAL_BUFFER);
    let mut in_flight: Vec<(Option<H::Pending>, ResponseFraming)> =
        Vec::with_capacity(MAX_PIPELINE);
    // When the first byte of the request being read arrived.
    let mut request_started: Option<Instant> = None;
    // An unsafe request decoded while earlier ones were still in flight.
    let mut deferred: Option<Request> = None;
    loop {
        let mut close = false;
        let mut failure = None;
        // Whether decoding stopped for want of bytes (rather than to let
        // the requests in flight finish first).
        let mut needs_input = false;
        // Pipelined requests are started together only while they are safe
        // (GET, HEAD); a request that changes state runs alone, after those
        // before it, so that a send never overtakes an earlier one (RFC 9112 §9.3.2).
        while in_flight.len() < MAX_PIPELINE && !close {
            let req = match deferred.take() {
                Some(req) => req,
                None => match decoder.decode(&mut input) {
                    Ok(Some(req)) => req,
                    Ok(None) => {
                        needs_input = true;
                        break;
                    }
                    Err(err) => {
                        failure = Some(err);
                        break;
                    }
                },
            };
            let safe = matches!(req.method, Method::Get | Method::Head);
            if !safe && !in_flight.is_empty() {
                deferred = Some(req);
                break;
            }
            close = !req.keep_alive;
            let framing = ResponseFraming {
                head_only: req.method == Method::Head,
                keep_alive: req.keep_alive,
                http10: req.version == Version::Http10,
            };
            in_flight.push((catch_panic_sync(|| handler.start(&req)), framing));
            if !safe {
                break;
            }
        }
        for (pending, framing) in in_flight.drain(..) {
            let resp = match pending {
                Some(pending) => catch_panic(handler.finish(pending)).await,
                None => None,
            };
            let resp = resp.unwrap_or_else(|| handler.reject(HttpError::HandlerPanicked));
            // Once shutting down, every response says the connection closes.
            let keep_alive = framing.keep_alive && !resp.close && !*shutdown.borrow();
            write_response(
                &mut output,
                &resp,
                framing.head_only,
                keep_alive,
                framing.http10,
            );
            if !keep_alive {
                close = true;
                break;
            }
        }
        if let Some(err) = failure.filter(|_| !close) {
            write_response(&mut output, &handler.reject(err), false, false, false);
            socket.write_all(&output).await?;
            return lingering_close(socket).await;
        }
        if !close && decoder.take_expect_continue() {
            output.put_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        if !output.is_empty() {
            socket.write_all(&output).await?;
            output.clear();
        }
        if close {
            return lingering_close(socket).await;
        }
        if !needs_input {
            continue;
        }

        let reading_request = !input.is_empty() || decoder.in_body();
        let deadline = if reading_request {
            *request_started.get_or_insert_with(Instant::now) + options.request_timeout
        } else {
            request_started = None;
            Instant::now() + options.idle_timeout
        };
        crate::buf::reserve_for_read(&mut input, MIN_READ, READ_CHUNK);
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, socket.read_buf(&mut input)) => read,
            // An idle keep-alive connection is closed at once on shutdown; a
            // request being received is finished first.
            _ = shutdown.wait_for(|&stop| stop), if !reading_request => return Ok(()),
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(_)) => {
                if !reading_request {
                    request_started = Some(Instant::now());
                }
            }
            Err(_elapsed) => {
                if reading_request {
                    write_response(
                        &mut output,
                        &handler.reject(HttpError::Timeout),
                        false,
                        false,
                        false,
                    );
                    let _ = socket.write_all(&output).await;
                }
                return Ok(());
            }
        }
    }
}

/// Closes after a final response without resetting the connection: unread
/// request bytes would make the kernel send RST, and the client could lose
/// the response. Half-close, then drain briefly (what nginx calls lingering close).
async fn lingering_close(mut socket: TcpStream) -> std::io::Result<()> {
    socket.shutdown().await?;
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut drained = 0usize;
    while drained < 1024 * 1024 {
        match tokio::time::timeout_at(deadline, socket.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
    Ok(())
}
