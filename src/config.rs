//! Command line and environment, parsed once into a [`Config`].
//!
//! Every option has a flag and an environment variable; a flag wins over the
//! environment, which wins over the default. The table [`OPTIONS`] is the
//! single source for parsing and for `--help`.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Gateway and RPC server in one process, talking over real TCP.
    All,
    Gateway,
    Rpc,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    pub http_addr: String,
    pub rpc_listen: String,
    /// The RPC servers the gateway calls (comma-separated `ip:port` or
    /// `host:port`); `None` in `all` = the one started here.
    pub rpc_addr: Option<String>,
    /// `etcd://h1:2379[,h2:2379]/prefix`: where RPC servers register and
    /// gateways find them.
    pub registry: Option<String>,
    /// The address this RPC server registers; `None` = its listen address.
    pub rpc_advertise: Option<String>,
    /// `None` = the embedded memory store.
    pub redis_url: Option<String>,
    pub rpc_timeout: Duration,
    pub rpc_connections: usize,
    pub redis_connections: usize,
    /// Given, or derived from `rpc_timeout` (see [`redis_timeout_default`]).
    pub redis_timeout: Duration,
    pub max_queued_bytes: usize,
    /// Replicas that must confirm a send (`WAIT`) before it is acknowledged.
    pub redis_wait_replicas: u32,
    pub max_body: usize,
    pub max_head: usize,
    pub max_frame: usize,
    pub max_rpc_connections: usize,
    pub rpc_idle_timeout: Duration,
    pub max_rpc_output: usize,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// Response bytes queued per HTTP connection before it stops starting requests.
    pub max_output_buffer: usize,
    /// An HTTP peer that accepts no bytes for this long is closed.
    pub write_timeout: Duration,
    /// Silence on an event stream (`/api/stream`) before a heartbeat comment.
    pub stream_heartbeat: Duration,
    pub drain_timeout: Duration,
    pub queue: usize,
    pub max_in_flight: usize,
    /// Tokio worker threads; 0 = one per core.
    pub threads: usize,
    /// How long a send's idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// Longest a pull is held waiting for new messages (`wait_ms` is capped to it).
    pub pull_max_wait_ms: i32,
    /// The RPC handshake's shared secret's file; `None` = no handshake.
    pub rpc_secret_file: Option<String>,
    /// Authentication: the HS256 secret's file; `None` = off.
    pub auth_jwt_secret_file: Option<String>,
    pub auth_issuer: Option<String>,
    pub auth_audience: Option<String>,
    pub rate_limit_send: Option<crate::ratelimit::Rate>,
    pub rate_limit_pull: Option<crate::ratelimit::Rate>,
    /// Where `GET /metrics` is served apart from the gateway; `None` = off.
    pub metrics_addr: Option<String>,
}

/// Longest idempotency-key retention accepted, in seconds: 10 years (Redis
/// refuses an `EX` it cannot add to its clock in milliseconds).
pub const MAX_IDEMPOTENCY_TTL_S: u64 = 10 * 365 * 86_400;

pub struct OptionSpec {
    pub flag: &'static str,
    pub env: &'static str,
    /// `None`: unset unless given.
    pub default: Option<&'static str>,
    pub help: &'static str,
}

