//! The gateway's side of the RPC: a small pool of multiplexed connections to
//! the RPC server, each owned by a [`mux`](crate::mux) task.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::frame::{self, Frame};
use super::lane::{Lane, LaneReply};
use super::local::LocalRpc;
use super::{method, status};
use crate::budget::{Account, Reserved};
use crate::error::Error;
use crate::metrics::{PeerKind, PeerStats};
use crate::mux::{MuxOptions, Pending, Pool, Protocol, Stream};
use crate::proto::{
    ChangesRequest, DeleteRequest, EditRequest, PingRequest, PullRequest, SendRequest,
};

/// How a pull's reply is charged when it arrives.
#[derive(Debug, Clone)]
pub enum Budgeted {
    /// Its reservation, made when the call started, becomes the charge.
    Reserved(Reserved),
    /// Charged to this account if it fits, else dropped
    /// ([`status::OVER_BUDGET`]).
    OnArrival(Account),
}

#[derive(Clone)]
pub enum RpcRequest {
    Send(SendRequest),
    /// A pull, and how its reply is charged to the memory budget when it
    /// arrives (see [`crate::budget`]; `None`: not charged).
    Pull(PullRequest, Option<Budgeted>),
    Ping,
    /// A ping that asks the server's store too (`GET /ready`).
    PingStore,
    Edit(EditRequest),
    Delete(DeleteRequest),
    Changes(ChangesRequest),
}

struct RpcProtocol {
    addr: String,
    next_id: u64,
    max_frame: usize,
    /// Set when the server sent GOAWAY on the current connection.
    going_away: Arc<AtomicBool>,
    /// The shared secret of the handshake ([`super::handshake`]), if any.
    secret: Option<Arc<[u8]>>,
    /// Set when `addr` is this shard's own RPC server ([`super::local`]).
    local: Option<LocalRpc>,
    /// The accounts that the replies of the calls written on this
    /// connection are charged to, by call id.
    charged: HashMap<u64, Budgeted>,
}

impl RpcProtocol {
    /// Charges a reply as its call asked, if it did ([`charge`]).
    fn charge(&mut self, frame: Frame) -> Frame {
        match self.charged.remove(&frame.id) {
            Some(budgeted) => charge(budgeted, frame, Body::InReadBuffer),
            None => frame,
        }
    }
}

/// Where a reply's body is, for [`charge`].
pub(super) enum Body {
    /// A view into a connection's read buffer: copied out, so that a
    /// charged body does not pin the (larger) buffer.
    InReadBuffer,
    /// Made for this reply alone (the local lane's): kept as it is.
    Own,
}

/// Charges a reply as its call asked ([`Budgeted`]): the body holds the
/// charge for as long as it lives. A reply charged on arrival that does not
/// fit is dropped here, its call answered [`status::OVER_BUDGET`].
pub(super) fn charge(budgeted: Budgeted, mut frame: Frame, body: Body) -> Frame {
    if frame.method_or_status != status::OK {
        return frame;
    }
    let bytes = frame.body.len();
    let charge = match budgeted {
        Budgeted::Reserved(reserved) => match reserved.settle(bytes) {
            Some(charge) => Some(charge),
            // Settled by another attempt's reply: nobody waits for this.
            None => return frame,
        },
        Budgeted::OnArrival(account) => account.charge(bytes),
    };
    match charge {
        Some(charge) => {
            frame.body = match body {
                Body::InReadBuffer => crate::budget::held(&frame.body, charge),
                Body::Own => crate::budget::held_owned(frame.body, charge),
            }
        }
        None => {
            frame.method_or_status = status::OVER_BUDGET;
            frame.body = bytes::Bytes::new();
        }
    }
    frame
}

impl Protocol for RpcProtocol {
    type Request = RpcRequest;
    type Reply = Frame;

    async fn connect(&mut self) -> io::Result<Stream> {
        if let Some(local) = &self.local {
            let stream = local.connect()?;
            self.going_away.store(false, Ordering::Relaxed);
            self.charged.clear();
            return Ok(Stream::Local(stream));
        }
        let mut socket = TcpStream::connect(&self.addr).await?;
        socket.set_nodelay(true)?;
        if let Some(secret) = &self.secret {
            super::handshake::connect(&mut socket, secret, &self.addr).await?;
        }
        // A new connection: whoever answers has not said GOAWAY on it, and
        // the calls of the last one are answered (Lost) already.
        self.going_away.store(false, Ordering::Relaxed);
        self.charged.clear();
        Ok(Stream::Tcp(socket))
    }

