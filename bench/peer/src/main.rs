//! The reference server of issue 19: what a user would write in an
//! afternoon instead of im-server. One process, axum on tokio's
//! multi-threaded runtime, one redis-rs multiplexed connection shared by
//! every request; one sorted set per chat, score = send_time in µs, member =
//! the message as JSON. No send_time uniqueness across processes, no RPC
//! tier, no limits: it is the floor im-server must beat, not a rival design.
//!
//! Usage: im-peer <listen addr> <redis url>

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct SendRequest {
    chat: String,
    text: String,
    sender: String,
}

#[derive(Serialize)]
struct SendResponse {
    send_time: i64,
}

#[derive(Deserialize)]
struct PullRequest {
    chat: String,
    #[serde(default)]
    cursor: i64,
    #[serde(default = "default_limit")]
    limit: i64,
    #[serde(default)]
    reverse: bool,
}

fn default_limit() -> i64 {
    10
}

#[derive(Serialize, Deserialize)]
struct Message {
    #[serde(default)]
    chat: String,
    text: String,
    sender: String,
    send_time: i64,
}

#[derive(Serialize)]
struct PullResponse {
    messages: Vec<Message>,
    has_more: bool,
    next_cursor: i64,
}

type Failure = (StatusCode, String);

fn failed(err: impl std::fmt::Display) -> Failure {
    (StatusCode::SERVICE_UNAVAILABLE, err.to_string())
}

/// im-server's key for a chat, so bench/run trims both the same way.
fn chat_key(chat: &str) -> String {
    format!("im:{{{chat}}}")
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

async fn send(
    State(mut redis): State<MultiplexedConnection>,
    Json(req): Json<SendRequest>,
) -> Result<Json<SendResponse>, Failure> {
    if req.chat.is_empty() {
        return Err((StatusCode::BAD_REQUEST, "chat must not be empty".into()));
    }
    let send_time = now_micros();
    let member = Message {
        chat: String::new(),
        text: req.text,
        sender: req.sender,
        send_time,
    };
    let member = serde_json::to_string(&member).map_err(failed)?;
    let _: i64 = redis
        .zadd(chat_key(&req.chat), member, send_time)
        .await
        .map_err(failed)?;
    Ok(Json(SendResponse { send_time }))
}

async fn pull(
    State(mut redis): State<MultiplexedConnection>,
    Json(req): Json<PullRequest>,
) -> Result<Json<PullResponse>, Failure> {
    let limit = req.limit.clamp(1, 100);
    let key = chat_key(&req.chat);
    // One more than asked for tells whether there are more.
    let members: Vec<String> = if req.reverse {
        let top = if req.cursor > 0 { req.cursor.to_string() } else { "+inf".into() };
        redis
            .zrevrangebyscore_limit(&key, top, "-inf", 0, (limit + 1) as isize)
            .await
    } else {
        redis
            .zrangebyscore_limit(&key, req.cursor, "+inf", 0, (limit + 1) as isize)
            .await
    }
    .map_err(failed)?;
    let mut messages = Vec::with_capacity(members.len());
    for member in &members {
        let mut message: Message = serde_json::from_str(member).map_err(failed)?;
        message.chat.clone_from(&req.chat);
        messages.push(message);
    }
    let has_more = messages.len() as i64 > limit;
    let next_cursor = match has_more {
        true => messages.pop().map_or(0, |m| m.send_time),
        false => 0,
    };
    Ok(Json(PullResponse {
        messages,
        has_more,
        next_cursor,
    }))
}

async fn ping() -> &'static str {
    "{\"message\":\"pong\"}"
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8090".into());
    let url = args.next().unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let redis = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let app = Router::new()
        .route("/api/send", post(send))
        .route("/api/pull", get(pull))
        .route("/ping", get(ping))
        .with_state(redis);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("im-peer: listening on {listen}");
    axum::serve(listener, app).await?;
    Ok(())
}
