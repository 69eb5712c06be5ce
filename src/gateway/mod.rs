//! The HTTP gateway: routes requests, turns JSON into RPC calls and RPC
//! replies back into JSON.

pub mod access;
pub mod client_addr;
pub mod error;
pub mod export;
pub mod held;
pub mod json;
pub mod metrics_endpoint;
pub mod origin;
pub mod pull_wire;
pub mod ready;
pub mod routes;
pub mod stream;
pub mod web;
pub mod ws;

use std::sync::Arc;

use tokio::sync::watch;

use crate::budget::{Account, ClientKey, Reserved};
use crate::error::CODE_OK;
use crate::http::{Handler, HttpError, Request, Response};
use crate::metrics::{self, Gauge, METRICS};
use crate::proto::{
    DeleteRequest, DeleteResponse, EditRequest, EditResponse, PullResponse, SendRequest,
    SendResponse,
};
use crate::rpc::balanced::{BalancedCall, BalancedClient};
use crate::rpc::client::{Budgeted, RpcRequest};
use crate::rpc::frame::Frame;
use crate::rpc::status;
use access::{Access, Api};
use error::ApiError;
use routes::{Entry, Label, Route};

pub struct Gateway {
    rpc: BalancedClient,
    /// Authentication and rate limits, shared by every shard of the process.
    access: Arc<Access>,
    /// Longest a pull is held for new messages (`--pull-max-wait-ms`).
    max_wait_ms: i32,
    /// Waiting pulls and open streams, per client and process.
    held: Arc<held::HeldWork>,
    /// Turns true when the process shuts down: waiting pulls answer at once.
    stopping: watch::Receiver<bool>,
    /// `GET /api/ws`'s options ([`Gateway::with_ws`]).
    ws: ws::WsOptions,
}

/// A started request.
pub enum PendingReply {
    Ready(Response),
    Send(BalancedCall),
    Pull(BalancedCall),
    /// A stream's first pull, and the stream to serve once it is answered.
    Stream(BalancedCall, Box<stream::ChatStream>),
    /// A pull the RPC server may hold (`wait_ms`), and its place among held work.
    WaitingPull(BalancedCall, held::Held),
    /// `GET /ready`'s ping of an RPC server and its store.
    Readiness(BalancedCall),
    Edit(BalancedCall),
    Delete(BalancedCall),
    /// An export's first page, and the export to stream once it is answered.
    Export(BalancedCall, Box<export::Export>),
}

/// A started request, with what its metrics need: its route's label, when
/// it started, and its place in the in-flight gauge (left when answered or
/// dropped with its connection).
pub struct Started {
    reply: PendingReply,
    label: Label,
    at: std::time::Instant,
    _in_flight: metrics::Tracked,
}

const PONG: &[u8] = br#"{"message":"pong"}"#;

impl Gateway {
    pub fn new(
        rpc: BalancedClient,
        access: Arc<Access>,
        max_wait_ms: i32,
        held: Arc<held::HeldWork>,
        stopping: watch::Receiver<bool>,
    ) -> Gateway {
        Gateway {
            rpc,
            access,
            max_wait_ms,
            held,
            stopping,
            ws: ws::WsOptions::default(),
        }
    }

    /// The WebSocket endpoint's options (defaults unless set).
    pub fn with_ws(mut self, options: ws::WsOptions) -> Gateway {
        self.ws = options;
        self
    }

    /// Starts the request `entry` (its path's row of the route table, if
    /// any) serves.
    fn route(
        &self,
        req: &Request,
        account: &Account,
        entry: Option<&Entry>,
    ) -> Result<PendingReply, ApiError> {
        let route = entry.ok_or(ApiError::NotFound)?.route_for(req.method)?;
        let query = req.path_and_query().1;
        match route {
            // Not behind authentication: a scraper has no user token (see
            // docs/operations.md, Metrics, on restricting it).
            Route::Metrics => Ok(PendingReply::Ready(metrics_endpoint::scrape())),
            Route::Ping => Ok(PendingReply::Ready(Response::json(200, PONG.to_vec()))),
            Route::Ready => Ok(ready::start(&self.rpc, *self.stopping.borrow())),
            Route::Page => Ok(PendingReply::Ready(web::chat_page())),
            Route::OpenApi => Ok(PendingReply::Ready(web::openapi())),
            Route::Send => self.start_send(req, query),
            Route::Pull => self.start_pull(req, query, account),
            Route::Edit => self.start_change(req, query, true),
            Route::Delete => self.start_change(req, query, false),
            Route::Export => self.start_export(req),
            Route::Stream => self.start_stream(req, account),
            Route::Ws => self.start_ws(req, account),
        }
    }

