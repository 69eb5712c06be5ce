//! The Redis store, standalone or Cluster: one engine, two routers.
//!
//! Both stores are a [`RedisEngine`]: the same key schema, members and Lua
//! library ([`schema`]), the same send queue and batch loop ([`queue`],
//! [`batch`]), the same counted calls on a node ([`node`]), the same
//! edits, deletes and pulls. They differ only in where a command goes, a
//! [`Route`]: the one node ([`standalone`]), or the master of the chat's
//! hash slot, redirections followed ([`cluster`]; what a reply means for
//! the command is [`redirect`]'s, pure). [`probe`] tells which one the
//! configured Redis is.

mod batch;
pub mod cluster;
mod node;
pub mod probe;
mod queue;
mod redirect;
mod schema;
mod standalone;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

pub use cluster::{ClusterShared, ClusterStore};
pub use probe::{Probe, not_a_cluster, probe};
pub use schema::chat_key;
pub(super) use schema::read_stored;
pub(crate) use schema::stored_member;
pub use standalone::RedisStore;

use self::queue::SendQueue;
use super::retention::Retention;
use super::{Completion, Page, Sent, Store};
use crate::domain::PullQuery;
use crate::error::Error;
use crate::notify::{Hub, Waiter};
use crate::resp::Reply;
use crate::resp::protocol::RespRequest;

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub connections: usize,
    pub queue: usize,
    pub max_in_flight: usize,
    /// A command not answered within this is reported as unavailable.
    pub timeout: Duration,
    /// Bytes of commands queued per connection, and of sends waiting for
    /// the batcher; more are refused as overloaded.
    pub max_queued_bytes: usize,
    /// A send is acknowledged only once this many replicas have it (0: at once).
    pub wait_replicas: u32,
    /// How long an idempotency key is remembered (whole seconds, at least 1).
    pub idempotency_ttl: Duration,
    /// How long a chat's change log keeps an edit or delete.
    pub change_log_retention: Duration,
    /// How much history a chat keeps.
    pub retention: Retention,
}

impl RedisOptions {
    /// What a batch of sends is written as: the `im_send` call, followed in
    /// the same write by `WAIT` when replicas must confirm it (no extra
    /// round trip). WAIT gets half the Redis timeout, so that its "not
    /// enough replicas" answer arrives before the caller gives up.
    fn send_request(&self, fcall: Bytes) -> RespRequest {
        let request = RespRequest::from(fcall);
        match self.wait_replicas {
            0 => request,
            n => request.then_wait(n, (self.timeout.as_millis() as u64 / 2).max(1)),
        }
    }
}

/// Where a store's commands go: the one node ([`NodeRoute`]), or the
/// master of the chat's slot ([`SlotRoute`]).
pub trait Route: Send + Sync + 'static {
    /// Runs `request` on the node of `chat` by `deadline` and returns the
    /// reply of its (last) command, error replies as they are. With
    /// `wait_replicas`, the request ends in a WAIT whose shortfall is
    /// `Unavailable`. A function call that finds the library missing (a
    /// flushed or restored Redis) loads it and runs once more: the error
    /// came before the function ran.
    fn call(
        &self,
        chat: &str,
        request: RespRequest,
        wait_replicas: u32,
        deadline: Instant,
    ) -> impl Future<Output = Result<Reply, Error>> + Send;

    /// Starts a pull that does not wait, and runs `done` with its page
    /// (from the retention floor of when it is written).
    fn start_pull(&self, query: PullQuery, deadline: Instant, done: Completion<Page>);

    /// Whether every node the store needs answers `PING` by `deadline`.
    fn ping(&self, deadline: Instant) -> impl Future<Output = Result<(), String>> + Send;
}

/// A Redis store: the send queue and its batcher, the long-poll hub, and
/// where commands go.
pub struct RedisEngine<R> {
    route: R,
    /// Sends waiting for the batcher.
    sends: SendQueue,
    /// Pulls waiting for new messages, fed by the process's subscriber
    /// (src/store/subscriber.rs); `None`: pulls never wait.
    hub: Option<Arc<Hub>>,
    /// The change log's retention, as `im_edit` / `im_delete` take it.
    keep: String,
    /// How edits and deletes are written (`WAIT` after them, as after sends).
    options: RedisOptions,
}

