//! The RPC server: decodes request frames, validates, asks the store, and
//! writes replies as they complete (in any order), batched per connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use super::frame::{self, Frame};
use super::{method, status};
use crate::accept::next_connection;
use crate::domain::{Code, canonical_chat, validate_idempotency_key, validate_pull, validate_send};
use crate::proto::{Message, PullRequest, PullResponse, SendRequest, SendResponse};
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

enum Reply {
    Send(SendResponse),
    Pull(PullResponse),
    /// An OK PullResponse, encoded by the store.
    PullPage(Vec<u8>),
    BadFrame(String),
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
    let result = loop {
        let frame = match frame::decode(&mut input, options.max_frame) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                crate::buf::reserve_for_read(&mut input, 4096, 64 * 1024);
                let read = tokio::select! {
                    read = reader.read_buf(&mut input) => read,
                    // Stop taking requests; those in flight still complete.
                    _ = shutdown.wait_for(|&stop| stop) => break Ok(()),
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
        Reply::BadFrame(why) => frame::encode_raw(output, id, status::BAD_FRAME, why.as_bytes()),
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
            ..SendResponse::default()
        }),
        method::PULL => Reply::Pull(PullResponse {
            code,
            msg,
            ..PullResponse::default()
        }),
        other => Reply::BadFrame(format!("unknown method {other}")),
    }
}

async fn handle(store: &AnyStore, frame: Frame) -> Reply {
    match frame.kind {
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
        StoreError::IdempotencyKeyReused => (
            Code::IdempotencyKeyReused,
            "this idempotency key was already used in this chat for a different message".into(),
        ),
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
        ..SendResponse::default()
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
    // Empty (the proto3 default) = no key.
    let key = Some(req.idempotency_key.as_str()).filter(|k| !k.is_empty());
    if let Some(Err(invalid)) = key.map(validate_idempotency_key) {
        return failed(Code::InvalidArgument, invalid.0);
    }
    match store
        .send(&canonical_chat(&chat), &sender, &text, key)
        .await
    {
        Ok(sent) => SendResponse {
            code: Code::Ok as i32,
            msg: String::new(),
            send_time: sent.send_time,
            replayed: sent.replayed,
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
