//! The Redis side of the notification hub ([`crate::notify`]): `im_send`
//! announces every chat it stored into with `SPUBLISH im:{chat}:new` (a
//! sharded channel, in the chat's slot, so on a Cluster it is published by
//! the chat's own master), and this subscribes to a chat's channel while
//! someone in this process waits for it.
//!
//! One connection per Redis node, owned by one task ([`run_node`]): it
//! turns the hub's requests into `SSUBSCRIBE` / `SUNSUBSCRIBE`, and the
//! replies into confirmations (which, per chat, come back in the order the
//! commands were written: a FIFO pairs them), announcements, and losses.
//! Whatever may have been missed — the connection broke, the node dropped a
//! subscription because its slot moved — is reported to the hub as lost, so
//! the chat's waiters re-read the store rather than trust the silence. On a
//! Cluster, [`run_cluster`] routes each chat to its slot's master.
//!
//! Pure parts ([`SubState`]) are apart from the socket loop, and tested
//! without Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp2::types::Resp2Frame as _;
use tokio::sync::mpsc;

use super::redis::ClusterShared;
use crate::mux::Protocol;
use crate::notify::{Hub, Upstream};
use crate::resp::protocol::{RespProtocol, decode_reply};
use crate::resp::url::RedisTarget;
use crate::resp::{Reply, command};

/// The channel `im_send` publishes to when it stores into `chat`: the
/// chat's key plus `:new`, so it hashes to the chat's slot.
pub fn channel(chat: &str) -> String {
    format!("{}:new", super::redis::chat_key(chat))
}

/// The chat a [`channel`] name is for.
fn chat_of(channel: &[u8]) -> Option<&str> {
    let name = std::str::from_utf8(channel).ok()?;
    name.strip_prefix("im:{")?.strip_suffix("}:new")
}

/// Waits after a failed connection attempt, doubling up to the maximum.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A connection attempt longer than this counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// One node connection's bookkeeping, without I/O.
#[derive(Default)]
pub struct SubState {
    /// Commands written and not yet answered, in order: `Some(generation)`
    /// for a subscribe, `None` for an unsubscribe.
    unanswered: HashMap<Box<str>, VecDeque<Option<u64>>>,
    /// Chats subscribed or being subscribed on this connection.
    chats: HashMap<Box<str>, u64>,
}

/// What to tell the hub about a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Confirmed(&'a str, u64),
    Announced(&'a str),
    Lost(&'a str),
    Nothing,
}

impl SubState {
    /// Encodes `request` into `out` and records it.
    pub fn write(&mut self, request: Upstream, out: &mut BytesMut) {
        let (verb, chat, expect): (&[u8], Box<str>, Option<u64>) = match request {
            Upstream::Subscribe { chat, generation } => {
                self.chats.insert(chat.clone(), generation);
                (b"SSUBSCRIBE", chat, Some(generation))
            }
            Upstream::Unsubscribe { chat } => {
                self.chats.remove(&chat);
                (b"SUNSUBSCRIBE", chat, None)
            }
        };
        out.extend_from_slice(&command::encode(&[verb, channel(&chat).as_bytes()]));
        self.unanswered.entry(chat).or_default().push_back(expect);
    }

    /// What `reply` means. `Lost` for a subscription the node dropped by
    /// itself or refused (on a Cluster: its slot is elsewhere now).
    pub fn read<'a>(&mut self, reply: &'a Reply) -> Event<'a> {
        let Reply::Array(parts) = reply else {
            return Event::Nothing;
        };
        let (Some(kind), Some(name)) = (parts.first(), parts.get(1)) else {
            return Event::Nothing;
        };
        let (Some(kind), Some(chat)) = (kind.as_bytes(), name.as_bytes().and_then(chat_of)) else {
            return Event::Nothing;
        };
        match kind {
            b"smessage" => Event::Announced(chat),
            b"ssubscribe" => match self.answered(chat) {
                Some(Some(generation)) => Event::Confirmed(chat, generation),
                _ => Event::Nothing,
            },
            b"sunsubscribe" => match self.answered_unsubscribe(chat) {
                true => Event::Nothing,
                // Not ours: the node dropped the subscription (slot moved).
                false => {
                    self.chats.remove(chat);
                    Event::Lost(chat)
                }
            },
            _ => Event::Nothing,
        }
    }

    /// An error reply answers the oldest unanswered command of some chat;
    /// RESP does not say which, so every chat being subscribed is lost
    /// (errors are rare: a Cluster node that no longer owns the slot).
    pub fn read_error(&mut self) -> Vec<Box<str>> {
        let lost: Vec<Box<str>> = self
            .unanswered
            .iter()
            .filter(|(_, q)| q.iter().any(Option::is_some))
            .map(|(chat, _)| chat.clone())
            .collect();
        for chat in &lost {
            self.chats.remove(chat);
        }
        self.unanswered.clear();
        lost
    }

    fn answered(&mut self, chat: &str) -> Option<Option<u64>> {
        let queue = self.unanswered.get_mut(chat)?;
        let front = queue.pop_front();
        if queue.is_empty() {
            self.unanswered.remove(chat);
        }
        front
    }

    fn answered_unsubscribe(&mut self, chat: &str) -> bool {
        match self.unanswered.get(chat).and_then(|q| q.front()) {
            Some(None) => {
                self.answered(chat);
                true
            }
            _ => false,
        }
    }

    /// The connection is gone: every chat it carried is lost.
    pub fn disconnected(&mut self) -> Vec<Box<str>> {
        self.unanswered.clear();
        self.chats.drain().map(|(chat, _)| chat).collect()
    }
}

