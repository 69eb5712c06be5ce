//! `GET /api/export?chat=`: the whole chat as NDJSON (`application/x-ndjson`,
//! one message a line, oldest first, edits applied, deletions omitted —
//! the objects of `/api/pull`'s `messages`), streamed in constant memory:
//! the gateway pages through the chat with ordinary pulls (100 at a time,
//! the next one only once the previous page is written out, as a stream's),
//! so it never holds more than one page. Admitted and authorized as a pull.
//! The body ends (the last chunk) after the newest message; a failure half
//! way ends it with one line `{"error":{...}}` instead.

use std::future::Future;
use std::pin::Pin;

use bytes::{BufMut, Bytes, BytesMut};

use super::error::ApiError;
use super::pull_wire::write_message;
use super::stream::{has_messages, page_of};
use super::{Gateway, PendingReply, access, json};
use crate::http::Request;
use crate::http::response::{Batch, EventSource};
use crate::proto::PullRequest;
use crate::proto::fields::pull_response;
use crate::rpc::balanced::{BalancedCall, BalancedClient};
use crate::rpc::client::RpcRequest;
use crate::wire::{Value, next_field};

fn page_request(chat: &str, cursor: i64) -> PullRequest {
    PullRequest {
        chat: chat.to_string(),
        cursor,
        limit: crate::domain::MAX_LIMIT,
        reverse: true,
        ..PullRequest::default()
    }
}

impl Gateway {
    pub(super) fn start_export(&self, req: &Request) -> Result<PendingReply, ApiError> {
        let user = self.access.admit(req, access::Api::Pull)?;
        let (chat, _cursor) = json::parse_stream(&req.body, req.path_and_query().1)?;
        if let Some(user) = &user {
            access::authorize(user, &chat, None)?;
        }
        let call = self
            .rpc
            .start(RpcRequest::Pull(page_request(&chat, 0), None))?;
        let export = Export {
            rpc: self.rpc.clone(),
            chat,
            cursor: 0,
            page: Bytes::new(),
            pos: 0,
            scratch: Vec::new(),
        };
        Ok(PendingReply::Export(call, Box::new(export)))
    }

    pub(super) async fn finish_export(
        &self,
        call: BalancedCall,
        mut export: Box<Export>,
    ) -> Result<crate::http::Response, ApiError> {
        let page = page_of(self.rpc.finish(call).await?)?;
        export.take(page);
        Ok(crate::http::Response::event_stream(export))
    }
}

/// One export in progress.
pub struct Export {
    rpc: BalancedClient,
    chat: String,
    /// The send_time of the last message taken.
    cursor: i64,
    page: Bytes,
    pos: usize,
    scratch: Vec<u8>,
}

/// The page after `cursor`; the end of the body (an empty final write)
/// when there is none, or an error line.
async fn next_page(rpc: BalancedClient, chat: String, cursor: i64) -> Batch {
    let page = async {
        let call = rpc.start(RpcRequest::Pull(page_request(&chat, cursor), None))?;
        page_of(rpc.finish(call).await?)
    };
    match page.await {
        Ok(page) if has_messages(&page) => Ok(page),
        Ok(_) => Err(Vec::new()),
        Err(err) => {
            let mut line = err.json_body();
            line.push(b'\n');
            Err(line)
        }
    }
}

impl EventSource for Export {
    fn fill(&mut self, out: &mut BytesMut, until: usize) -> bool {
        while out.len() < until {
            let mut rest = &self.page[self.pos..];
            if rest.is_empty() {
                return false;
            }
            // The page was decoded whole by `page_of`.
            let Ok(field) = next_field(&mut rest) else {
                self.pos = self.page.len();
                return false;
            };
            self.pos = self.page.len() - rest.len();
            if let (pull_response::MESSAGES, Value::Bytes(message)) = field {
                self.scratch.clear();
                if write_message(&mut self.scratch, message).is_ok() {
                    out.put_slice(&self.scratch);
                    out.put_u8(b'\n');
                }
            }
        }
        self.pos < self.page.len()
    }

    fn more(&mut self) -> Pin<Box<dyn Future<Output = Batch> + Send>> {
        Box::pin(next_page(self.rpc.clone(), self.chat.clone(), self.cursor))
    }

    fn take(&mut self, page: Bytes) {
        let mut rest = &page[..];
        while let Ok(field) = next_field(&mut rest) {
            if let (pull_response::MESSAGES, Value::Bytes(mut message)) = field {
                while let Ok(field) = next_field(&mut message) {
                    if let (crate::proto::fields::message::SEND_TIME, Value::Varint(t)) = field {
                        self.cursor = t as i64;
                    }
                }
            }
            if rest.is_empty() {
                break;
            }
        }
        self.page = page;
        self.pos = 0;
    }

    fn content_type(&self) -> &'static [u8] {
        b"application/x-ndjson"
    }

    /// No heartbeat: a comment line would not be NDJSON (an export's pages
    /// come without waiting anyway).
    fn heartbeat(&self) -> &'static [u8] {
        b""
    }

    fn lagged(&self) -> &'static [u8] {
        b"{\"error\":{\"code\":\"lagged\",\"message\":\"the client read too slowly\"}}\n"
    }
}