    fn start_send(&self, req: &Request, query: Option<&[u8]>) -> Result<PendingReply, ApiError> {
        let user = self.access.admit(req, Api::Send)?;
        let mut request = json::parse_send_any(&req.body, is_form(req), query)?;
        merge_idempotency_header(req, &mut request)?;
        if let (Some(user), Some(message)) = (&user, &mut request.message) {
            access::authorize(user, &message.chat, Some(&mut message.sender))?;
        }
        Ok(PendingReply::Send(
            self.rpc.start(RpcRequest::Send(request))?,
        ))
    }

    fn start_pull(
        &self,
        req: &Request,
        query: Option<&[u8]>,
        account: &Account,
    ) -> Result<PendingReply, ApiError> {
        let user = self.access.admit(req, Api::Pull)?;
        let mut request = json::parse_pull(&req.body, is_form(req), query)?;
        if let Some(user) = &user {
            access::authorize(user, &request.chat, None)?;
        }
        request.wait_ms = request.wait_ms.min(self.max_wait_ms);
        let waits = request.wait_ms > 0;
        let account = charged_to(account, user.as_ref(), self.access.client_ip(req));
        if !waits {
            let budgeted = Budgeted::Reserved(reserve_page(&account, request.limit)?);
            let call = self.rpc.start(RpcRequest::Pull(request, Some(budgeted)))?;
            return Ok(PendingReply::Pull(call));
        }
        let held = self.held.hold(account.client())?;
        let budgeted = Budgeted::OnArrival(account);
        let call = self.rpc.start(RpcRequest::Pull(request, Some(budgeted)))?;
        Ok(PendingReply::WaitingPull(call, held))
    }

    async fn finish_send(&self, call: BalancedCall) -> Result<Response, ApiError> {
        let resp: SendResponse = decode_reply(self.rpc.finish(call).await?)?;
        if resp.code != CODE_OK {
            return Err(ApiError::from_code(resp.code, resp.msg));
        }
        let mut response = Response::json(200, json::send_body(resp.send_time));
        if resp.replayed {
            response.extra_header = Some(("Idempotent-Replayed", "true"));
        }
        Ok(response)
    }

    /// An edit (`edit`) or a delete: admitted and authorized for the chat
    /// as a send is; the store checks that the user may change the message.
    fn start_change(
        &self,
        req: &Request,
        query: Option<&[u8]>,
        edit: bool,
    ) -> Result<PendingReply, ApiError> {
        let user = self.access.admit(req, Api::Send)?;
        let fields = json::parse_change_any(&req.body, is_form(req), query)?;
        if let Some(user) = &user {
            access::authorize(user, &fields.chat, None)?;
        }
        let actor = user.as_ref().map(|u| u.sub.clone()).unwrap_or_default();
        let request = match edit {
            true => RpcRequest::Edit(EditRequest {
                chat: fields.chat,
                send_time: fields.send_time,
                text: fields.text,
                actor,
            }),
            false => RpcRequest::Delete(DeleteRequest {
                chat: fields.chat,
                send_time: fields.send_time,
                actor,
                admin: user.is_some_and(|u| u.admin),
            }),
        };
        let call = self.rpc.start(request)?;
        Ok(match edit {
            true => PendingReply::Edit(call),
            false => PendingReply::Delete(call),
        })
    }

    async fn finish_edit(&self, call: BalancedCall) -> Result<Response, ApiError> {
        let resp: EditResponse = decode_reply(self.rpc.finish(call).await?)?;
        if resp.code != CODE_OK {
            return Err(ApiError::from_code(resp.code, resp.msg));
        }
        Ok(Response::json(
            200,
            json::edit_body(resp.send_time, resp.edited_at),
        ))
    }

