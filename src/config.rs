//! Command line and environment, parsed once into a [`Config`].
//!
//! Every option has a flag and an environment variable; a flag wins over the
//! environment, which wins over the default. Each option is declared once,
//! in the `options!` list below: its typed [`Config`] field, parser, flag,
//! environment variable, default and help line. Everything else — parsing,
//! `--help`, the components' defaults ([`Config::defaults`]) — comes from
//! it, and a unit test holds the Configuration table of docs/operations.md
//! to it.

use std::time::Duration;

use crate::ratelimit::Rate;

mod components;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Gateway and RPC server in one process, talking over real TCP.
    All,
    Gateway,
    Rpc,
}

/// How an option's text (given, from the environment, or its default;
/// `None` if unset) becomes its typed value; the flag names it in errors.
type Parser<T> = fn(&'static str, Option<&str>) -> Result<T, String>;

/// Declares every option once — its typed field of [`Config`], its parser,
/// flag, environment variable, default and help line — and derives from
/// that list the struct, [`OPTIONS`] (parsing and `--help`) and the step
/// that turns the collected texts into a `Config`: no flag is looked up by
/// its spelling, and no default is written anywhere else.
macro_rules! options {
    (@default unset) => { None };
    (@default $default:literal) => { Some($default) };
    ($( $field:ident: $ty:ty = $parse:ident($flag:literal, $env:literal, $default:tt, $help:literal); )*) => {
        // The help lines are the fields' docs; their `[...]` mean "optional",
        // not links.
        #[allow(rustdoc::broken_intra_doc_links)]
        #[derive(Debug, Clone)]
        pub struct Config {
            pub role: Role,
            /// The flags given (on the command line or in the environment)
            /// rather than left at their defaults: a default may be lowered
            /// to fit the machine (e.g. the open-file limit), a given value
            /// never is.
            pub given: Vec<&'static str>,
            $( #[doc = $help] pub $field: $ty, )*
        }

        pub const OPTIONS: &[OptionSpec] = &[
            $( OptionSpec { flag: $flag, env: $env, default: options!(@default $default), help: $help }, )*
        ];

        impl Config {
            /// `values` holds each option's text and where it came from, in
            /// [`OPTIONS`]' order. An error names what the user set: the
            /// flag, or the environment variable.
            fn from_texts(role: Role, values: &[(Option<String>, Source)]) -> Result<Config, String> {
                let given = OPTIONS
                    .iter()
                    .zip(values)
                    .filter(|(_, (_, source))| *source != Source::Default)
                    .map(|(o, _)| o.flag)
                    .collect();
                let mut texts = values.iter().map(|(text, source)| (text.as_deref(), *source));
                Ok(Config {
                    role,
                    given,
                    $( $field: {
                        let parse: Parser<$ty> = $parse;
                        let (text, source) = texts.next().unwrap_or((None, Source::Default));
                        let name = match source {
                            Source::Env => $env,
                            Source::Flag | Source::Default => $flag,
                        };
                        parse(name, text)?
                    }, )*
                })
            }
        }
    };
}

/// Where an option's text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Default,
    Env,
    Flag,
}

pub struct OptionSpec {
    pub flag: &'static str,
    pub env: &'static str,
    /// `None`: unset unless given.
    pub default: Option<&'static str>,
    pub help: &'static str,
}

options! {
    http_addr: String = text("--http-addr", "IM_HTTP_ADDR", "[::]:8080",
        "address the HTTP gateway listens on ([::] accepts IPv4 too; 0.0.0.0 if the host has no IPv6)");
    rpc_listen: String = text("--rpc-listen", "IM_RPC_LISTEN", "127.0.0.1:8888",
        "address the RPC server listens on");
    rpc_addr: Option<String> = optional("--rpc", "IM_RPC_ADDR", unset,
        "RPC servers the gateway calls, comma-separated ip:port or host:port (host names re-resolved every 2 s, every A/AAAA record an endpoint; default in `all`: the one started here)");
    registry: Option<String> = optional("--registry", "IM_REGISTRY", unset,
        "etcd://host:2379[,host2:2379]/prefix: RPC servers register there (lease, TTL 10 s), gateways discover them there");
    rpc_advertise: Option<String> = optional("--rpc-advertise", "IM_RPC_ADVERTISE", unset,
        "ip:port the RPC server registers (default: --rpc-listen, unless that is a wildcard)");
    redis_url: Option<String> = optional("--redis", "REDIS_URL", unset,
        "redis://[[user]:password@]host[:port][/db] (user: a Redis ACL user), unix:///path.sock[?db=N&password=P] or a socket path, or cluster seeds redis://[:password@]h1:p1,h2:p2; unset = embedded memory store");
    rpc_timeout: Duration = millis("--rpc-timeout-ms", "IM_RPC_TIMEOUT_MS", "1000",
        "per-call RPC timeout (504 after it)");
    rpc_connections: usize = positive("--rpc-connections", "IM_RPC_CONNECTIONS", "1",
        "multiplexed connections to the RPC server, per gateway thread");
    redis_connections: usize = positive("--redis-connections", "IM_REDIS_CONNECTIONS", "1",
        "pipelined connections to Redis, per RPC server thread");
    redis_timeout: Option<Duration> = optional_millis("--redis-timeout-ms", "IM_REDIS_TIMEOUT_MS", unset,
        "a Redis command not answered within this fails with 503 (default: 80% of --rpc-timeout-ms, so it fires before the gateway's 504)");
    redis_wait_replicas: u32 = replicas("--redis-wait-replicas", "IM_REDIS_WAIT_REPLICAS", "0",
        "a send is acknowledged only after WAIT confirms this many replicas have it (else 503)");
    max_body: usize = count("--max-body", "IM_MAX_BODY", "1048576",
        "largest request body in bytes (413 above)");
    max_head: usize = positive("--max-header-bytes", "IM_MAX_HEADER_BYTES", "16384",
        "largest request line + headers in bytes (431 above)");
    max_frame: usize = positive("--max-frame", "IM_MAX_FRAME", "16777216",
        "largest RPC frame in bytes");
    max_rpc_connections: usize = positive("--max-rpc-connections", "IM_MAX_RPC_CONNECTIONS", "1024",
        "open connections to the RPC server; more are closed at once");
    rpc_idle_timeout: Duration = seconds("--rpc-idle-timeout-s", "IM_RPC_IDLE_TIMEOUT_S", "3600",
        "an RPC server connection with nothing in flight and no request for this long is closed");
    max_rpc_output: usize = positive("--max-rpc-output", "IM_MAX_RPC_OUTPUT", "67108864",
        "reply bytes one RPC server connection may hold (being made, at their largest, or unsent); past it the connection is not read");
    idle_timeout: Duration = seconds("--idle-timeout-s", "IM_IDLE_TIMEOUT_S", "60",
        "idle keep-alive connections are closed after this");
    request_timeout: Duration = seconds("--request-timeout-s", "IM_REQUEST_TIMEOUT_S", "10",
        "a request must arrive whole within this of its first byte (408 after)");
    max_connections: usize = positive("--max-connections", "IM_MAX_CONNECTIONS", "10000",
        "open HTTP connections; more are answered 503 and closed");
    max_output_buffer: usize = positive("--max-output-buffer", "IM_MAX_OUTPUT_BUFFER", "4194304",
        "response bytes queued per HTTP connection; no further pipelined request starts above it");
    max_buffered_bytes: Option<usize> = optional_positive("--max-buffered-bytes", "IM_MAX_BUFFERED_BYTES", unset,
        "reply bytes the gateway process holds for its clients until written (pull pages, queued output), shared fairly between clients; a reply that does not fit is answered 503 overloaded (default: 256 MiB, or 1/8 of RAM if less)");
    write_timeout: Duration = seconds("--write-timeout-s", "IM_WRITE_TIMEOUT_S", "10",
        "an HTTP client that accepts no response bytes for this long is closed");
    stream_heartbeat: Duration = seconds("--stream-heartbeat-s", "IM_STREAM_HEARTBEAT_S", "15",
        "an event stream (/api/stream) silent for this long gets a heartbeat comment");
    drain_timeout: Duration = seconds_or_zero("--drain-timeout-s", "IM_DRAIN_TIMEOUT_S", "10",
        "on SIGTERM/SIGINT, how long in-flight requests may take to finish");
    queue: usize = positive("--queue", "IM_QUEUE", "8192",
        "calls queued per RPC/Redis connection before 503 + Retry-After");
    max_in_flight: usize = positive("--max-in-flight", "IM_MAX_IN_FLIGHT", "8192",
        "calls in flight per RPC/Redis connection (and per thread on the all-in-one's local lane)");
    max_queued_bytes: usize = positive("--max-queued-bytes", "IM_MAX_QUEUED_BYTES", "8388608",
        "bytes of Redis commands queued per connection (and of sends waiting to be batched, per thread) before 503 overloaded");
    threads: usize = count("--threads", "IM_THREADS", "0",
        "worker threads, each a single-threaded runtime with its own connections (0 = one per core)");
    pull_max_wait_ms: i32 = wait_ms("--pull-max-wait-ms", "IM_PULL_MAX_WAIT_MS", "30000",
        "longest a pull with `wait_ms` is held for new messages (larger waits are cut to it; 0: never; keep it below your load balancer's idle timeout)");
    max_held_per_client: usize = positive("--max-held-per-client", "IM_MAX_HELD_PER_CLIENT", "256",
        "pulls waiting for messages (wait_ms) and open event streams one client (address, or token subject) may hold at once in a gateway process; over it 429");
    max_held: usize = positive("--max-held", "IM_MAX_HELD", "10000",
        "pulls waiting for messages and open event streams a gateway process holds at once, over every client; over it 503 overloaded");
    rpc_secret_file: Option<String> = optional("--rpc-secret-file", "IM_RPC_SECRET_FILE", unset,
        "a file holding a shared secret (>= 32 bytes): RPC servers then accept only connections that prove they know it (challenge-response), and gateways prove it; set the same file on both");
    auth_jwt_secret_file: Option<String> = optional("--auth-jwt-secret-file", "IM_AUTH_JWT_SECRET_FILE", unset,
        "turns authentication on: a file holding the HS256 secret (>= 32 bytes) of the bearer tokens the gateway accepts");
    auth_jwt_public_key_file: Option<String> = optional("--auth-jwt-public-key-file", "IM_AUTH_JWT_PUBLIC_KEY_FILE", unset,
        "turns authentication on: a file holding the Ed25519 public key (PEM, as `openssl pkey -pubout` writes) of the EdDSA bearer tokens the gateway accepts; with --auth-jwt-secret-file too, tokens of either kind are accepted");
    auth_issuer: Option<String> = optional("--auth-issuer", "IM_AUTH_ISSUER", unset,
        "with authentication: the `iss` every token must carry");
    auth_audience: Option<String> = optional("--auth-audience", "IM_AUTH_AUDIENCE", unset,
        "with authentication: a value every token's `aud` must contain");
    rate_limit_send: Option<Rate> = rate("--rate-limit-send", "IM_RATE_LIMIT_SEND", unset,
        "sends per user (per client address without authentication) and gateway process: N/s or N/m, optionally :BURST (e.g. 20/s:40); over it 429");
    rate_limit_pull: Option<Rate> = rate("--rate-limit-pull", "IM_RATE_LIMIT_PULL", unset,
        "pulls per user (or client address) and gateway process, like --rate-limit-send");
    trusted_proxies: Vec<crate::gateway::client_addr::Cidr> = cidrs("--trusted-proxies", "IM_TRUSTED_PROXIES", unset,
        "comma-separated addresses or CIDR blocks of proxies (load balancers) whose Forwarded / X-Forwarded-For name the client, for the rate limits without authentication");
    allowed_origins: Vec<String> = list("--allowed-origins", "IM_ALLOWED_ORIGINS", unset,
        "comma-separated origins (https://app.example) whose browser pages may send without authentication; others' cross-origin sends are 403");
    metrics_addr: Option<String> = optional("--metrics-addr", "IM_METRICS_ADDR", unset,
        "address serving GET /metrics (Prometheus text format) for any role, e.g. the rpc role, which has no HTTP port; the gateway also serves /metrics on --http-addr");
    ws_max_subscriptions: usize = positive("--ws-max-subscriptions", "IM_WS_MAX_SUBSCRIPTIONS", "256",
        "chats one WebSocket connection (/api/ws) may subscribe to at once");
    ws_max_message: usize = positive("--ws-max-message", "IM_WS_MAX_MESSAGE", "1048576",
        "largest WebSocket message a client may send, in bytes (close 1009 above)");
    ws_ping_interval: Duration = seconds("--ws-ping-interval-s", "IM_WS_PING_INTERVAL_S", "30",
        "a WebSocket client silent for this long is pinged, and closed if silent for as long again");
    idempotency_ttl: Duration = idempotency_ttl("--idempotency-ttl-s", "IM_IDEMPOTENCY_TTL_S", "86400",
        "how long a send's idempotency key is remembered, in seconds");
    log_level: crate::logging::Filter = log_filter("--log-level", "IM_LOG", "info",
        "what is logged: off, error, warn, info or debug, optionally per module as RUST_LOG spells it (warn,rpc=debug); a message repeated from one place is written once a second with a count");
    change_log_retention: Duration = idempotency_ttl("--change-log-retention-s", "IM_CHANGE_LOG_RETENTION_S", "86400",
        "how long a chat's change log keeps an edit or delete for streams that resume, in seconds");
    retain_messages: usize = count("--retain-messages", "IM_RETAIN_MESSAGES", "0",
        "messages kept per chat, the newest; older ones are removed (0 = unlimited)");
    retain_age: Duration = seconds_or_zero("--retain-age-s", "IM_RETAIN_AGE_S", "0",
        "how long a message is kept, in seconds; older ones are removed (0 = forever)");
    memory_store_max_bytes: Option<usize> = optional_positive("--memory-store-max-bytes", "IM_MEMORY_STORE_MAX_BYTES", unset,
        "without Redis: bytes the embedded store may hold (messages with their senders, edits, tombstones, change logs, idempotency records); a send or edit past it is refused 507 insufficient_storage, deletes and trims free it (default: 1 GiB, or 1/4 of RAM if less)");
}

/// Longest idempotency-key retention accepted, in seconds: 10 years (Redis
/// refuses an `EX` it cannot add to its clock in milliseconds).
pub const MAX_IDEMPOTENCY_TTL_S: u64 = 10 * 365 * 86_400;

// The parsers, one per kind of value.

fn text(_flag: &'static str, value: Option<&str>) -> Result<String, String> {
    Ok(value.unwrap_or_default().to_string())
}

fn optional(_flag: &'static str, value: Option<&str>) -> Result<Option<String>, String> {
    Ok(value.map(String::from))
}

fn number(flag: &'static str, value: Option<&str>) -> Result<u64, String> {
    let text = value.unwrap_or_default();
    text.parse()
        .map_err(|_| format!("{flag} must be a non-negative integer, got {text:?}"))
}

fn positive_number(flag: &'static str, value: Option<&str>) -> Result<u64, String> {
    match number(flag, value)? {
        0 => Err(format!("{flag} must be at least 1")),
        n => Ok(n),
    }
}

fn count(flag: &'static str, value: Option<&str>) -> Result<usize, String> {
    Ok(number(flag, value)? as usize)
}

fn positive(flag: &'static str, value: Option<&str>) -> Result<usize, String> {
    Ok(positive_number(flag, value)? as usize)
}

fn optional_positive(flag: &'static str, value: Option<&str>) -> Result<Option<usize>, String> {
    value.map(|v| positive(flag, Some(v))).transpose()
}

fn seconds(flag: &'static str, value: Option<&str>) -> Result<Duration, String> {
    Ok(Duration::from_secs(positive_number(flag, value)?))
}

fn seconds_or_zero(flag: &'static str, value: Option<&str>) -> Result<Duration, String> {
    Ok(Duration::from_secs(number(flag, value)?))
}

fn millis(flag: &'static str, value: Option<&str>) -> Result<Duration, String> {
    Ok(Duration::from_millis(positive_number(flag, value)?))
}

fn optional_millis(flag: &'static str, value: Option<&str>) -> Result<Option<Duration>, String> {
    value.map(|v| millis(flag, Some(v))).transpose()
}

fn replicas(flag: &'static str, value: Option<&str>) -> Result<u32, String> {
    u32::try_from(number(flag, value)?).map_err(|_| format!("{flag} is too large"))
}

fn idempotency_ttl(flag: &'static str, value: Option<&str>) -> Result<Duration, String> {
    match positive_number(flag, value)? {
        n if n > MAX_IDEMPOTENCY_TTL_S => {
            Err(format!("{flag} must be at most {MAX_IDEMPOTENCY_TTL_S}"))
        }
        n => Ok(Duration::from_secs(n)),
    }
}

/// 0 is allowed: pulls never wait.
fn wait_ms(flag: &'static str, value: Option<&str>) -> Result<i32, String> {
    let max = crate::domain::MAX_WAIT_MS;
    match number(flag, value)? {
        n if n > max as u64 => Err(format!("{flag} must be at most {max}")),
        n => Ok(n as i32),
    }
}

fn list(_flag: &'static str, value: Option<&str>) -> Result<Vec<String>, String> {
    Ok(value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
        .collect())
}

fn cidrs(
    flag: &'static str,
    value: Option<&str>,
) -> Result<Vec<crate::gateway::client_addr::Cidr>, String> {
    list(flag, value)?
        .iter()
        .map(|c| c.parse().map_err(|e| format!("{flag}: {e}")))
        .collect()
}

fn log_filter(flag: &'static str, value: Option<&str>) -> Result<crate::logging::Filter, String> {
    value
        .unwrap_or_default()
        .parse()
        .map_err(|e| format!("{flag}: {e}"))
}

fn rate(flag: &'static str, value: Option<&str>) -> Result<Option<Rate>, String> {
    value
        .map(str::parse)
        .transpose()
        .map_err(|e| format!("{flag}: {e}"))
}

pub fn usage() -> String {
    let mut text = String::from(
        "im-server: instant-messaging backend (HTTP gateway -> protobuf RPC -> Redis)\n\n\
         Usage: im-server [all|gateway|rpc] [OPTIONS]\n\
         \x20      im-server token --sub USER [TOKEN OPTIONS]   (see im-server token --help)\n\
         \x20      im-server --version\n\n\
         Roles:\n  all      gateway and RPC server in one process (default)\n  \
         gateway  the HTTP gateway alone (needs --rpc or --registry)\n  rpc      the RPC server alone\n  \
         token    prints a signed bearer token for development and tests (with authentication on)\n\n\
         Options (flag, environment variable, default):\n",
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
    text.push_str("  -h, --help\n  -V, --version\n");
    text
}

/// What `--version` prints.
pub fn version() -> String {
    format!("im-server {}\n", env!("CARGO_PKG_VERSION"))
}

pub enum Parsed {
    Run(Box<Config>),
    Help,
    Version,
}

impl Config {
    /// Parses `args` (without the program name), reading the environment
    /// through `env`.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Parsed, String> {
        let mut values: Vec<(Option<String>, Source)> = OPTIONS
            .iter()
            .map(|o| match env(o.env).filter(|v| !v.is_empty()) {
                Some(value) => (Some(value), Source::Env),
                None => (o.default.map(String::from), Source::Default),
            })
            .collect();
        let mut role = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                return Ok(Parsed::Help);
            }
            if arg == "-V" || arg == "--version" {
                return Ok(Parsed::Version);
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
                            "unknown role {arg:?} (expected all, gateway, rpc or token)"
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
            values[i] = (Some(value), Source::Flag);
        }
        let role = role.unwrap_or(Role::All);
        let config = Config::from_texts(role, &values)?;
        if role == Role::Gateway && config.rpc_addr.is_none() && config.registry.is_none() {
            return Err(
                "the gateway role needs --rpc <addr,...> (or IM_RPC_ADDR) or --registry <etcd://...>"
                    .into(),
            );
        }
        Ok(Parsed::Run(Box::new(config)))
    }

    /// Every option at its default, the role `all`: the one place the
    /// components' own defaults (e.g. `Limits::default`) come from.
    pub fn defaults() -> Config {
        match Config::parse(Vec::new(), |_| None) {
            Ok(Parsed::Run(config)) => *config,
            // The declared defaults are constants, checked by a unit test.
            Ok(Parsed::Help | Parsed::Version) | Err(_) => {
                unreachable!("the declared defaults parse")
            }
        }
    }

    /// Whether `flag` was given rather than left at its default.
    pub fn was_given(&self, flag: &str) -> bool {
        self.given.contains(&flag)
    }

    /// The Redis command timeout: given, or derived from the RPC timeout.
    pub fn redis_timeout(&self) -> Duration {
        self.redis_timeout
            .unwrap_or_else(|| redis_timeout_default(self.rpc_timeout))
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
            Parsed::Help | Parsed::Version => Err("help".into()),
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
    fn the_declared_defaults_parse_and_fit_together() {
        let c = Config::defaults();
        assert_eq!(c.role, Role::All);
        // An RPC frame holds a full page of the largest messages.
        let page = crate::domain::MAX_LIMIT as usize * crate::domain::MAX_MESSAGE_WIRE_BYTES;
        assert!(c.max_frame > page, "{} <= {page}", c.max_frame);
    }

    #[test]
    fn redis_timeout_nests_inside_the_rpc_timeout_unless_given() {
        let c = parse(&[], &[]).expect("defaults parse");
        assert_eq!(
            (c.rpc_timeout, c.redis_timeout()),
            (Duration::from_millis(1000), Duration::from_millis(800))
        );
        let c = parse(&["--rpc-timeout-ms", "3000"], &[]).expect("parses");
        assert_eq!(c.redis_timeout(), Duration::from_millis(2400));
        let c = parse(&["--redis-timeout-ms", "1500"], &[]).expect("parses");
        assert_eq!(c.redis_timeout(), Duration::from_millis(1500));
        assert!(parse(&["--redis-timeout-ms", "0"], &[]).is_err());
    }

    #[test]
    fn a_bad_value_is_reported_under_the_name_it_was_given() {
        let err = parse(&[], &[("IM_MAX_BODY", "1MB")]).expect_err("bad env value");
        assert_eq!(
            err,
            r#"IM_MAX_BODY must be a non-negative integer, got "1MB""#
        );
        let err = parse(&["--max-body", "2MB"], &[("IM_MAX_BODY", "1MB")]).expect_err("bad flag");
        assert_eq!(
            err,
            r#"--max-body must be a non-negative integer, got "2MB""#
        );
        // A good flag wins over a bad variable, which is then not read.
        let c = parse(&["--max-body", "10"], &[("IM_MAX_BODY", "1MB")]).expect("flag wins");
        assert_eq!(c.max_body, 10);
        let err = parse(&[], &[("IM_RATE_LIMIT_SEND", "fast")]).expect_err("bad rate");
        assert!(err.starts_with("IM_RATE_LIMIT_SEND: "), "{err}");
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

    /// The text of docs/operations.md's section `## {title}`, up to the
    /// next one.
    fn operations_section(title: &str) -> &'static str {
        include_str!("../docs/operations.md")
            .split(&format!("## {title}\n"))
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .unwrap_or_else(|| panic!("docs/operations.md has no section {title:?}"))
    }

    /// The Configuration table (docs/operations.md) has exactly one row per
    /// option, with
    /// its env var and its default as `--help` shows it (`unset` included):
    /// the default cell, backticks dropped, is that text or starts with it
    /// and a space, `:` or `(` (`0 (one per core)`, `unset: embedded
    /// store`); and it has no other rows.
    #[test]
    fn configuration_table_matches_the_options() {
        let section = operations_section("Configuration");
        let rows: Vec<Vec<String>> = section
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| {
                l.split(" | ")
                    .map(|c| c.trim_matches(['|', ' ']).replace('`', ""))
                    .collect()
            })
            .collect();
        assert!(
            rows.iter().all(|r| r.len() == 4),
            "Configuration rows have 4 cells"
        );
        for o in OPTIONS {
            let matching: Vec<_> = rows.iter().filter(|r| r[0] == o.flag).collect();
            let [row] = matching[..] else {
                panic!(
                    "the Configuration table has {} rows for {}, not 1",
                    matching.len(),
                    o.flag
                );
            };
            assert_eq!(row[1], o.env, "env var of {} in docs/operations.md", o.flag);
            let shown = o.default.unwrap_or("unset");
            let cell = row[2].as_str();
            assert!(
                matches!(cell.strip_prefix(shown),
                    Some(rest) if rest.is_empty() || rest.starts_with([' ', ':', '('])),
                "default of {} in docs/operations.md is {cell:?}, --help says {shown:?}",
                o.flag
            );
        }
        for row in &rows {
            assert!(
                OPTIONS.iter().any(|o| o.flag == row[0]),
                "docs/operations.md documents {}, which is not an option",
                row[0]
            );
        }
    }

    /// The Limits table (docs/operations.md) writes defaults in human units (`1 MiB`,
    /// `10,000`, `1 s` for a millisecond flag, `24 h`): every row naming one
    /// option whose default cell starts with a number and a unit states the
    /// declared default.
    #[test]
    fn limits_table_states_the_declared_defaults() {
        let section = operations_section("Limits and timeouts");
        let mut checked = 0;
        for line in section.lines().filter(|l| l.starts_with("| ")) {
            let cells: Vec<&str> = line.split(" | ").collect();
            let (Some(default), Some(flag)) = (cells.get(1), cells.get(2)) else {
                continue;
            };
            let flag = flag.trim_matches('`');
            let Some(option) = OPTIONS.iter().find(|o| o.flag == flag) else {
                continue;
            };
            let mut words = default.split_whitespace();
            let Some(Ok(n)) = words.next().map(|w| w.replace(',', "").parse::<u64>()) else {
                continue;
            };
            // In the flag's unit: milliseconds, seconds, or bytes / a count.
            let ms_per = if flag.ends_with("-ms") { 1000 } else { 1 };
            let value = match words.next() {
                Some("KiB") => n * 1024,
                Some("MiB") => n * 1024 * 1024,
                Some("h") => n * 3600 * ms_per,
                Some("s") => n * ms_per,
                Some("ms") => n,
                _ => n,
            };
            assert_eq!(
                Some(value.to_string().as_str()),
                option.default,
                "Limits row {line:?} of docs/operations.md"
            );
            checked += 1;
        }
        assert!(checked >= 15, "only {checked} Limits rows checked");
    }

    /// `--help` has a line for every option with its env var and default.
    #[test]
    fn help_lists_every_option_with_its_default() {
        let help = usage();
        for o in OPTIONS {
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{} <v>", o.flag)))
                .unwrap_or_else(|| panic!("--help has no line for {}", o.flag));
            assert!(line.contains(o.env), "{line}");
            assert!(
                line.ends_with(&format!("[{}]", o.default.unwrap_or("unset"))),
                "{line}"
            );
        }
    }

    /// Each declared default, given back as text by flag or by env var,
    /// parses to the value the option has when not given at all.
    #[test]
    fn every_default_parses_as_itself() {
        let defaults = format!("{:?}", Config::defaults());
        for o in OPTIONS {
            let Some(text) = o.default else { continue };
            // (Apart from which options were given.)
            let mut by_flag = parse(&[o.flag, text], &[]).expect("the default parses");
            assert_eq!(by_flag.given, [o.flag]);
            by_flag.given.clear();
            assert_eq!(format!("{by_flag:?}"), defaults, "{} {text}", o.flag);
            let mut by_env = parse(&[], &[(o.env, text)]).expect("the default parses");
            assert_eq!(by_env.given, [o.flag]);
            by_env.given.clear();
            assert_eq!(format!("{by_env:?}"), defaults, "{}={text}", o.env);
        }
    }

    /// No two options share a flag or a variable: the parser finds a flag
    /// by its first declaration, so a second one would be silently dead.
    #[test]
    fn flags_and_variables_are_distinct() {
        for (i, a) in OPTIONS.iter().enumerate() {
            for b in &OPTIONS[i + 1..] {
                assert_ne!(a.flag, b.flag);
                assert_ne!(a.env, b.env);
            }
            assert!(a.flag.starts_with("--") && !a.help.is_empty());
        }
    }

    /// The messages are those the per-flag lookups gave before the options
    /// were declared in one list (scripts and people read them).
    #[test]
    fn errors_name_the_flag_and_the_rule() {
        // Arguments, environment, the message.
        type Case = (
            &'static [&'static str],
            &'static [(&'static str, &'static str)],
            &'static str,
        );
        let cases: &[Case] = &[
            (
                &["--max-body", "-1"],
                &[],
                "--max-body must be a non-negative integer, got \"-1\"",
            ),
            (
                &[],
                &[("IM_QUEUE", "x")],
                "IM_QUEUE must be a non-negative integer, got \"x\"",
            ),
            (&["--queue=0"], &[], "--queue must be at least 1"),
            (
                &["--idle-timeout-s", "0"],
                &[],
                "--idle-timeout-s must be at least 1",
            ),
            (
                &["--redis-timeout-ms", "0"],
                &[],
                "--redis-timeout-ms must be at least 1",
            ),
            (
                &["--redis-wait-replicas", "4294967296"],
                &[],
                "--redis-wait-replicas is too large",
            ),
            (
                &["--idempotency-ttl-s", "315360001"],
                &[],
                "--idempotency-ttl-s must be at most 315360000",
            ),
            (
                &["--pull-max-wait-ms", "30001"],
                &[],
                "--pull-max-wait-ms must be at most 30000",
            ),
            (&["--rate-limit-send", "fast"], &[], "--rate-limit-send: "),
            (
                &["--max-bodyy", "1"],
                &[],
                "unknown option \"--max-bodyy\" (see --help)",
            ),
            (&["--queue"], &[], "--queue needs a value"),
            (&["rpc", "all"], &[], "unexpected argument \"all\""),
            (
                &["both"],
                &[],
                "unknown role \"both\" (expected all, gateway, rpc or token)",
            ),
            (&["gateway"], &[], "the gateway role needs --rpc "),
        ];
        for (args, env, expected) in cases {
            let Err(err) = parse(args, env) else {
                panic!("{args:?} {env:?} should be refused");
            };
            // A message ending in a space is a prefix (the rest is the
            // rate parser's or spells out the alternatives).
            match expected.strip_suffix(' ') {
                Some(prefix) => assert!(err.starts_with(prefix), "{err}"),
                None => assert_eq!(&err, expected),
            }
        }
        let zero = [
            "--drain-timeout-s",
            "0",
            "--threads=0",
            "--max-body",
            "0",
            "--pull-max-wait-ms",
            "0",
        ];
        let c = parse(&zero, &[]).expect("0 is allowed for these");
        assert_eq!(
            (c.drain_timeout, c.threads, c.max_body, c.pull_max_wait_ms),
            (Duration::ZERO, 0, 0, 0)
        );
        let c = parse(
            &["--rate-limit-pull", "20/s:40"],
            &[("IM_RPC_TIMEOUT_MS", "")],
        )
        .expect("parses");
        assert!(c.rate_limit_pull.is_some() && c.rate_limit_send.is_none());
        assert_eq!(
            c.rpc_timeout,
            Duration::from_millis(1000),
            "an empty variable is unset"
        );
    }
}
