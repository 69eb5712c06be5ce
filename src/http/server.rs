//! The accept loop and the per-connection loop: read, decode every complete
//! request in the buffer, start them all, then write their responses in
//! order with one write.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::codec::{HttpError, Limits, Method, Request, RequestDecoder, Version};
use super::response::{Response, write_response};

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
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            limits: Limits::default(),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Most requests of one connection in flight at once; more pipelined
/// requests wait in the input buffer.
const MAX_PIPELINE: usize = 64;
/// Bytes asked of each read.
const READ_CHUNK: usize = 16 * 1024;

/// Accepts connections forever, one task each.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, options: ServerOptions) {
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    // Responses are written whole; Nagle would only delay them.
                    let _ = socket.set_nodelay(true);
                    let _ = connection(socket, handler, options).await;
                });
            }
            Err(err) => {
                // Typically EMFILE: back off instead of spinning.
                eprintln!("im-server: http accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
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
) -> std::io::Result<()> {
    let mut decoder = RequestDecoder::new(options.limits);
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::with_capacity(READ_CHUNK);
    let mut in_flight: Vec<(H::Pending, ResponseFraming)> = Vec::with_capacity(MAX_PIPELINE);
    // When the first byte of the request being read arrived.
    let mut request_started: Option<Instant> = None;
    loop {
        let mut close = false;
        let mut failure = None;
        while in_flight.len() < MAX_PIPELINE && !close {
            match decoder.decode(&mut input) {
                Ok(Some(req)) => {
                    close = !req.keep_alive;
                    let framing = ResponseFraming {
                        head_only: req.method == Method::Head,
                        keep_alive: req.keep_alive,
                        http10: req.version == Version::Http10,
                    };
                    in_flight.push((handler.start(&req), framing));
                }
                Ok(None) => break,
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            }
        }
        let more_buffered = in_flight.len() == MAX_PIPELINE;
        for (pending, framing) in in_flight.drain(..) {
            let resp = handler.finish(pending).await;
            let keep_alive = framing.keep_alive && !resp.close;
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
        if more_buffered {
            continue;
        }

        let reading_request = !input.is_empty() || decoder.in_body();
        let deadline = if reading_request {
            *request_started.get_or_insert_with(Instant::now) + options.request_timeout
        } else {
            request_started = None;
            Instant::now() + options.idle_timeout
        };
        input.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, socket.read_buf(&mut input)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(_)) => {
                if !reading_request {
                    request_started = Some(Instant::now());
                }
            }
            Err(_elapsed) => {
                if reading_request {
                    let mut resp = handler.reject(HttpError::Timeout);
                    resp.close = true;
                    write_response(&mut output, &resp, false, false, false);
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
