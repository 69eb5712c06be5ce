//! The HTTP gateway: routes requests, turns JSON into RPC calls and RPC
//! replies back into JSON.

pub mod error;
pub mod json;
pub mod pull_wire;

use crate::http::{Handler, HttpError, Method, Request, Response};
use crate::proto::SendResponse;
use crate::rpc::balanced::{BalancedCall, BalancedClient};
use crate::rpc::client::RpcRequest;
use crate::rpc::frame::Frame;
use crate::rpc::status;
use error::ApiError;

pub struct Gateway {
    rpc: BalancedClient,
}

/// A started request.
pub enum PendingReply {
    Ready(Response),
    Send(BalancedCall),
    Pull(BalancedCall),
}

const PONG: &[u8] = br#"{"message":"pong"}"#;

impl Gateway {
    pub fn new(rpc: BalancedClient) -> Gateway {
        Gateway { rpc }
    }

    fn route(&self, req: &Request) -> Result<PendingReply, ApiError> {
        let (path, query) = req.path_and_query();
        let readable = matches!(req.method, Method::Get | Method::Head);
        match path {
            b"/ping" if readable => Ok(PendingReply::Ready(Response::json(200, PONG.to_vec()))),
            b"/ping" => Err(ApiError::MethodNotAllowed("GET, HEAD")),
            b"/api/send" if req.method == Method::Post => {
                let request = json::parse_send(&req.body)?;
                Ok(PendingReply::Send(
                    self.rpc.start(RpcRequest::Send(request))?,
                ))
            }
            b"/api/send" => Err(ApiError::MethodNotAllowed("POST")),
            b"/api/pull" if readable => {
                let request = json::parse_pull(&req.body, query)?;
                Ok(PendingReply::Pull(
                    self.rpc.start(RpcRequest::Pull(request))?,
                ))
            }
            b"/api/pull" => Err(ApiError::MethodNotAllowed("GET, HEAD")),
            _ => Err(ApiError::NotFound),
        }
    }

    async fn finish_send(&self, call: BalancedCall) -> Result<Response, ApiError> {
        let resp: SendResponse = decode_reply(self.rpc.finish(call).await?)?;
        if resp.code != 0 {
            return Err(ApiError::from_code(resp.code, resp.msg));
        }
        Ok(Response::json(200, json::send_body(resp.send_time)))
    }

    async fn finish_pull(&self, call: BalancedCall) -> Result<Response, ApiError> {
        let frame = self.rpc.finish(call).await?;
        check_status(&frame)?;
        match pull_wire::pull_body(frame.body) {
            Ok(Ok(pull_wire::PullBody::Whole(body))) => Ok(Response::json(200, body)),
            Ok(Ok(pull_wire::PullBody::Stream(stream))) => {
                let mut resp = Response::json(200, Vec::new());
                resp.stream = Some(Box::new(stream));
                Ok(resp)
            }
            Ok(Err(failed)) => Err(ApiError::from_code(failed.code, failed.msg)),
            Err(err) => Err(ApiError::Internal(format!("undecodable rpc reply: {err}"))),
        }
    }
}

fn check_status(frame: &Frame) -> Result<(), ApiError> {
    if frame.kind != status::OK {
        let why = String::from_utf8_lossy(&frame.body);
        return Err(ApiError::Internal(format!(
            "rpc server refused a frame: {why}"
        )));
    }
    Ok(())
}

fn decode_reply<M: prost::Message + Default>(frame: Frame) -> Result<M, ApiError> {
    check_status(&frame)?;
    M::decode(frame.body).map_err(|e| ApiError::Internal(format!("undecodable rpc reply: {e}")))
}

/// The most a pull reply can weigh per message on the RPC wire: the text,
/// the sender and the chat at their limits, and field overhead.
const MAX_MESSAGE_WIRE: usize =
    crate::domain::MAX_TEXT_BYTES + 2 * crate::domain::MAX_NAME_BYTES + 64;

impl Handler for Gateway {
    type Pending = PendingReply;

    /// A pull holds its page until written: a default page (10 messages)
    /// unless the request may name a limit (the word `limit`, or any
    /// escape that could spell it), then a full one (100 messages).
    fn reply_bound(req: &Request) -> usize {
        let (path, query) = req.path_and_query();
        if path != b"/api/pull" {
            return 0;
        }
        let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        let may_name_limit = query.is_some_and(|q| has(q, b"limit") || q.contains(&b'%'))
            || has(&req.body, b"limit")
            || has(&req.body, b"\\u");
        let messages = if may_name_limit {
            crate::domain::MAX_LIMIT
        } else {
            crate::domain::DEFAULT_LIMIT
        };
        messages as usize * MAX_MESSAGE_WIRE
    }

    fn start(&self, req: &Request) -> PendingReply {
        self.route(req)
            .unwrap_or_else(|err| PendingReply::Ready(err.into_response()))
    }

    async fn finish(&self, pending: PendingReply) -> Response {
        let result = match pending {
            PendingReply::Ready(resp) => return resp,
            PendingReply::Send(call) => self.finish_send(call).await,
            PendingReply::Pull(call) => self.finish_pull(call).await,
        };
        result.unwrap_or_else(ApiError::into_response)
    }

    fn reject(&self, err: HttpError) -> Response {
        ApiError::Http(err).into_response()
    }
}
