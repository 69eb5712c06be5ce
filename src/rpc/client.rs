//! The gateway's side of the RPC: a small pool of multiplexed connections to
//! the RPC server, each owned by a [`mux`](crate::mux) task.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::frame::{self, Frame};
use super::method;
use crate::mux::{MuxError, MuxOptions, Pending, Pool, Protocol, Stream};
use crate::proto::{PullRequest, SendRequest};

pub enum RpcRequest {
    Send(SendRequest),
    Pull(PullRequest),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcError {
    /// The RPC server is unreachable or the connection broke.
    Unavailable,
    /// Too many calls are queued.
    Overloaded,
    /// No reply within the call timeout.
    Timeout,
}

struct RpcProtocol {
    addr: String,
    next_id: u64,
    max_frame: usize,
}

impl Protocol for RpcProtocol {
    type Request = RpcRequest;
    type Reply = Frame;

    async fn connect(&mut self) -> io::Result<Stream> {
        let socket = TcpStream::connect(&self.addr).await?;
        socket.set_nodelay(true)?;
        Ok(Stream::Tcp(socket))
    }

    fn encode(&mut self, request: RpcRequest, out: &mut BytesMut) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        match &request {
            RpcRequest::Send(req) => frame::encode(out, self.next_id, method::SEND, req),
            RpcRequest::Pull(req) => frame::encode(out, self.next_id, method::PULL, req),
        }
        self.next_id
    }

    fn decode(&mut self, input: &mut BytesMut) -> io::Result<Option<(u64, Frame)>> {
        Ok(frame::decode(input, self.max_frame)?.map(|f| (f.id, f)))
    }
}

#[derive(Debug, Clone)]
pub struct RpcClientOptions {
    pub connections: usize,
    pub timeout: Duration,
    pub queue: usize,
    pub max_in_flight: usize,
    pub max_frame: usize,
}

#[derive(Clone)]
pub struct RpcClient {
    pool: Arc<Pool<RpcProtocol>>,
    timeout: Duration,
}

/// A call in flight.
pub struct RpcCall(Pending<Frame>);

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
        let pool = Pool::spawn(
            options.connections,
            || RpcProtocol {
                addr: addr.clone(),
                next_id: 0,
                max_frame,
            },
            mux,
        );
        RpcClient {
            pool,
            timeout: options.timeout,
        }
    }

    /// Sends the request without waiting for its reply.
    pub fn start(&self, request: RpcRequest) -> Result<RpcCall, RpcError> {
        match self.pool.handle().start(request) {
            Ok(pending) => Ok(RpcCall(pending)),
            Err(MuxError::Overloaded) => Err(RpcError::Overloaded),
            Err(MuxError::Unavailable) => Err(RpcError::Unavailable),
            Err(MuxError::Timeout) => Err(RpcError::Timeout),
        }
    }

    /// Waits for the reply, up to the call timeout.
    pub async fn finish(&self, call: RpcCall) -> Result<Frame, RpcError> {
        match tokio::time::timeout(self.timeout, call.0.wait()).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(MuxError::Overloaded)) => Err(RpcError::Overloaded),
            Ok(Err(MuxError::Unavailable)) => Err(RpcError::Unavailable),
            Ok(Err(MuxError::Timeout)) => Err(RpcError::Timeout),
            Err(_elapsed) => Err(RpcError::Timeout),
        }
    }
}