#[rustfmt::skip]
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec { flag: "--http-addr", env: "IM_HTTP_ADDR", default: Some("[::]:8080"), help: "address the HTTP gateway listens on ([::] accepts IPv4 too; 0.0.0.0 if the host has no IPv6)" },
    OptionSpec { flag: "--rpc-listen", env: "IM_RPC_LISTEN", default: Some("127.0.0.1:8888"), help: "address the RPC server listens on" },
    OptionSpec { flag: "--rpc", env: "IM_RPC_ADDR", default: None, help: "RPC servers the gateway calls, comma-separated ip:port or host:port (host names re-resolved every 2 s, every A/AAAA record an endpoint; default in `all`: the one started here)" },
    OptionSpec { flag: "--registry", env: "IM_REGISTRY", default: None, help: "etcd://host:2379[,host2:2379]/prefix: RPC servers register there (lease, TTL 10 s), gateways discover them there" },
    OptionSpec { flag: "--rpc-advertise", env: "IM_RPC_ADVERTISE", default: None, help: "ip:port the RPC server registers (default: --rpc-listen, unless that is a wildcard)" },
    OptionSpec { flag: "--redis", env: "REDIS_URL", default: None, help: "redis://[:password@]host[:port][/db], unix:///path.sock, or cluster seeds redis://h1:p1,h2:p2; unset = embedded memory store" },
    OptionSpec { flag: "--rpc-timeout-ms", env: "IM_RPC_TIMEOUT_MS", default: Some("1000"), help: "per-call RPC timeout (504 after it)" },
    OptionSpec { flag: "--rpc-connections", env: "IM_RPC_CONNECTIONS", default: Some("1"), help: "multiplexed connections to the RPC server, per gateway thread" },
    OptionSpec { flag: "--redis-connections", env: "IM_REDIS_CONNECTIONS", default: Some("1"), help: "pipelined connections to Redis, per RPC server thread" },
    OptionSpec { flag: "--redis-timeout-ms", env: "IM_REDIS_TIMEOUT_MS", default: None, help: "a Redis command not answered within this fails with 503 (default: 80% of --rpc-timeout-ms, so it fires before the gateway's 504)" },
    OptionSpec { flag: "--redis-wait-replicas", env: "IM_REDIS_WAIT_REPLICAS", default: Some("0"), help: "a send is acknowledged only after WAIT confirms this many replicas have it (else 503)" },
    OptionSpec { flag: "--max-body", env: "IM_MAX_BODY", default: Some("1048576"), help: "largest request body in bytes (413 above)" },
    OptionSpec { flag: "--max-header-bytes", env: "IM_MAX_HEADER_BYTES", default: Some("16384"), help: "largest request line + headers in bytes (431 above)" },
    OptionSpec { flag: "--max-frame", env: "IM_MAX_FRAME", default: Some("16777216"), help: "largest RPC frame in bytes" },
    OptionSpec { flag: "--max-rpc-connections", env: "IM_MAX_RPC_CONNECTIONS", default: Some("1024"), help: "open connections to the RPC server; more are closed at once" },
    OptionSpec { flag: "--rpc-idle-timeout-s", env: "IM_RPC_IDLE_TIMEOUT_S", default: Some("3600"), help: "an RPC server connection with nothing in flight and no request for this long is closed" },
    OptionSpec { flag: "--max-rpc-output", env: "IM_MAX_RPC_OUTPUT", default: Some("67108864"), help: "reply bytes one RPC server connection may hold (being made, at their largest, or unsent); past it the connection is not read" },
    OptionSpec { flag: "--idle-timeout-s", env: "IM_IDLE_TIMEOUT_S", default: Some("60"), help: "idle keep-alive connections are closed after this" },
    OptionSpec { flag: "--request-timeout-s", env: "IM_REQUEST_TIMEOUT_S", default: Some("10"), help: "a request must arrive whole within this of its first byte (408 after)" },
    OptionSpec { flag: "--max-connections", env: "IM_MAX_CONNECTIONS", default: Some("10000"), help: "open HTTP connections; more are answered 503 and closed" },
    OptionSpec { flag: "--max-output-buffer", env: "IM_MAX_OUTPUT_BUFFER", default: Some("4194304"), help: "response bytes queued per HTTP connection; no further pipelined request starts above it" },
    OptionSpec { flag: "--write-timeout-s", env: "IM_WRITE_TIMEOUT_S", default: Some("10"), help: "an HTTP client that accepts no response bytes for this long is closed" },
    OptionSpec { flag: "--stream-heartbeat-s", env: "IM_STREAM_HEARTBEAT_S", default: Some("15"), help: "an event stream (/api/stream) silent for this long gets a heartbeat comment" },
    OptionSpec { flag: "--drain-timeout-s", env: "IM_DRAIN_TIMEOUT_S", default: Some("10"), help: "on SIGTERM/SIGINT, how long in-flight requests may take to finish" },
    OptionSpec { flag: "--queue", env: "IM_QUEUE", default: Some("8192"), help: "calls queued per RPC/Redis connection before 503 + Retry-After" },
    OptionSpec { flag: "--max-in-flight", env: "IM_MAX_IN_FLIGHT", default: Some("8192"), help: "calls in flight per RPC/Redis connection" },
    OptionSpec { flag: "--max-queued-bytes", env: "IM_MAX_QUEUED_BYTES", default: Some("8388608"), help: "bytes of Redis commands queued per connection (and of sends waiting to be batched, per thread) before 503 overloaded" },
    OptionSpec { flag: "--threads", env: "IM_THREADS", default: Some("0"), help: "worker threads, each a single-threaded runtime with its own connections (0 = one per core)" },
    OptionSpec { flag: "--pull-max-wait-ms", env: "IM_PULL_MAX_WAIT_MS", default: Some("30000"), help: "longest a pull with `wait_ms` is held for new messages (larger waits are cut to it; 0: never; keep it below your load balancer's idle timeout)" },
    OptionSpec { flag: "--rpc-secret-file", env: "IM_RPC_SECRET_FILE", default: None, help: "a file holding a shared secret (>= 32 bytes): RPC servers then accept only connections that prove they know it (challenge-response), and gateways prove it; set the same file on both" },
    OptionSpec { flag: "--auth-jwt-secret-file", env: "IM_AUTH_JWT_SECRET_FILE", default: None, help: "turns authentication on: a file holding the HS256 secret (>= 32 bytes) of the bearer tokens the gateway accepts" },
    OptionSpec { flag: "--auth-issuer", env: "IM_AUTH_ISSUER", default: None, help: "with authentication: the `iss` every token must carry" },
    OptionSpec { flag: "--auth-audience", env: "IM_AUTH_AUDIENCE", default: None, help: "with authentication: a value every token's `aud` must contain" },
    OptionSpec { flag: "--rate-limit-send", env: "IM_RATE_LIMIT_SEND", default: None, help: "sends per user (per client address without authentication) and gateway process: N/s or N/m, optionally :BURST (e.g. 20/s:40); over it 429" },
    OptionSpec { flag: "--rate-limit-pull", env: "IM_RATE_LIMIT_PULL", default: None, help: "pulls per user (or client address) and gateway process, like --rate-limit-send" },
    OptionSpec { flag: "--metrics-addr", env: "IM_METRICS_ADDR", default: None, help: "address serving GET /metrics (Prometheus text format) for any role, e.g. the rpc role, which has no HTTP port; the gateway also serves /metrics on --http-addr" },
    OptionSpec { flag: "--idempotency-ttl-s", env: "IM_IDEMPOTENCY_TTL_S", default: Some("86400"), help: "how long a send's idempotency key is remembered, in seconds" },
];