    async fn finish_delete(&self, call: BalancedCall) -> Result<Response, ApiError> {
        let resp: DeleteResponse = decode_reply(self.rpc.finish(call).await?)?;
        if resp.code != CODE_OK {
            return Err(ApiError::from_code(resp.code, resp.msg));
        }
        Ok(Response::json(200, json::delete_body(resp.send_time)))
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
            Err(err) => Err(ApiError::internal(format!("undecodable rpc reply: {err}"))),
        }
    }

    /// A pull the RPC server may hold: on shutdown it is answered at once
    /// with what it had — nothing, or it would not be waiting.
    async fn finish_waiting_pull(
        &self,
        call: BalancedCall,
        _held: held::Held,
    ) -> Result<Response, ApiError> {
        let mut stopping = self.stopping.clone();
        tokio::select! {
            reply = self.finish_pull(call) => reply,
            _ = stopping.wait_for(|&stop| stop) => {
                Ok(Response::json(200, pull_wire::pull_json_of(&PullResponse::default())))
            }
        }
    }
}

/// Whether the request's body is declared `application/x-www-form-urlencoded`
/// (parameters such as `; charset=utf-8` allowed).
fn is_form(req: &Request) -> bool {
    req.header_values("content-type")
        .next()
        .is_some_and(|value| {
            let media_type = value.split(|&b| b == b';').next().unwrap_or_default();
            media_type
                .trim_ascii()
                .eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
        })
}

/// Takes the `Idempotency-Key` header into the send: the key may be given
/// there or as the body's `idempotency_key`, or both if they agree.
fn merge_idempotency_header(req: &Request, send: &mut SendRequest) -> Result<(), ApiError> {
    let mut values = req.header_values("idempotency-key");
    let Some(value) = values.next() else {
        return Ok(());
    };
    let invalid = |why: &str| {
        Err(ApiError::Invalid(format!(
            "`Idempotency-Key` header: {why}"
        )))
    };
    if values.next().is_some() {
        return invalid("given more than once");
    }
    let Some(key) = unquote(value) else {
        return invalid("malformed quoted string");
    };
    if let Err(why) = crate::domain::validate_idempotency_key(&key) {
        return invalid(&why.0);
    }
    if !send.idempotency_key.is_empty() && send.idempotency_key != key {
        return Err(ApiError::Invalid(
            "the `Idempotency-Key` header and the body's `idempotency_key` differ".into(),
        ));
    }
    send.idempotency_key = key;
    Ok(())
}

/// A header value as a string: the IETF draft defines `Idempotency-Key` as a
/// structured-field string (`"abc"`, with `\"` and `\\` escapes), and many
/// clients send the bare key (`abc`); both are accepted. `None` if it is
/// neither (an unterminated quote, a bad escape, not UTF-8).
fn unquote(value: &[u8]) -> Option<String> {
    let Some(quoted) = value.strip_prefix(b"\"") else {
        return String::from_utf8(value.to_vec()).ok();
    };
    let inner = quoted.strip_suffix(b"\"")?;
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                _ => return None,
            },
            b'"' => return None,
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Reserves the most a page of `limit` messages (0: the default) can weigh;
/// 503 `overloaded` at once if the client's share or the process has no
/// room for it (see [`crate::budget`]).
fn reserve_page(account: &Account, limit: i32) -> Result<Reserved, ApiError> {
    let messages = match limit {
        l if l <= 0 => crate::domain::DEFAULT_LIMIT,
        l => l.min(crate::domain::MAX_LIMIT),
    };
    let bound = messages as usize * crate::domain::MAX_MESSAGE_WIRE_BYTES;
    account
        .reserve(bound)
        .ok_or(ApiError::Service(crate::error::Error::Overloaded))
}

