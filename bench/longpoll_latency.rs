//! bench/longpoll_latency: how long a stored message takes to reach a pull
//! that is waiting for it (`wait_ms`), on loopback, under light background
//! load. Run by bench/longpoll (which starts the servers); by hand:
//!
//! ```text
//! cargo run --release --example longpoll_latency -- --addr 127.0.0.1:8080 \
//!     [--chats 100] [--rate 200] [--background 1000] [--duration 20]
//! ```
//!
//! * `--chats N` followers, one thread and one keep-alive connection each,
//!   long-poll their own chat oldest first from the newest message they
//!   have (`reverse=true&cursor=…&wait_ms=25000`), as a chat client would;
//! * one sender stores `--rate` messages per second, round-robin over the
//!   chats, each carrying the moment its request was written;
//! * `--background` plain pulls per second of another chat keep the
//!   servers lightly busy.
//!
//! Latency = from the sender writing the send request to the follower
//! having read the pull's reply that carries the message. Prints one line
//! of `key=value` (count, missing, p50/p90/p99/max in µs) for the script.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

struct Args {
    addr: String,
    chats: usize,
    rate: u64,
    background: u64,
    duration: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:8080".into(),
        chats: 100,
        rate: 200,
        background: 1000,
        duration: Duration::from_secs(20),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|_| format!("bad number {v}"));
        match flag.as_str() {
            "--addr" => args.addr = value()?,
            "--chats" => args.chats = number(value()?)? as usize,
            "--rate" => args.rate = number(value()?)?.max(1),
            "--background" => args.background = number(value()?)?,
            "--duration" => args.duration = Duration::from_secs(number(value()?)?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// One keep-alive HTTP/1.1 connection, just enough for this tool.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Conn {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        }
    }

    /// Writes one request; returns the status and the body.
    fn call(&mut self, method: &str, target: &str, body: &str) -> (u16, String) {
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.writer.write_all(req.as_bytes()).expect("write");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("content-length");
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

fn follow(
    addr: String,
    chat: String,
    origin: Instant,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<u64>>>,
) {
    let mut conn = Conn::open(&addr);
    let mut cursor = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let target =
            format!("/api/pull?chat={chat}&cursor={cursor}&reverse=true&limit=100&wait_ms=25000");
        let (status, body) = conn.call("GET", &target, "");
        let now = origin.elapsed().as_micros() as u64;
        assert_eq!(status, 200, "pull: {body}");
        let page: serde_json::Value = serde_json::from_str(&body).expect("json");
        for m in page["messages"].as_array().into_iter().flatten() {
            cursor = m["send_time"].as_i64().unwrap_or(cursor);
            if let Some(sent) = m["text"].as_str().and_then(|t| t.strip_prefix("t="))
                && let Ok(sent) = sent.parse::<u64>()
            {
                out.lock().expect("lock").push(now.saturating_sub(sent));
            }
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("longpoll_latency: {err}");
            std::process::exit(2);
        }
    };
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let run = format!("{}", std::process::id());
    let chats: Vec<String> = (0..args.chats).map(|i| format!("lat-{run}-{i}")).collect();
    let mut followers = Vec::new();
    for chat in &chats {
        let (addr, chat, stop, out) = (
            args.addr.clone(),
            chat.clone(),
            stop.clone(),
            latencies.clone(),
        );
        followers.push(thread::spawn(move || follow(addr, chat, origin, stop, out)));
    }
    // Let every follower register its first wait.
    thread::sleep(Duration::from_millis(500));
    let background = {
        let (addr, stop, rate) = (args.addr.clone(), stop.clone(), args.background);
        thread::spawn(move || {
            if rate == 0 {
                return;
            }
            let mut conn = Conn::open(&addr);
            let every = Duration::from_nanos(1_000_000_000 / rate);
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                conn.call("GET", "/api/pull?chat=lat-background&limit=10", "");
                next += every;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };
    let sent = AtomicU64::new(0);
    let mut conn = Conn::open(&args.addr);
    let every = Duration::from_nanos(1_000_000_000 / args.rate);
    let end = Instant::now() + args.duration;
    let mut next = Instant::now();
    let mut i = 0usize;
    while Instant::now() < end {
        let chat = &chats[i % chats.len()];
        i += 1;
        let t = origin.elapsed().as_micros();
        let body = format!(r#"{{"chat":"{chat}","text":"t={t}","sender":"bench"}}"#);
        let (status, reply) = conn.call("POST", "/api/send", &body);
        assert_eq!(status, 200, "send: {reply}");
        sent.fetch_add(1, Ordering::Relaxed);
        next += every;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    // Let the last messages arrive, then stop the followers with one more
    // message each (their pulls are waiting).
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for chat in &chats {
        conn.call(
            "POST",
            "/api/send",
            &format!(r#"{{"chat":"{chat}","text":"stop","sender":"bench"}}"#),
        );
    }
    for f in followers {
        let _ = f.join();
    }
    let _ = background.join();
    let mut all = latencies.lock().expect("lock").clone();
    all.sort_unstable();
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "RESULT sent={sent} received={} missing={} p50_us={} p90_us={} p99_us={} max_us={}",
        all.len(),
        sent.saturating_sub(all.len() as u64),
        percentile(&all, 50.0),
        percentile(&all, 90.0),
        percentile(&all, 99.0),
        all.last().copied().unwrap_or(0)
    );
}