pub fn usage() -> String {
    let mut text = String::from(
        "im-server: instant-messaging backend (HTTP gateway -> protobuf RPC -> Redis)\n\n\
         Usage: im-server [all|gateway|rpc] [OPTIONS]\n\n\
         Roles:\n  all      gateway and RPC server in one process (default)\n  \
         gateway  the HTTP gateway alone (needs --rpc)\n  rpc      the RPC server alone\n\nOptions (flag, environment variable, default):\n",
    );
    for o in OPTIONS {
        let default = o
            .default
            .map_or_else(|| "unset".to_string(), |d| d.to_string());
        text.push_str(&format!(
            "  {:<25} {:<22} [{default}]\n      {}\n",
            format!("{} <v>", o.flag),
            o.env,
            o.help
        ));
    }
    text.push_str("  -h, --help\n");
    text
}

pub enum Parsed {
    Run(Box<Config>),
    Help,
}

impl Config {
    /// Parses `args` (without the program name), reading the environment
    /// through `env`.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Parsed, String> {
        let mut values: Vec<Option<String>> = OPTIONS
            .iter()
            .map(|o| {
                env(o.env)
                    .filter(|v| !v.is_empty())
                    .or(o.default.map(String::from))
            })
            .collect();
        let mut role = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                return Ok(Parsed::Help);
            }
            if !arg.starts_with('-') {
                if role.is_some() {
                    return Err(format!("unexpected argument {arg:?}"));
                }
                role = Some(match arg.as_str() {
                    "all" => Role::All,
                    "gateway" => Role::Gateway,
                    "rpc" => Role::Rpc,
                    _ => {
                        return Err(format!(
                            "unknown role {arg:?} (expected all, gateway or rpc)"
                        ));
                    }
                });
                continue;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let Some(i) = OPTIONS.iter().position(|o| o.flag == flag) else {
                return Err(format!("unknown option {flag:?} (see --help)"));
            };
            let value = match inline {
                Some(v) => v,
                None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
            };
            values[i] = Some(value);
        }
        let get = |flag: &str| -> Option<String> {
            OPTIONS
                .iter()
                .position(|o| o.flag == flag)
                .and_then(|i| values[i].clone())
        };
        let text = |flag: &str| get(flag).unwrap_or_default();
        let number = |flag: &str| -> Result<u64, String> {
            text(flag).parse().map_err(|_| {
                format!(
                    "{flag} must be a non-negative integer, got {:?}",
                    text(flag)
                )
            })
        };
        let positive = |flag: &str| -> Result<u64, String> {
            match number(flag)? {
                0 => Err(format!("{flag} must be at least 1")),
                n => Ok(n),
            }
        };
        let at_most = |flag: &str, max: u64| -> Result<u64, String> {
            match positive(flag)? {
                n if n > max => Err(format!("{flag} must be at most {max}")),
                n => Ok(n),
            }
        };
        let role = role.unwrap_or(Role::All);
        let rpc_addr = get("--rpc");
        let registry = get("--registry");
        if role == Role::Gateway && rpc_addr.is_none() && registry.is_none() {
            return Err(
                "the gateway role needs --rpc <addr,...> (or IM_RPC_ADDR) or --registry <etcd://...>"
                    .into(),
            );
        }
        Ok(Parsed::Run(Box::new(Config {
            role,
            http_addr: text("--http-addr"),
            rpc_listen: text("--rpc-listen"),
            rpc_addr,
            registry,
            rpc_advertise: get("--rpc-advertise"),
            redis_url: get("--redis"),
            rpc_timeout: Duration::from_millis(positive("--rpc-timeout-ms")?),
            rpc_connections: positive("--rpc-connections")? as usize,
            redis_connections: positive("--redis-connections")? as usize,
            redis_timeout: match get("--redis-timeout-ms") {
                Some(_) => Duration::from_millis(positive("--redis-timeout-ms")?),
                None => redis_timeout_default(Duration::from_millis(positive("--rpc-timeout-ms")?)),
            },
            max_queued_bytes: positive("--max-queued-bytes")? as usize,
            redis_wait_replicas: u32::try_from(number("--redis-wait-replicas")?)
                .map_err(|_| "--redis-wait-replicas is too large".to_string())?,
            max_body: number("--max-body")? as usize,
            max_head: positive("--max-header-bytes")? as usize,
            max_frame: positive("--max-frame")? as usize,
            max_rpc_connections: positive("--max-rpc-connections")? as usize,
            rpc_idle_timeout: Duration::from_secs(positive("--rpc-idle-timeout-s")?),
            max_rpc_output: positive("--max-rpc-output")? as usize,
            idle_timeout: Duration::from_secs(positive("--idle-timeout-s")?),
            request_timeout: Duration::from_secs(positive("--request-timeout-s")?),
            max_connections: positive("--max-connections")? as usize,
            max_output_buffer: positive("--max-output-buffer")? as usize,
            write_timeout: Duration::from_secs(positive("--write-timeout-s")?),
            stream_heartbeat: Duration::from_secs(positive("--stream-heartbeat-s")?),
            drain_timeout: Duration::from_secs(number("--drain-timeout-s")?),
            queue: positive("--queue")? as usize,
            max_in_flight: positive("--max-in-flight")? as usize,
            threads: number("--threads")? as usize,
            idempotency_ttl: Duration::from_secs(at_most(
                "--idempotency-ttl-s",
                MAX_IDEMPOTENCY_TTL_S,
            )?),
            // 0 is allowed: pulls never wait.
            pull_max_wait_ms: match number("--pull-max-wait-ms")? {
                n if n > crate::domain::MAX_WAIT_MS as u64 => {
                    return Err(format!(
                        "--pull-max-wait-ms must be at most {}",
                        crate::domain::MAX_WAIT_MS
                    ));
                }
                n => n as i32,
            },
            rpc_secret_file: get("--rpc-secret-file"),
            auth_jwt_secret_file: get("--auth-jwt-secret-file"),
            auth_issuer: get("--auth-issuer"),
            auth_audience: get("--auth-audience"),
            rate_limit_send: get("--rate-limit-send")
                .map(|r| r.parse())
                .transpose()
                .map_err(|e| format!("--rate-limit-send: {e}"))?,
            rate_limit_pull: get("--rate-limit-pull")
                .map(|r| r.parse())
                .transpose()
                .map_err(|e| format!("--rate-limit-pull: {e}"))?,
            metrics_addr: get("--metrics-addr"),
        })))
    }
}