/// Standalone Redis: one connection for every chat.
pub async fn run_standalone(
    target: RedisTarget,
    hub: Arc<Hub>,
    requests: mpsc::UnboundedReceiver<Upstream>,
) {
    tokio::select! {
        () = run_node(target, hub.clone(), requests) => {}
        () = sweep_lingering(&hub) => {}
    }
}

/// Ends the hub's lingering subscriptions ([`Hub::sweep`]), forever.
async fn sweep_lingering(hub: &Hub) {
    let mut tick = tokio::time::interval(crate::notify::LINGER / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        hub.sweep(tick.tick().await);
    }
}

/// Redis Cluster: each chat's subscription goes to its slot's master, on a
/// connection per master opened on first use.
pub async fn run_cluster(
    shared: Arc<ClusterShared>,
    hub: Arc<Hub>,
    mut requests: mpsc::UnboundedReceiver<Upstream>,
) {
    let mut nodes: HashMap<Arc<str>, mpsc::UnboundedSender<Upstream>> = HashMap::new();
    // Where each chat was subscribed, for its unsubscribe.
    let mut placed: HashMap<Box<str>, Arc<str>> = HashMap::new();
    let sweeping = sweep_lingering(&hub);
    tokio::pin!(sweeping);
    loop {
        let request = tokio::select! {
            request = requests.recv() => request,
            () = &mut sweeping => None,
        };
        let Some(request) = request else { break };
        let (chat, addr) = match &request {
            Upstream::Subscribe { chat, .. } => {
                let slot = redis_protocol::redis_keyslot(super::redis::chat_key(chat).as_bytes());
                let Some(addr) = shared.owner(slot) else {
                    hub.lost(chat);
                    continue;
                };
                placed.insert(chat.clone(), addr.clone());
                (chat.clone(), addr)
            }
            Upstream::Unsubscribe { chat } => match placed.remove(chat) {
                Some(addr) => (chat.clone(), addr),
                None => continue,
            },
        };
        let node = nodes.entry(addr.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run_node(shared.node_target(&addr), hub.clone(), rx));
            tx
        });
        if node.send(request).is_err() {
            hub.lost(&chat);
        }
    }
}

