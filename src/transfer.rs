//! `im-server export --chat X --redis URL` and `im-server import --chat X
//! --redis URL`: a chat as NDJSON (one message a line, oldest first, edits
//! applied, deletions omitted — the objects of `/api/pull`'s `messages`),
//! for moving a chat between deployments. Both run in constant memory: the
//! export pages through the chat with ordinary pulls (100 at a time), the
//! import writes 100 lines at a time; the import keeps each message's
//! `send_time` (and `edited_at`) and refuses a chat that is not empty.
//! `URL` is a standalone Redis or a Cluster (one node, or a list).

use std::io::{BufRead, Write};

use serde::Deserialize;

use crate::domain::{MAX_LIMIT, PullQuery, canonical_chat};
use crate::error::Error;
use crate::gateway::pull_wire::write_message;
use crate::proto::fields::pull_response;
use crate::resp::command;
use crate::store::Store;
use crate::store::lifecycle::Runner;
use crate::store::redis::{
    ClusterShared, ClusterStore, Probe, RedisEngine, RedisOptions, RedisStore, Route, chat_key,
    not_a_cluster, probe, stored_member,
};
use crate::wire::{Value, next_field};

pub const USAGE: &str = "Usage: im-server export --chat CHAT --redis URL   (NDJSON on stdout)\n\
    \x20      im-server import --chat CHAT --redis URL   (NDJSON on stdin, into an empty chat)\n";

/// Lines written per ZADD on import.
const IMPORT_BATCH: usize = 100;

/// `export` or `import` with its arguments; the process's exit status.
pub fn main(name: &str, args: Vec<String>) -> Result<(), String> {
    let (mut chat, mut url) = (None, None);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--chat" => chat = args.next(),
            "--redis" => url = args.next(),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    let chat = chat.filter(|c| !c.is_empty()).ok_or(USAGE)?;
    let chat = canonical_chat(&chat).into_owned();
    let url = url
        .or_else(|| std::env::var("REDIS_URL").ok())
        .ok_or(USAGE)?;
    crate::runtime::current_thread()?.block_on(async {
        let export_chat = name == "export";
        match open(&url).await? {
            Opened::Standalone(store) if export_chat => export(&store, &chat).await,
            Opened::Standalone(store) => import(&store, &chat).await,
            Opened::Cluster(store) if export_chat => export(&store, &chat).await,
            Opened::Cluster(store) => import(&store, &chat).await,
        }
    })
}

/// The Redis at `url`: standalone, or a Cluster (a list of nodes, or one
/// node in cluster mode), as the server finds it at start-up.
enum Opened {
    Standalone(RedisStore),
    Cluster(ClusterStore),
}

async fn open(url: &str) -> Result<Opened, String> {
    let targets = crate::resp::url::parse_list(url)?;
    let defaults = crate::config::Config::defaults();
    let options = RedisOptions {
        connections: 1,
        queue: defaults.queue,
        max_in_flight: defaults.max_in_flight,
        timeout: std::time::Duration::from_secs(10),
        max_queued_bytes: defaults.max_queued_bytes,
        wait_replicas: 0,
        idempotency_ttl: defaults.idempotency_ttl,
        change_log_retention: defaults.change_log_retention,
        retention: Default::default(),
    };
    let probed = tokio::time::timeout(options.timeout, probe(&targets)).await;
    match (probed, targets.len()) {
        (Ok(Probe::Cluster(map)), _) => {
            let shared = ClusterShared::new(&targets, map)?;
            Ok(Opened::Cluster(ClusterStore::new(shared, &options)))
        }
        (Ok(Probe::Standalone), 1) => {
            let target = targets.into_iter().next().ok_or("no Redis node given")?;
            Ok(Opened::Standalone(RedisStore::new(target, &options)))
        }
        (Ok(Probe::Standalone), _) => Err(not_a_cluster(url)),
        (Ok(Probe::Unreachable(err)), _) => Err(format!("{url}: Redis does not answer: {err}")),
        (Err(_), _) => Err(format!("{url}: Redis does not answer in time")),
    }
}

