//! bench/ws_load: load over `GET /api/ws`, from one process holding many
//! connections (tokio, the library's own frame codec in its client role).
//!
//! ```text
//! cargo run --release --example ws_load -- sends  --addr 127.0.0.1:8080 \
//!     [--transport ws|http] [--connections 100] [--rooms 1] [--window 1] [--duration 10]
//! cargo run --release --example ws_load -- fanout --addr 127.0.0.1:8080 \
//!     [--subscribers 1000] [--rooms 100] [--publishers 10] [--rate 2000] [--duration 10]
//! ```
//!
//! With `BENCH_TOKEN` set (a token whose `sub` is `bench`, for a server
//! with authentication on), every upgrade and every HTTP send carries it
//! as `Authorization: Bearer`.
//!
//! * `sends`: each connection keeps `--window` sends in flight (1: the next
//!   is sent when the last is answered), to a random room of `--rooms`,
//!   over WebSocket (`op:send`, replies matched by `id`) or over HTTP
//!   keep-alive (`POST /api/send`; a window above 1 is HTTP pipelining,
//!   which browsers and most HTTP libraries do not do), for comparison in
//!   one run. Requests that go out together are one write. Prints sends/s
//!   and the p50/p99 of request -> reply.
//! * `fanout`: `--subscribers` connections each subscribe to one of
//!   `--rooms` (round robin); `--publishers` WebSocket connections send
//!   `--rate` messages per second in all to random rooms. Latency is the
//!   delivery's arrival on the subscriber's clock minus the message's
//!   `send_time` (same host, same clock). Prints deliveries/s, p50/p99 and
//!   how many expected deliveries were missing.
//!
//! One line of `key=value` per run, for scripts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use im_server::ws::frame::{Decoder, Incoming, Side, opcode, put_client_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