    fn encode(&mut self, request: RpcRequest, out: &mut BytesMut) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        match &request {
            RpcRequest::Send(req) => frame::encode(out, self.next_id, method::SEND, req),
            RpcRequest::Pull(req, budgeted) => {
                if let Some(budgeted) = budgeted {
                    self.charged.insert(self.next_id, budgeted.clone());
                }
                frame::encode(out, self.next_id, method::PULL, req)
            }
            RpcRequest::Ping => frame::encode(
                out,
                self.next_id,
                method::PING,
                &PingRequest { store: false },
            ),
            RpcRequest::PingStore => frame::encode(
                out,
                self.next_id,
                method::PING,
                &PingRequest { store: true },
            ),
            RpcRequest::Edit(req) => frame::encode(out, self.next_id, method::EDIT, req),
            RpcRequest::Delete(req) => frame::encode(out, self.next_id, method::DELETE, req),
            RpcRequest::Changes(req) => frame::encode(out, self.next_id, method::CHANGES, req),
        }
        self.next_id
    }

    /// A pull with `wait_ms` may be held by the server until a message
    /// comes: it has in-flight slots of its own.
    fn held(request: &RpcRequest) -> bool {
        matches!(request, RpcRequest::Pull(pull, _) if pull.wait_ms > 0)
    }

    fn retiring(&self) -> bool {
        self.going_away.load(Ordering::Relaxed)
    }

    fn cancel(&mut self, tag: u64, out: &mut BytesMut) -> bool {
        self.charged.remove(&tag);
        frame::encode_raw(out, tag, method::CANCEL, b"");
        true
    }

    fn decode(&mut self, input: &mut BytesMut) -> io::Result<Option<(u64, Frame)>> {
        let frame = frame::decode(input, self.max_frame)?;
        if let Some(f) = &frame
            && f.id == 0
        {
            // Id 0 is never a call's: the mux drops it as unmatched.
            match f.method_or_status {
                status::GOAWAY => self.going_away.store(true, Ordering::Relaxed),
                // Only a client without the secret sees one here (with it,
                // `connect` answers it): end the connection with the reason
                // rather than let the server refuse each call.
                status::CHALLENGE => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the rpc server requires the shared-secret handshake: set --rpc-secret-file",
                    ));
                }
                _ => {}
            }
        }
        Ok(frame.map(|f| (f.id, self.charge(f))))
    }
}

#[derive(Debug, Clone)]
pub struct RpcClientOptions {
    pub connections: usize,
    pub timeout: Duration,
    pub queue: usize,
    pub max_in_flight: usize,
    pub max_frame: usize,
    /// The shared secret of the handshake ([`super::handshake`]), if any.
    pub secret: Option<Arc<[u8]>>,
    /// This shard's own RPC server, reached without TCP ([`super::local`]).
    pub local: Option<LocalRpc>,
}

/// The configured pool; the secret and the local channel are set by the
/// caller (read once, and made per shard).
#[derive(Clone)]
pub struct RpcClient {
    pool: Arc<Pool<RpcProtocol>>,
    /// Set when this endpoint is this shard's own RPC server and its store
    /// takes calls without frames ([`super::lane`]).
    lane: Option<Arc<Lane>>,
    timeout: Duration,
    going_away: Arc<AtomicBool>,
    /// This endpoint's metrics, counted by the balanced client's calls
    /// (pings are not counted).
    stats: Arc<PeerStats>,
}

/// A call in flight, with the moment its timeout runs out.
pub struct RpcCall {
    reply: CallReply,
    /// Fixed when the call is issued, not when it is awaited: the gateway
    /// awaits pipelined calls one after another, and a timeout counted from
    /// the await made 8 pipelined calls to a silent peer take 8 timeouts.
    deadline: Instant,
}

/// Where a call's reply comes from.
enum CallReply {
    /// A connection's mux.
    Mux(Pending<Frame>),
    /// This shard's store ([`super::lane`]).
    Lane(LaneReply),
}