/// The Redis timeout when none is given: 80 % of the RPC timeout. The Redis
/// command starts after the gateway's RPC call did (and the reply still has
/// to travel back), so with equal timeouts a Redis stall reached the client
/// as the gateway's 504 "timeout" instead of the store's 503 "unavailable".
/// The 20 % (200 ms by default) covers the RPC hop and queueing.
pub fn redis_timeout_default(rpc_timeout: Duration) -> Duration {
    (rpc_timeout * 4 / 5).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        match Config::parse(args.iter().map(|s| s.to_string()), lookup)? {
            Parsed::Run(config) => Ok(*config),
            Parsed::Help => Err("help".into()),
        }
    }

    #[test]
    fn defaults_env_and_flags_in_order() {
        let c = parse(&[], &[]).expect("defaults parse");
        assert_eq!(
            (c.role, c.http_addr.as_str(), c.redis_url),
            (Role::All, "[::]:8080", None)
        );
        let c = parse(&[], &[("REDIS_URL", "redis://h:1")]).expect("env parses");
        assert_eq!(c.redis_url.as_deref(), Some("redis://h:1"));
        let c = parse(
            &["rpc", "--redis", "redis://x:2", "--rpc-timeout-ms=50"],
            &[("REDIS_URL", "redis://h:1")],
        )
        .expect("flags parse");
        assert_eq!(
            (c.role, c.redis_url.as_deref(), c.rpc_timeout),
            (Role::Rpc, Some("redis://x:2"), Duration::from_millis(50))
        );
    }

    #[test]
    fn redis_timeout_nests_inside_the_rpc_timeout_unless_given() {
        let c = parse(&[], &[]).expect("defaults parse");
        assert_eq!(
            (c.rpc_timeout, c.redis_timeout),
            (Duration::from_millis(1000), Duration::from_millis(800))
        );
        let c = parse(&["--rpc-timeout-ms", "3000"], &[]).expect("parses");
        assert_eq!(c.redis_timeout, Duration::from_millis(2400));
        let c = parse(&["--redis-timeout-ms", "1500"], &[]).expect("parses");
        assert_eq!(c.redis_timeout, Duration::from_millis(1500));
        assert!(parse(&["--redis-timeout-ms", "0"], &[]).is_err());
    }

    #[test]
    fn mistakes_are_reported() {
        assert!(parse(&["gateway"], &[]).is_err());
        assert!(parse(&["--nope", "1"], &[]).is_err());
        assert!(parse(&["--rpc-timeout-ms", "0"], &[]).is_err());
        assert!(parse(&["--queue"], &[]).is_err());
        assert!(parse(&["--idempotency-ttl-s", "0"], &[]).is_err());
        assert!(parse(&["--idempotency-ttl-s", "315360001"], &[]).is_err());
        let c = parse(&[], &[("IM_IDEMPOTENCY_TTL_S", "60")]).expect("env parses");
        assert_eq!(c.idempotency_ttl, Duration::from_secs(60));
        assert!(parse(&["both"], &[]).is_err());
        assert!(parse(&["gateway", "--rpc", "10.0.0.2:8888"], &[]).is_ok());
        assert!(parse(&["gateway", "--registry", "etcd://h:2379/im/rpc"], &[]).is_ok());
        let c = parse(&["gateway"], &[("IM_REGISTRY", "etcd://h/x")]).expect("env registry");
        assert_eq!(c.registry.as_deref(), Some("etcd://h/x"));
        assert_eq!(parse(&[], &[]).expect("defaults").metrics_addr, None);
        let c = parse(&["rpc"], &[("IM_METRICS_ADDR", "127.0.0.1:9100")]).expect("env metrics");
        assert_eq!(c.metrics_addr.as_deref(), Some("127.0.0.1:9100"));
    }

    /// README's Configuration table has one row per option, with its env
    /// var and its default (the cell's first word), and no other rows.
    #[test]
    fn readme_table_matches_the_options() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("## Configuration")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has a Configuration section");
        let rows: Vec<Vec<String>> = section
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| {
                l.split(" | ")
                    .map(|c| c.trim_matches(['|', ' ', '`']).to_string())
                    .collect()
            })
            .collect();
        for o in OPTIONS {
            let row = rows.iter().find(|r| r[0] == o.flag).unwrap_or_else(|| {
                panic!("README's Configuration table has no row for {}", o.flag)
            });
            assert_eq!(row[1], o.env, "env var of {}", o.flag);
            if let Some(default) = o.default {
                let first = row[2].split_whitespace().next().unwrap_or("");
                assert_eq!(
                    first.trim_matches('`'),
                    default,
                    "default of {} in README",
                    o.flag
                );
            }
        }
        for row in &rows {
            assert!(
                OPTIONS.iter().any(|o| o.flag == row[0]),
                "README documents {}, which is not an option",
                row[0]
            );
        }
    }
}
