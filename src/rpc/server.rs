//! The RPC server: decodes request frames, validates, asks the store, and
//! writes replies as they complete (in any order), batched per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use super::frame::{self, Frame};
use super::{method, status};
use crate::accept::next_connection;
use crate::domain::{Code, canonical_chat, validate_pull, validate_send};
use crate::proto::{Message, PingResponse, PullRequest, PullResponse, SendRequest, SendResponse};
use crate::store::{AnyStore, Store, StoreError};
use crate::unwind::catch_panic;

#[derive(Debug, Clone, Copy)]
pub struct RpcServerOptions {
    pub max_frame: usize,
    /// Requests of one connection being served at once; the connection is
    /// not read further until one finishes.
    pub max_in_flight: usize,
}

/// Accepts connections until `shutdown` turns true, then stops accepting and
/// waits (up to `drain_timeout`) for every connection to finish the requests
/// it has already read.
pub async fn serve(
    listener: TcpListener,
    store: Arc<AnyStore>,
    options: RpcServerOptions,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    // Each connection task holds a clone; the channel closes when all are done.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    while let Some((socket, peer)) = next_connection(&listener, &mut shutdown, "rpc").await {
        let store = store.clone();
        let shutdown = shutdown.clone();
        let open = open.clone();
        tokio::spawn(async move {
            if let Err(err) = connection(socket, store, options, shutdown).await {
                eprintln!("im-server: rpc connection from {peer} closed: {err}");
            }
            drop(open);
        });
    }
    drop((listener, open));
    if tokio::time::timeout(drain_timeout, all_closed.recv())
        .await
        .is_err()
    {
        eprintln!("im-server: rpc drain timed out");
    }
}

/// Send and Pull calls served by this process, reported in Ping replies.
static SERVED: AtomicU64 = AtomicU64::new(0);

/// After GOAWAY the server keeps reading: calls the client wrote before it
/// read the GOAWAY are served, not dropped. Our gateway closes the
/// connection once its last call is answered; a client that does not is
/// left once the connection has been this long without a new frame and
/// with nothing in flight. Generous, because a loaded gateway may take a
/// while to read the GOAWAY.
const GOAWAY_QUIET: Duration = Duration::from_secs(1);

enum Reply {
    Send(SendResponse),
    Pull(PullResponse),
    /// An OK PullResponse, encoded by the store.
    PullPage(Vec<u8>),
    Pong,
    BadFrame(String),
    GoAway,
}

async fn connection(
    socket: TcpStream,
    store: Arc<AnyStore>,
    options: RpcServerOptions,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (mut reader, mut writer) = socket.into_split();
    let (replies, mut outbox) = mpsc::channel::<(u64, Reply)>(options.max_in_flight.max(1));

    // Writer: everything finished since the last write goes out in one write.
    let write_loop = tokio::spawn(async move {
        let mut output = BytesMut::with_capacity(64 * 1024);
        while let Some(first) = outbox.recv().await {
            encode_reply(&mut output, first);
            while let Ok(next) = outbox.try_recv() {
                encode_reply(&mut output, next);
            }
            if writer.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
        }
    });

    let permits = Arc::new(Semaphore::new(options.max_in_flight.max(1)));
    let mut input = BytesMut::with_capacity(64 * 1024);
    let mut going_away = false;
    let result = loop {
        let frame = match frame::decode(&mut input, options.max_frame) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                crate::buf::reserve_for_read(&mut input, 4096, 64 * 1024);
                let read = tokio::select! {
                    read = reader.read_buf(&mut input) => read,
                    // Tell the client to send new calls elsewhere; keep
                    // serving what it sent before it read that.
                    // (The guard `wait_for` returns must not live across the
                    // await below: it is not Send.)
                    _ = async { drop(shutdown.wait_for(|&stop| stop).await) }, if !going_away => {
                        going_away = true;
                        if replies.send((0, Reply::GoAway)).await.is_err() {
                            break Ok(());
                        }
                        continue;
                    }
                    _ = tokio::time::sleep(GOAWAY_QUIET), if going_away => {
                        if permits.available_permits() == options.max_in_flight.max(1) {
                            break Ok(());
                        }
                        continue;
                    }
                };
                match read {
                    Ok(0) => break Ok(()),
                    Ok(_) => continue,
                    Err(err) => break Err(err),
                }
            }
            Err(err) => break Err(err.into()),
        };
        // At the in-flight limit, refuse at once rather than stop reading:
        // waiting would hold every later frame behind the slowest request.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if replies
                .send((frame.id, overloaded(frame.kind)))
                .await
                .is_err()
            {
                break Ok(());
            }
            continue;
        };
        let store = store.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let id = frame.id;
            let reply = catch_panic(handle(&store, frame)).await.unwrap_or_else(|| {
                Reply::BadFrame("internal error while serving the request".into())
            });
            let _ = replies.send((id, reply)).await;
            drop(permit);
        });
    };
    // Wait for the requests in flight, then let the writer flush and finish.
    let _ = permits
        .acquire_many(options.max_in_flight.max(1) as u32)
        .await;
    drop(replies);
    let _ = write_loop.await;
    result
}

