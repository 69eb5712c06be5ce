//! bench/waiting_memory: the resident memory that pulls waiting for new
//! messages (`wait_ms`) cost each process. Run by `bench/longpoll --held N`
//! (which starts the servers); by hand:
//!
//! ```text
//! cargo run --release --example waiting_memory -- --addr 127.0.0.1:8080 \
//!     --pids GATEWAY_PID,RPC_PID [--pulls 10000] [--chats 1000]
//! ```
//!
//! Reads each process's VmRSS, opens `--pulls` connections each holding one
//! pull (`wait_ms=30000`) spread over `--chats` chats, waits until the
//! processes' memory settles, reads VmRSS again, then wakes one chat with a
//! send and checks that exactly its pulls answered. Prints one line per
//! process: `RESULT pid=… idle_kib=… held_kib=… per_pull_bytes=…`.
//! The caller must allow `--pulls` + a few open files (`ulimit -n`).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

struct Args {
    addr: String,
    pids: Vec<u32>,
    pulls: usize,
    chats: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:8080".into(),
        pids: Vec::new(),
        pulls: 10_000,
        chats: 1_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<usize>().map_err(|_| format!("bad number {v}"));
        match flag.as_str() {
            "--addr" => args.addr = value,
            "--pids" => {
                for pid in value.split(',') {
                    args.pids.push(number(pid)? as u32);
                }
            }
            "--pulls" => args.pulls = number(&value)?,
            "--chats" => args.chats = number(&value)?.max(1),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.pids.is_empty() {
        return Err("--pids is required".into());
    }
    Ok(args)
}

/// VmRSS of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or(format!("no VmRSS for {pid}"))
}

/// Reads RSS until it stops growing (two readings 500 ms apart within 1 %).
fn settled_rss(pids: &[u32]) -> Result<Vec<u64>, String> {
    let mut last = pids
        .iter()
        .map(|&p| rss_kib(p))
        .collect::<Result<Vec<_>, _>>()?;
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(500));
        let now = pids
            .iter()
            .map(|&p| rss_kib(p))
            .collect::<Result<Vec<_>, _>>()?;
        let steady = now.iter().zip(&last).all(|(&n, &l)| n <= l + l / 100);
        last = now;
        if steady {
            break;
        }
    }
    Ok(last)
}

fn chat_of(i: usize, chats: usize) -> usize {
    i % chats
}

fn open_pulls(args: &Args) -> Result<Vec<TcpStream>, String> {
    let mut conns = Vec::with_capacity(args.pulls);
    for i in 0..args.pulls {
        let mut c = TcpStream::connect(&args.addr).map_err(|e| format!("connect #{i}: {e}"))?;
        let req = format!(
            "GET /api/pull?chat=held{}&wait_ms=30000 HTTP/1.1\r\nHost: b\r\n\r\n",
            chat_of(i, args.chats)
        );
        c.write_all(req.as_bytes())
            .map_err(|e| format!("write #{i}: {e}"))?;
        conns.push(c);
    }
    Ok(conns)
}

/// Wakes chat 0 and checks that its pulls, and no other, answered.
fn wake_one_chat(args: &Args, conns: &mut [TcpStream]) -> Result<usize, String> {
    let mut c = TcpStream::connect(&args.addr).map_err(|e| e.to_string())?;
    let body = r#"{"chat":"held0","text":"wake","sender":"bench"}"#;
    let req = format!(
        "POST /api/send HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    c.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    if !reply.starts_with("HTTP/1.1 200") {
        return Err(format!("send failed: {reply}"));
    }
    let mut buf = [0u8; 4096];
    let mut woken = 0;
    let (ours, others): (Vec<_>, Vec<_>) = conns
        .iter_mut()
        .enumerate()
        .partition(|(i, _)| chat_of(*i, args.chats) == 0);
    for (i, c) in ours {
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        match c.read(&mut buf) {
            Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("wake") => woken += 1,
            Ok(n) => return Err(format!("pull #{i}: {}", String::from_utf8_lossy(&buf[..n]))),
            Err(e) => return Err(format!("pull #{i}: {e}")),
        }
    }
    // Every other pull is still waiting: nothing to read.
    thread::sleep(Duration::from_millis(300));
    for (i, c) in others {
        c.set_nonblocking(true).map_err(|e| e.to_string())?;
        match c.read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok(n) => return Err(format!("pull #{i}: {}", String::from_utf8_lossy(&buf[..n]))),
            Err(e) => return Err(format!("pull #{i}: {e}")),
        }
    }
    Ok(woken)
}

fn run(args: &Args) -> Result<(), String> {
    let idle = settled_rss(&args.pids)?;
    let opening = Instant::now();
    let mut conns = open_pulls(args)?;
    eprintln!(
        "opened {} waiting pulls in {:?}",
        args.pulls,
        opening.elapsed()
    );
    let held = settled_rss(&args.pids)?;
    let woken = wake_one_chat(args, &mut conns)?;
    let expected = (0..args.pulls)
        .filter(|&i| chat_of(i, args.chats) == 0)
        .count();
    if woken != expected {
        return Err(format!("{woken} pulls woken, {expected} expected"));
    }
    for ((pid, idle), held) in args.pids.iter().zip(&idle).zip(&held) {
        let per_pull = held.saturating_sub(*idle) * 1024 / args.pulls.max(1) as u64;
        println!("RESULT pid={pid} idle_kib={idle} held_kib={held} per_pull_bytes={per_pull}");
    }
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("waiting_memory: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("waiting_memory: {e}");
        std::process::exit(1);
    }
}