/// The account a request's replies are charged to: its connection's, under
/// the token's subject when there is one (a user's share does not grow with
/// the addresses they connect from), else under the client's address
/// (`client`: a trusted proxy's forwarded one; behind a proxy every
/// connection's peer is the proxy, and one client would take the share of
/// all).
fn charged_to(
    account: &Account,
    user: Option<&crate::auth::Claims>,
    client: Option<std::net::IpAddr>,
) -> Account {
    match (user, client) {
        (Some(user), _) => account.for_client(ClientKey::of_subject(&user.sub)),
        (None, Some(ip)) if ClientKey::of_ip(ip) != account.client() => {
            account.for_client(ClientKey::of_ip(ip))
        }
        (None, _) => account.clone(),
    }
}

fn check_status(frame: &Frame) -> Result<(), ApiError> {
    if frame.method_or_status == status::OVER_BUDGET {
        return Err(ApiError::Service(crate::error::Error::Overloaded));
    }
    if frame.method_or_status != status::OK {
        let why = String::from_utf8_lossy(&frame.body);
        return Err(ApiError::internal(format!(
            "rpc server refused a frame: {why}"
        )));
    }
    Ok(())
}

fn decode_reply<M: prost::Message + Default>(frame: Frame) -> Result<M, ApiError> {
    check_status(&frame)?;
    M::decode(frame.body).map_err(|e| ApiError::internal(format!("undecodable rpc reply: {e}")))
}

impl Handler for Gateway {
    type Pending = Started;

    /// A client that stops waiting (closes) frees its pull's memory at once;
    /// the RPC server still holds its side until `wait_ms` ends.
    fn held(started: &Started) -> bool {
        matches!(started.reply, PendingReply::WaitingPull(..))
    }

    fn start(&self, req: &Request, account: &Account) -> Started {
        let at = std::time::Instant::now();
        let _in_flight = metrics::track(Gauge::HttpInFlight);
        let entry = routes::find(req.path_and_query().0);
        let reply = self
            .route(req, account, entry)
            .unwrap_or_else(|err| PendingReply::Ready(err.into_response()));
        Started {
            reply,
            label: routes::label_of(entry),
            at,
            _in_flight,
        }
    }

    /// Not an `async fn`: one would hold `started` twice in its future
    /// (argument and local, rust-lang/rust#62958), and a waiting pull's
    /// connection holds that future for as long as it waits.
    fn finish(&self, started: Started) -> impl Future<Output = Response> + Send {
        let Started {
            reply,
            label,
            at,
            _in_flight,
        } = started;
        async move {
            let result = match reply {
                PendingReply::Ready(resp) => Ok(resp),
                PendingReply::Send(call) => self.finish_send(call).await,
                PendingReply::Pull(call) => self.finish_pull(call).await,
                PendingReply::Stream(call, stream) => self.finish_stream(call, stream).await,
                PendingReply::WaitingPull(call, held) => self.finish_waiting_pull(call, held).await,
                PendingReply::Readiness(call) => Ok(ready::finish(&self.rpc, call).await),
                PendingReply::Edit(call) => self.finish_edit(call).await,
                PendingReply::Delete(call) => self.finish_delete(call).await,
                PendingReply::Export(call, export) => self.finish_export(call, export).await,
            };
            let resp = result.unwrap_or_else(ApiError::into_response);
            METRICS.http_request(label.id(), resp.status, at.elapsed());
            drop(_in_flight);
            resp
        }
    }

    /// Requests refused before routing (malformed, too slow, over the
    /// connection limit) count under route `other`, with no duration.
    fn reject(&self, err: HttpError) -> Response {
        let resp = ApiError::Http(err).into_response();
        METRICS.http_rejected(Label::Other.id(), resp.status);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::unquote;

    #[test]
    fn idempotency_header_values_unquote() {
        assert_eq!(unquote(b"abc-1").as_deref(), Some("abc-1"));
        assert_eq!(unquote(b"\"abc-1\"").as_deref(), Some("abc-1"));
        assert_eq!(unquote(br#""a\"b\\c""#).as_deref(), Some(r#"a"b\c"#));
        for bad in [&b"\"abc"[..], b"\"", br#""a\x""#, br#""a"b""#, b"\xff"] {
            assert_eq!(unquote(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