/// One node's subscriber connection, reconnected with back-off until the
/// hub is gone.
async fn run_node(
    target: RedisTarget,
    hub: Arc<Hub>,
    mut requests: mpsc::UnboundedReceiver<Upstream>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut warned = false;
    loop {
        // Requests made while connecting wait in the channel for it.
        let mut protocol = RespProtocol::new(target.clone(), &[]);
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, protocol.connect()).await {
            Ok(Ok(stream)) => stream,
            failed => {
                if !warned {
                    let why = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => "timed out".into(),
                    };
                    crate::logging::warning!(
                        "redis subscriber cannot connect to {target}; retrying";
                        why = why
                    );
                    warned = true;
                }
                // Not connected, nothing can be promised: refuse at once
                // (those waiters answer what they read), until the retry.
                let retry = tokio::time::sleep(backoff);
                tokio::pin!(retry);
                loop {
                    tokio::select! {
                        () = &mut retry => break,
                        request = requests.recv() => match request {
                            Some(Upstream::Subscribe { chat, .. }) => hub.lost(&chat),
                            Some(Upstream::Unsubscribe { .. }) => {}
                            None => return,
                        },
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        warned = false;
        let mut state = SubState::default();
        let result = serve(&stream, &hub, &mut state, &mut requests).await;
        for chat in state.disconnected() {
            hub.lost(&chat);
        }
        match result {
            Ok(()) => return, // the hub is gone
            Err(err) => {
                crate::logging::warning!("redis subscriber connection to {target} lost"; err = err)
            }
        }
    }
}

async fn serve(
    stream: &crate::mux::Stream,
    hub: &Hub,
    state: &mut SubState,
    requests: &mut mpsc::UnboundedReceiver<Upstream>,
) -> std::io::Result<()> {
    let mut input = BytesMut::with_capacity(4096);
    let mut output = BytesMut::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { return Ok(()) };
                state.write(request, &mut output);
                // Everything queued meanwhile goes in the same write.
                while let Ok(more) = requests.try_recv() {
                    state.write(more, &mut output);
                }
                stream.write_all(&output).await?;
                output.clear();
            }
            read = stream.read_some(&mut input) => {
                read?;
                while let Some(reply) = decode_reply(&mut input)? {
                    if let Reply::Error(err) = &reply {
                        crate::logging::warning!("redis subscriber error"; err = err);
                        for chat in state.read_error() {
                            hub.lost(&chat);
                        }
                        continue;
                    }
                    match state.read(&reply) {
                        Event::Confirmed(chat, generation) => hub.confirmed(chat, generation),
                        Event::Announced(chat) => hub.notify(chat),
                        Event::Lost(chat) => hub.lost(chat),
                        Event::Nothing => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn push(kind: &str, chat: &str) -> Reply {
        Reply::Array(vec![
            Reply::BulkString(Bytes::from(kind.to_string())),
            Reply::BulkString(Bytes::from(channel(chat))),
            Reply::Integer(1),
        ])
    }

    fn subscribe(chat: &str, generation: u64) -> Upstream {
        Upstream::Subscribe {
            chat: chat.into(),
            generation,
        }
    }

    #[test]
    fn channels_name_their_chat() {
        for chat in ["room", "a:b", "x}y", "{a}", "ä"] {
            assert_eq!(chat_of(channel(chat).as_bytes()), Some(chat));
        }
        assert_eq!(chat_of(b"other"), None);
    }

    #[test]
    fn confirmations_pair_with_commands_in_order() {
        let mut state = SubState::default();
        let mut out = BytesMut::new();
        state.write(subscribe("c", 1), &mut out);
        state.write(Upstream::Unsubscribe { chat: "c".into() }, &mut out);
        state.write(subscribe("c", 2), &mut out);
        assert!(out.starts_with(b"*2\r\n$10\r\nSSUBSCRIBE\r\n"));
        let (sub, unsub) = (push("ssubscribe", "c"), push("sunsubscribe", "c"));
        assert_eq!(state.read(&sub), Event::Confirmed("c", 1));
        assert_eq!(state.read(&unsub), Event::Nothing);
        assert_eq!(state.read(&sub), Event::Confirmed("c", 2));
        let message = push("smessage", "c");
        assert_eq!(state.read(&message), Event::Announced("c"));
        // Now unsolicited: the node dropped it.
        assert_eq!(state.read(&unsub), Event::Lost("c"));
    }

    #[test]
    fn a_lost_connection_loses_every_chat_on_it() {
        let mut state = SubState::default();
        let mut out = BytesMut::new();
        state.write(subscribe("a", 1), &mut out);
        state.write(subscribe("b", 2), &mut out);
        state.write(Upstream::Unsubscribe { chat: "b".into() }, &mut out);
        assert_eq!(state.disconnected(), vec![Box::<str>::from("a")]);
    }
}