impl<R: Route> RedisEngine<R> {
    fn with_route(route: R, sends: SendQueue, options: &RedisOptions) -> Self {
        RedisEngine {
            route,
            sends,
            hub: None,
            keep: super::lifecycle::keep_micros(options.change_log_retention),
            options: options.clone(),
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.options.timeout
    }

    /// The retention window's oldest send_time now (0: the whole chat).
    fn floor(&self) -> i64 {
        self.options.retention.floor(crate::now_micros())
    }

    /// Lets pulls wait for new messages announced through `hub`.
    pub fn with_hub(mut self, hub: Arc<Hub>) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Registers a pull that will wait for `chat`, if pulls may wait.
    pub fn waiter(&self, chat: &str) -> Option<Waiter> {
        self.hub.as_ref().map(|hub| hub.register(chat))
    }

    /// See [`crate::store::AnyStore::start_send`].
    pub fn start_send(&self, chat: &str, sender: &str, text: &str, done: Completion) {
        self.sends.start(chat, sender, text, done)
    }

    /// Reads one page (a pull that does not wait) and runs `done` with it,
    /// by the Redis timeout. On one node without a task or a timer of its
    /// own (a task per pull is the RPC server's largest allocation; see
    /// [`crate::store::AnyStore::start_send`]).
    pub fn start_pull(&self, query: PullQuery, done: Completion<Page>) {
        self.route.start_pull(query, self.deadline(), done)
    }

    /// Whether Redis answers commands now (`GET /ready`, through the RPC
    /// `Ping`), within the Redis timeout: `Err` says why not.
    pub async fn ping(&self) -> Result<(), String> {
        self.route.ping(self.deadline()).await
    }

    /// Runs commands on `chat`'s node (edits, deletes, imports).
    pub(crate) fn runner<'a>(&'a self, chat: &'a str) -> ChatRunner<'a, R> {
        ChatRunner { engine: self, chat }
    }
}

/// The page of `query` from the reply to its [`schema::pull_command`].
fn page_of(query: &PullQuery, reply: Result<Reply, Error>) -> Result<Page, Error> {
    match reply? {
        Reply::Error(err) => Err(Error::from_redis(&err)),
        reply => schema::page_from_reply(query, reply),
    }
}

impl<R: Route> Store for RedisEngine<R> {
    async fn send(
        &self,
        chat: &str,
        sender: &str,
        text: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Sent, Error> {
        self.sends.send(chat, sender, text, idempotency_key).await
    }

    async fn pull(&self, query: &PullQuery) -> Result<Page, Error> {
        let command = schema::pull_command(query, self.floor());
        let reply = self
            .route
            .call(&query.chat, command.into(), 0, self.deadline())
            .await;
        page_of(query, reply)
    }

    async fn edit(
        &self,
        chat: &str,
        send_time: i64,
        text: &str,
        actor: Option<&str>,
    ) -> Result<i64, Error> {
        let runner = self.runner(chat);
        super::lifecycle::edit(&runner, chat, send_time, text, actor, &self.keep).await
    }

    async fn delete(
        &self,
        chat: &str,
        send_time: i64,
        actor: Option<&str>,
        admin: bool,
    ) -> Result<(), Error> {
        let runner = self.runner(chat);
        let tombstones = self.options.retention.messages;
        super::lifecycle::delete(
            &runner, chat, send_time, actor, admin, &self.keep, tombstones,
        )
        .await
    }

    async fn changes(
        &self,
        chat: &str,
        after: i64,
        limit: usize,
    ) -> Result<crate::proto::ChangesResponse, Error> {
        let runner = self.runner(chat);
        super::lifecycle::changes(&runner, chat, after, limit, &self.keep).await
    }
}

/// Runs an edit's or delete's commands on its chat's node (every key of
/// theirs is in the chat's slot).
pub(crate) struct ChatRunner<'a, R> {
    engine: &'a RedisEngine<R>,
    chat: &'a str,
}

impl<R: Route> super::lifecycle::Runner for ChatRunner<'_, R> {
    fn floor(&self) -> i64 {
        self.engine.floor()
    }

    async fn run(&self, command: Bytes, change: bool) -> Result<Reply, Error> {
        let options = &self.engine.options;
        // Changes wait for replicas like sends; reads need not.
        let (request, wait) = match change {
            true => (options.send_request(command), options.wait_replicas),
            false => (RespRequest::from(command), 0),
        };
        let deadline = self.engine.deadline();
        match self
            .engine
            .route
            .call(self.chat, request, wait, deadline)
            .await?
        {
            Reply::Error(err) if change => Err(Error::Internal(format!("redis: {err}"))),
            Reply::Error(err) => Err(Error::from_redis(&err)),
            reply => Ok(reply),
        }
    }
}