/// Writes every message of `chat`, oldest first, one JSON object a line.
async fn export<R: Route>(store: &RedisEngine<R>, chat: &str) -> Result<(), String> {
    let out = &mut std::io::stdout().lock();
    let mut cursor = 0;
    loop {
        let query = PullQuery {
            chat: chat.to_string(),
            cursor,
            limit: MAX_LIMIT as usize,
            reverse: true,
        };
        let page = store.pull(&query).await.map_err(failed)?;
        // The same JSON as a pull's (and `/api/export`'s), written by
        // the same code.
        let mut rest = &page.wire[..];
        let mut line = Vec::new();
        while !rest.is_empty() {
            let field = next_field(&mut rest).map_err(|e| e.to_string())?;
            if let (pull_response::MESSAGES, Value::Bytes(message)) = field {
                line.clear();
                write_message(&mut line, message).map_err(|e| e.to_string())?;
                line.push(b'\n');
                out.write_all(&line)
                    .map_err(|e| format!("cannot write: {e}"))?;
            }
        }
        if !page.has_more {
            return out.flush().map_err(|e| format!("cannot write: {e}"));
        }
        cursor = page.next_cursor;
    }
}

#[derive(Deserialize)]
struct Line {
    text: String,
    sender: String,
    send_time: i64,
    #[serde(default)]
    edited_at: i64,
}

/// Stores the NDJSON messages of `input` in the empty `chat`, with their
/// `send_time`s (and `edited_at`s).
async fn import<R: Route>(store: &RedisEngine<R>, chat: &str) -> Result<(), String> {
    let input = &mut std::io::stdin().lock();
    let key = chat_key(chat);
    let count = store
        .runner(chat)
        .run(command::encode(&[b"ZCARD", key.as_bytes()]), false)
        .await
        .map_err(failed)?;
    if !matches!(count, crate::resp::Reply::Integer(0)) {
        return Err(format!(
            "chat {chat:?} is not empty: import only into an empty chat"
        ));
    }
    let mut batch: Vec<(String, Vec<u8>)> = Vec::with_capacity(IMPORT_BATCH);
    let (mut line_no, mut total) = (0usize, 0usize);
    for line in input.lines() {
        line_no += 1;
        let line = line.map_err(|e| format!("cannot read line {line_no}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let m: Line = serde_json::from_str(&line).map_err(|e| format!("line {line_no}: {e}"))?;
        crate::domain::validate_send(chat, &m.sender, &m.text)
            .map_err(|e| format!("line {line_no}: {}", e.0))?;
        if m.send_time <= 0 {
            return Err(format!("line {line_no}: `send_time` must be positive"));
        }
        batch.push((m.send_time.to_string(), member(&m)));
        if batch.len() == IMPORT_BATCH {
            total += write(store, chat, &key, &mut batch).await?;
        }
    }
    total += write(store, chat, &key, &mut batch).await?;
    eprintln!("im-server import: {total} messages into {chat:?}");
    Ok(())
}

/// The member a message is stored as (see `proto/im.proto`).
fn member(m: &Line) -> Vec<u8> {
    use crate::proto::fields::stored_message;
    let mut out = stored_member(m.send_time, &m.text, &m.sender);
    if m.edited_at != 0 {
        out.push(((stored_message::EDITED_AT << 3) | 1) as u8);
        out.extend_from_slice(&m.edited_at.to_le_bytes());
    }
    out
}

async fn write<R: Route>(
    store: &RedisEngine<R>,
    chat: &str,
    key: &str,
    batch: &mut Vec<(String, Vec<u8>)>,
) -> Result<usize, String> {
    if batch.is_empty() {
        return Ok(0);
    }
    let mut args: Vec<&[u8]> = vec![b"ZADD", key.as_bytes()];
    for (score, member) in batch.iter() {
        args.extend([score.as_bytes(), &member[..]]);
    }
    let reply = store
        .runner(chat)
        .run(command::encode(&args), true)
        .await
        .map_err(failed)?;
    let n = batch.len();
    batch.clear();
    match reply {
        crate::resp::Reply::Integer(added) if added as usize == n => Ok(n),
        other => Err(format!(
            "ZADD answered {other:?} for {n} messages (a repeated send_time?)"
        )),
    }
}

fn failed(err: Error) -> String {
    format!("redis: {err:?}")
}