struct Args {
    mode: String,
    addr: String,
    transport: String,
    connections: usize,
    window: usize,
    rooms: usize,
    subscribers: usize,
    publishers: usize,
    rate: u64,
    duration: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: ws_load sends|fanout [--flag value]...")?;
    let mut args = Args {
        mode,
        addr: "127.0.0.1:8080".into(),
        transport: "ws".into(),
        connections: 100,
        window: 1,
        rooms: 1,
        subscribers: 1000,
        publishers: 10,
        rate: 2000,
        duration: Duration::from_secs(10),
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("bad number {value}"))
        };
        match flag.as_str() {
            "--addr" => args.addr = value.clone(),
            "--transport" => args.transport = value.clone(),
            "--connections" => args.connections = number()?.max(1) as usize,
            "--rooms" => args.rooms = number()?.max(1) as usize,
            "--window" => args.window = number()?.max(1) as usize,
            "--subscribers" => args.subscribers = number()?.max(1) as usize,
            "--publishers" => args.publishers = number()?.max(1) as usize,
            "--rate" => args.rate = number()?.max(1),
            "--duration" => args.duration = Duration::from_secs(number()?.max(1)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// `Authorization: Bearer …\r\n` from `BENCH_TOKEN`, or nothing.
fn authorization() -> String {
    match std::env::var("BENCH_TOKEN") {
        Ok(token) if !token.is_empty() => format!("Authorization: Bearer {token}\r\n"),
        _ => String::new(),
    }
}

fn now_micros() -> i64 {
    im_server::now_micros()
}

/// A small xorshift generator: rooms picked at random without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// One WebSocket client connection.
struct Ws {
    socket: TcpStream,
    input: BytesMut,
    decoder: Decoder,
}

impl Ws {
    async fn connect(addr: &str) -> std::io::Result<Ws> {
        let mut socket = TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        let head = format!(
            "GET /api/ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{}\r\n",
            authorization()
        );
        socket.write_all(head.as_bytes()).await?;
        let mut input = BytesMut::with_capacity(16 * 1024);
        let end = loop {
            if socket.read_buf(&mut input).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if let Some(i) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        if !input.starts_with(b"HTTP/1.1 101 ") {
            return Err(std::io::Error::other("the upgrade was refused"));
        }
        let _ = input.split_to(end);
        let decoder = Decoder::new(Side::Client, 64 << 20);
        Ok(Ws {
            socket,
            input,
            decoder,
        })
    }

    async fn send(&mut self, text: &str) -> std::io::Result<()> {
        let mut out = BytesMut::with_capacity(text.len() + 14);
        put_client_frame(&mut out, true, opcode::TEXT, text.as_bytes(), [1, 2, 3, 4]);
        self.socket.write_all(&out).await
    }

    /// The next text message (pings answered, other control frames skipped).
    async fn recv(&mut self) -> std::io::Result<bytes::Bytes> {
        loop {
            match self.decoder.decode(&mut self.input) {
                Ok(Some(Incoming::Text(text))) => return Ok(text),
                Ok(Some(Incoming::Ping(payload))) => {
                    let mut out = BytesMut::new();
                    put_client_frame(&mut out, true, opcode::PONG, &payload, [1, 2, 3, 4]);
                    self.socket.write_all(&out).await?;
                }
                Ok(Some(Incoming::Close(_))) => {
                    return Err(std::io::ErrorKind::ConnectionAborted.into());
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    if self.socket.read_buf(&mut self.input).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(err) => return Err(std::io::Error::other(format!("{err:?}"))),
            }
        }
    }
}

/// Latencies in µs and a count, shared by the tasks.
#[derive(Default)]
struct Samples {
    latencies: Mutex<Vec<u32>>,
    count: AtomicU64,
}

impl Samples {
    async fn add(&self, batch: &mut Vec<u32>) {
        self.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.latencies.lock().await.append(batch);
    }

    /// Latencies only: the caller counts.
    async fn add_latencies(&self, batch: &mut Vec<u32>) {
        self.latencies.lock().await.append(batch);
    }

    async fn percentiles(&self) -> (u32, u32, u32) {
        let mut all = std::mem::take(&mut *self.latencies.lock().await);
        all.sort_unstable();
        let at = |q: f64| {
            all.get(((all.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or(0)
        };
        (at(0.5), at(0.99), at(1.0))
    }
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(why) => {
            eprintln!("ws_load: {why}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = match args.mode.as_str() {
        "sends" => runtime.block_on(sends(Arc::new(args))),
        "fanout" => runtime.block_on(fanout(Arc::new(args))),
        other => Err(format!("unknown mode {other}: sends or fanout")),
    };
    if let Err(why) = result {
        eprintln!("ws_load: {why}");
        std::process::exit(1);
    }
}

/// A send's JSON over WebSocket.
fn ws_send(id: u64, room: usize) -> String {
    format!(r#"{{"id":{id},"op":"send","chat":"bench-{room}","text":"load","sender":"bench"}}"#)
}

/// `sends`: every connection sends as fast as it is answered.
async fn sends(args: Arc<Args>) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Samples::default());
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let (args, stop, samples) = (args.clone(), stop.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
            let result = match args.transport.as_str() {
                "http" => http_sender(&args, &stop, &samples, &mut rng).await,
                _ => ws_sender(&args, &stop, &samples, &mut rng).await,
            };
            result.map_err(|e| format!("connection {i}: {e}"))
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let count = samples.count.load(Ordering::Relaxed);
    let (p50, p99, max) = samples.percentiles().await;
    println!(
        "mode=sends transport={} connections={} window={} rooms={} sends={count} sends_per_s={:.0} p50_us={p50} p99_us={p99} max_us={max}",
        args.transport,
        args.connections,
        args.window,
        args.rooms,
        count as f64 / elapsed
    );
    Ok(())
}

async fn ws_sender(
    args: &Args,
    stop: &AtomicBool,
    samples: &Samples,
    rng: &mut Rng,
) -> std::io::Result<()> {
    let mut ws = Ws::connect(&args.addr).await?;
    let mut local = Vec::with_capacity(1024);
    let mut asked: HashMap<u64, Instant> = HashMap::new();
    let mut out = BytesMut::new();
    let mut id = 0;
    while !stop.load(Ordering::Relaxed) {
        while asked.len() < args.window {
            id += 1;
            let text = ws_send(id, rng.below(args.rooms));
            put_client_frame(&mut out, true, opcode::TEXT, text.as_bytes(), [1, 2, 3, 4]);
            asked.insert(id, Instant::now());
        }
        ws.socket.write_all(&out).await?;
        out.clear();
        let reply = ws.recv().await?;
        let answered = reply_id(&reply).and_then(|id| asked.remove(&id));
        let Some(at) = answered else {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&reply).into_owned(),
            ));
        };
        local.push(at.elapsed().as_micros() as u32);
        if local.len() >= 1024 {
            samples.add(&mut local).await;
        }
    }
    samples.add(&mut local).await;
    Ok(())
}

/// The `id` of a successful reply (`{"id":N,"ok":true,...}`).
fn reply_id(reply: &[u8]) -> Option<u64> {
    let rest = reply.strip_prefix(br#"{"id":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let id = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    rest[digits..].starts_with(br#","ok":true"#).then_some(id)
}

async fn http_sender(
    args: &Args,
    stop: &AtomicBool,
    samples: &Samples,
    rng: &mut Rng,
) -> std::io::Result<()> {
    let mut socket = TcpStream::connect(&args.addr).await?;
    socket.set_nodelay(true)?;
    let mut input = BytesMut::with_capacity(4096);
    let mut local = Vec::with_capacity(1024);
    // Responses come in request order.
    let mut asked: VecDeque<Instant> = VecDeque::new();
    let mut out = Vec::new();
    let authorization = authorization();
    while !stop.load(Ordering::Relaxed) {
        while asked.len() < args.window {
            let body = format!(
                r#"{{"chat":"bench-{}","text":"load","sender":"bench"}}"#,
                rng.below(args.rooms)
            );
            out.extend_from_slice(format!(
                "POST /api/send HTTP/1.1\r\nHost: bench\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ).as_bytes());
            asked.push_back(Instant::now());
        }
        socket.write_all(&out).await?;
        out.clear();
        read_http_response(&mut socket, &mut input).await?;
        if let Some(at) = asked.pop_front() {
            local.push(at.elapsed().as_micros() as u32);
        }
        if local.len() >= 1024 {
            samples.add(&mut local).await;
        }
    }
    samples.add(&mut local).await;
    Ok(())
}

/// Reads one response (head and `Content-Length` body); fails unless 200.
async fn read_http_response(socket: &mut TcpStream, input: &mut BytesMut) -> std::io::Result<()> {
    loop {
        if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&input[..end]).to_ascii_lowercase();
            let length: usize = head
                .split("content-length:")
                .nth(1)
                .and_then(|rest| rest.lines().next())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if input.len() >= end + 4 + length {
                if !head.starts_with("http/1.1 200") {
                    return Err(std::io::Error::other(head));
                }
                let _ = input.split_to(end + 4 + length);
                return Ok(());
            }
        }
        if socket.read_buf(input).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The `send_time` of a message event (the last such field in it).
fn send_time_of(event: &[u8]) -> Option<i64> {
    let key = b"\"send_time\":";
    let at = event.windows(key.len()).rposition(|w| w == key)? + key.len();
    let digits = event[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&event[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// `fanout`: subscribers over rooms, publishers at a fixed rate.
async fn fanout(args: Arc<Args>) -> Result<(), String> {
    let measuring = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Samples::default());
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    let mut subscribers = Vec::new();
    for i in 0..args.subscribers {
        let (args, measuring, samples, ready) = (
            args.clone(),
            measuring.clone(),
            samples.clone(),
            ready.clone(),
        );
        subscribers.push(tokio::spawn(async move {
            subscriber(&args, i % args.rooms, &measuring, &samples, &ready).await
        }));
    }
    let all = u32::try_from(args.subscribers).map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(60), ready.acquire_many(all))
        .await
        .map_err(|_| "subscribers did not all subscribe within 60 s".to_string())?
        .map_err(|e| e.to_string())?
        .forget();
    let per_room: Vec<u64> = (0..args.rooms)
        .map(|r| {
            (0..args.subscribers)
                .filter(|i| i % args.rooms == r)
                .count() as u64
        })
        .collect();
    let per_room = Arc::new(per_room);
    let expected = Arc::new(AtomicU64::new(0));
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut publishers = Vec::new();
    for p in 0..args.publishers {
        let (args, per_room, expected) = (args.clone(), per_room.clone(), expected.clone());
        publishers.push(tokio::spawn(async move {
            publisher(&args, p, &per_room, &expected)
                .await
                .map_err(|e| e.to_string())
        }));
    }
    for publisher in publishers {
        publisher.await.map_err(|e| e.to_string())??;
    }
    let sent_for = started.elapsed().as_secs_f64();
    // Stragglers: deliveries still on their way.
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(false, Ordering::Relaxed);
    for s in &subscribers {
        s.abort();
    }
    report_fanout(&args, &samples, expected.load(Ordering::Relaxed), sent_for).await;
    Ok(())
}

async fn report_fanout(args: &Args, samples: &Samples, expected: u64, elapsed: f64) {
    // Subscribers flush their latencies every 256 deliveries and when
    // 200 ms pass without one (the report waits 1 s after the last send).
    let delivered = samples.count.load(Ordering::Relaxed);
    let (p50, p99, max) = samples.percentiles().await;
    println!(
        "mode=fanout subscribers={} rooms={} publishers={} rate={} expected={expected} delivered={delivered} \
         deliveries_per_s={:.0} p50_us={p50} p99_us={p99} max_us={max}",
        args.subscribers,
        args.rooms,
        args.publishers,
        args.rate,
        delivered as f64 / elapsed
    );
}

async fn subscriber(
    args: &Args,
    room: usize,
    measuring: &AtomicBool,
    samples: &Samples,
    ready: &tokio::sync::Semaphore,
) -> std::io::Result<()> {
    let mut ws = Ws::connect(&args.addr).await?;
    let now = now_micros();
    ws.send(&format!(
        r#"{{"id":1,"op":"subscribe","chat":"bench-{room}","cursor":{now}}}"#
    ))
    .await?;
    let reply = ws.recv().await?;
    if !reply.starts_with(br#"{"id":1,"ok":true"#) {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&reply).into_owned(),
        ));
    }
    ready.add_permits(1);
    let mut local = Vec::with_capacity(256);
    loop {
        // A quiet moment flushes the latencies held here.
        let Ok(event) = tokio::time::timeout(Duration::from_millis(200), ws.recv()).await else {
            samples.add_latencies(&mut local).await;
            continue;
        };
        let event = event?;
        if !measuring.load(Ordering::Relaxed) {
            continue;
        }
        if let Some(sent) = send_time_of(&event) {
            samples.count.fetch_add(1, Ordering::Relaxed);
            local.push((now_micros() - sent).max(0) as u32);
            if local.len() >= 256 {
                samples.add_latencies(&mut local).await;
            }
        }
    }
}

/// Sends on its ticks whatever the replies do (open loop: a fixed rate
/// offered, not one send per answer, which under load offered less than
/// `--rate`), and reads the replies meanwhile: each answered send adds its
/// room's subscribers to `expected`. A refused send fails the run, with
/// the reply: the figures are for a load served without errors.
async fn publisher(
    args: &Args,
    p: usize,
    per_room: &[u64],
    expected: &AtomicU64,
) -> std::io::Result<()> {
    let Ws {
        socket,
        mut input,
        mut decoder,
    } = Ws::connect(&args.addr).await?;
    let (mut read, mut write) = socket.into_split();
    let rooms: Arc<std::sync::Mutex<HashMap<u64, usize>>> = Arc::default();
    let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (p as u64 + 1));
    let every = Duration::from_secs_f64(args.publishers as f64 / args.rate as f64);
    let (end, room_count) = (Instant::now() + args.duration, args.rooms);
    let sent = rooms.clone();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let (mut id, mut out) = (0, BytesMut::new());
        while Instant::now() < end {
            tick.tick().await;
            id += 1;
            let room = rng.below(room_count);
            sent.lock().expect("not poisoned").insert(id, room);
            out.clear();
            let text = ws_send(id, room);
            put_client_frame(&mut out, true, opcode::TEXT, text.as_bytes(), [1, 2, 3, 4]);
            write.write_all(&out).await?;
        }
        Ok::<_, std::io::Error>(write)
    });
    // Replies until every send is answered, or 2 s after the last.
    let reading = async {
        loop {
            let answered = rooms.lock().expect("not poisoned").is_empty();
            if writer.is_finished() && answered {
                return Ok(());
            }
            let text = match decoder.decode(&mut input) {
                Ok(Some(Incoming::Text(text))) => text,
                Ok(Some(Incoming::Close(_))) => {
                    return Err(std::io::ErrorKind::ConnectionAborted.into());
                }
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let read =
                        tokio::time::timeout(Duration::from_millis(50), read.read_buf(&mut input));
                    match read.await {
                        Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                        Ok(read) => drop(read?),
                        Err(_) => {}
                    }
                    continue;
                }
                Err(err) => return Err(std::io::Error::other(format!("{err:?}"))),
            };
            let room =
                reply_id(&text).and_then(|id| rooms.lock().expect("not poisoned").remove(&id));
            match room {
                Some(room) => drop(expected.fetch_add(per_room[room], Ordering::Relaxed)),
                None => {
                    return Err(std::io::Error::other(
                        String::from_utf8_lossy(&text).into_owned(),
                    ));
                }
            }
        }
    };
    tokio::time::timeout(args.duration + Duration::from_secs(2), reading)
        .await
        .map_err(|_| std::io::Error::other("sends unanswered 2 s after the last"))??;
    writer.await.map_err(std::io::Error::other)??;
    Ok(())
}