fn encode_reply(output: &mut BytesMut, (id, reply): (u64, Reply)) {
    match reply {
        Reply::Send(resp) => frame::encode(output, id, status::OK, &resp),
        Reply::Pull(resp) => frame::encode(output, id, status::OK, &resp),
        Reply::PullPage(wire) => frame::encode_raw(output, id, status::OK, &wire),
        Reply::Pong => {
            let served = SERVED.load(Ordering::Relaxed);
            frame::encode(output, id, status::OK, &PingResponse { served });
        }
        Reply::BadFrame(why) => frame::encode_raw(output, id, status::BAD_FRAME, why.as_bytes()),
        Reply::GoAway => frame::encode_raw(output, 0, status::GOAWAY, b""),
    }
}

/// The reply to a request refused because too many are in flight.
fn overloaded(method: u8) -> Reply {
    let msg = "too many requests in flight; retry later".to_string();
    let code = Code::Overloaded as i32;
    match method {
        method::SEND => Reply::Send(SendResponse {
            code,
            msg,
            send_time: 0,
        }),
        method::PULL => Reply::Pull(PullResponse {
            code,
            msg,
            ..PullResponse::default()
        }),
        method::PING => Reply::Pong,
        other => Reply::BadFrame(format!("unknown method {other}")),
    }
}

async fn handle(store: &AnyStore, frame: Frame) -> Reply {
    if frame.kind != method::PING {
        SERVED.fetch_add(1, Ordering::Relaxed);
    }
    match frame.kind {
        method::PING => Reply::Pong,
        method::SEND => match SendRequest::decode(frame.body) {
            Ok(req) => Reply::Send(send(store, req).await),
            Err(err) => Reply::BadFrame(format!("undecodable SendRequest: {err}")),
        },
        method::PULL => match PullRequest::decode(frame.body) {
            Ok(req) => pull(store, req).await,
            Err(err) => Reply::BadFrame(format!("undecodable PullRequest: {err}")),
        },
        other => Reply::BadFrame(format!("unknown method {other}")),
    }
}

/// The response code and message for a store failure.
fn store_failure(err: StoreError) -> (Code, String) {
    match err {
        StoreError::Unavailable => (Code::Unavailable, "the store is unavailable".into()),
        StoreError::Overloaded => (Code::Overloaded, "the store is overloaded".into()),
        StoreError::Internal(why) => {
            eprintln!("im-server: store error: {why}");
            (Code::Internal, "internal store error".into())
        }
    }
}

async fn send(store: &AnyStore, req: SendRequest) -> SendResponse {
    let failed = |code: Code, msg: String| SendResponse {
        code: code as i32,
        msg,
        send_time: 0,
    };
    let Some(Message {
        chat, text, sender, ..
    }) = req.message
    else {
        return failed(Code::InvalidArgument, "`message` is required".into());
    };
    if let Err(invalid) = validate_send(&chat, &sender, &text) {
        return failed(Code::InvalidArgument, invalid.0);
    }
    match store.send(&canonical_chat(&chat), &sender, &text).await {
        Ok(send_time) => SendResponse {
            code: Code::Ok as i32,
            msg: String::new(),
            send_time,
        },
        Err(err) => {
            let (code, msg) = store_failure(err);
            failed(code, msg)
        }
    }
}

async fn pull(store: &AnyStore, req: PullRequest) -> Reply {
    let failed = |code: Code, msg: String| {
        Reply::Pull(PullResponse {
            code: code as i32,
            msg,
            ..PullResponse::default()
        })
    };
    let query = match validate_pull(&req.chat, req.cursor, req.limit, req.reverse) {
        Ok(query) => query,
        Err(invalid) => return failed(Code::InvalidArgument, invalid.0),
    };
    match store.pull(&query).await {
        Ok(page) => Reply::PullPage(page.wire),
        Err(err) => {
            let (code, msg) = store_failure(err);
            failed(code, msg)
        }
    }
}