impl RpcCall {
    /// Waits for the reply with no time limit (the caller applies one).
    pub async fn wait(self) -> Result<Frame, Error> {
        match self.reply {
            CallReply::Mux(pending) => pending.wait().await,
            CallReply::Lane(reply) => reply.wait().await,
        }
    }
}

impl RpcClient {
    /// Starts the pool; connections are (re)established in the background.
    pub fn new(addr: String, options: &RpcClientOptions) -> RpcClient {
        let mux = MuxOptions {
            name: "rpc client",
            target: addr.clone(),
            queue: options.queue,
            max_in_flight: options.max_in_flight,
            // RpcProtocol counts no bytes (Protocol::queued_bytes default).
            max_queued_bytes: usize::MAX,
        };
        let max_frame = options.max_frame;
        let going_away = Arc::new(AtomicBool::new(false));
        let local = options.local.clone().filter(|local| local.serves(&addr));
        let lane = local.as_ref().and_then(|local| local.lane().cloned());
        let pool = Pool::spawn(
            options.connections,
            || RpcProtocol {
                addr: addr.clone(),
                next_id: 0,
                max_frame,
                going_away: going_away.clone(),
                secret: options.secret.clone(),
                local: local.clone(),
                charged: HashMap::new(),
            },
            mux,
        );
        RpcClient {
            pool,
            lane,
            timeout: options.timeout,
            going_away,
            stats: crate::metrics::peer(PeerKind::Rpc, &addr),
        }
    }

    /// This endpoint's metrics.
    pub fn stats(&self) -> &PeerStats {
        &self.stats
    }

    /// Whether the server said GOAWAY on its current connection.
    pub fn going_away(&self) -> bool {
        self.going_away.load(Ordering::Relaxed)
    }

    /// Sends the request without waiting for its reply. The call's timeout
    /// starts now; a call still queued when it runs out
    /// is never written.
    pub fn start(&self, request: RpcRequest) -> Result<RpcCall, Error> {
        self.start_by(request, Instant::now() + self.timeout)
    }

    /// [`start`](Self::start) with the deadline given (a call retried on
    /// another server keeps its first deadline).
    pub fn start_by(&self, request: RpcRequest, deadline: Instant) -> Result<RpcCall, Error> {
        let request = match &self.lane {
            Some(lane) => match lane.start(request) {
                Ok(reply) => {
                    let reply = CallReply::Lane(reply);
                    return Ok(RpcCall { reply, deadline });
                }
                Err(request) => request,
            },
            None => request,
        };
        let reply = CallReply::Mux(self.pool.handle().start_by(request, deadline)?);
        Ok(RpcCall { reply, deadline })
    }

    /// Waits for the reply, up to the call timeout counted from [`start`](Self::start).
    pub async fn finish(&self, call: RpcCall) -> Result<Frame, Error> {
        tokio::time::timeout_at(call.deadline, call.wait())
            .await
            .unwrap_or(Err(Error::Timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goaway_frame_marks_the_connection_retiring() {
        let mut protocol = RpcProtocol {
            addr: String::new(),
            next_id: 0,
            max_frame: crate::config::Config::defaults().max_frame,
            going_away: Arc::new(AtomicBool::new(false)),
            secret: None,
            local: None,
            charged: HashMap::new(),
        };
        let mut input = BytesMut::new();
        frame::encode_raw(&mut input, 7, status::OK, b"reply");
        frame::encode_raw(&mut input, 0, status::GOAWAY, b"");
        let (tag, reply) = protocol
            .decode(&mut input)
            .expect("valid")
            .expect("a frame");
        assert_eq!((tag, &reply.body[..]), (7, &b"reply"[..]));
        assert!(!protocol.retiring(), "an ordinary reply is not GOAWAY");
        let (tag, _) = protocol
            .decode(&mut input)
            .expect("valid")
            .expect("a frame");
        // Tag 0 is never a call's, so the mux matches it to nobody.
        assert_eq!(tag, 0);
        assert!(protocol.retiring());
        assert!(protocol.going_away.load(Ordering::Relaxed));
        // Request ids start at 1.
        let mut out = BytesMut::new();
        assert_eq!(protocol.encode(RpcRequest::Ping, &mut out), 1);
    }
}
