//! The process's log: one line per event on stderr, `im-server: LEVEL:
//! message key=value ...`, filtered by level (`--log-level`), and a message
//! repeated from one place collapsed to one line per second.
//!
//! Our own rather than the `log` facade: what matters here is the collapse
//! (a full Redis once wrote 34,433 lines for 17,214 failed sends), which
//! needs state per call site; the facade has no call-site state, so a
//! logger behind it would hash every record into a shared table and still
//! need its own key=value formatting. A `static` per call site, made by the
//! macros below, is that state for free, and the whole module is smaller
//! than the glue the facade would need.
//!
//! Messages are free text (start-up lines keep their wording: tests and
//! operators read them); what varies per event and should not defeat the
//! collapse (a peer's address, an error) goes in the fields. A field's value
//! is written as is, or quoted (`key="two words"`) when it has spaces,
//! quotes, `=` or is empty.
//!
//! ```ignore
//! crate::logging::warning!("rpc connection closed"; peer = peer, err = err);
//! crate::logging::info!("http listening on {local}");
//! ```

use std::fmt::{self, Display, Write as _};
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

/// `--log-level`: a default level and optional per-module ones, as
/// `RUST_LOG` spells them: `info`, `warn,rpc=debug,store::redis::cluster=off`.
/// Module paths are relative to the crate (`rpc` is `im_server::rpc`); the
/// longest matching prefix wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// `None`: off.
    default: Option<Level>,
    modules: Vec<(String, Option<Level>)>,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            default: Some(Level::Info),
            modules: Vec::new(),
        }
    }
}

fn parse_level(text: &str) -> Result<Option<Level>, String> {
    Ok(Some(match text.trim().to_ascii_lowercase().as_str() {
        "off" => return Ok(None),
        "error" => Level::Error,
        "warn" | "warning" => Level::Warn,
        "info" => Level::Info,
        "debug" | "trace" => Level::Debug,
        other => {
            return Err(format!(
                "unknown log level {other:?} (off, error, warn, info, debug)"
            ));
        }
    }))
}

impl std::str::FromStr for Filter {
    type Err = String;

    fn from_str(text: &str) -> Result<Filter, String> {
        let mut filter = Filter::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None => filter.default = parse_level(part)?,
                Some((module, level)) => {
                    let module = module.trim();
                    let module = module.strip_prefix("im_server::").unwrap_or(module);
                    filter
                        .modules
                        .push((module.to_string(), parse_level(level)?));
                }
            }
        }
        Ok(filter)
    }
}

impl Filter {
    /// Whether `level` is logged from the module `path` (`module_path!()`).
    pub fn allows(&self, level: Level, path: &str) -> bool {
        let path = path.strip_prefix("im_server").unwrap_or(path);
        let path = path.strip_prefix("::").unwrap_or(path);
        let mut chosen = (0, self.default);
        for (module, max) in &self.modules {
            let matches = path == module
                || path.starts_with(module.as_str()) && path[module.len()..].starts_with("::");
            if matches && module.len() >= chosen.0 {
                chosen = (module.len(), *max);
            }
        }
        chosen.1.is_some_and(|max| level <= max)
    }
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// Sets the filter once, at start-up (later calls are ignored); until
/// then `info` and above are logged.
pub fn init(filter: Filter) {
    let _ = FILTER.set(filter);
}

pub fn enabled(level: Level, path: &str) -> bool {
    match FILTER.get() {
        Some(filter) => filter.allows(level, path),
        None => level <= Level::Info,
    }
}

/// What one call site remembers to collapse its repeats: its last few
/// messages (by hash), each with the second (since start) it was last
/// written in and how many identical lines were dropped since. A few, not
/// one, so that two messages alternating from one place (two reasons to
/// refuse a connection) are each collapsed too.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collapse {
    recent: [Recent; RECENT],
}

const RECENT: usize = 4;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Recent {
    message: u64,
    second: u64,
    dropped: u64,
    used: bool,
}

impl Collapse {
    /// Whether a line with this message hash, at this second, is written:
    /// `Some(n)` with the number of identical lines dropped before it, or
    /// `None` (dropped: the same message was already written this second).
    pub fn admit(&mut self, message: u64, second: u64) -> Option<u64> {
        if let Some(seen) = self
            .recent
            .iter_mut()
            .find(|r| r.used && r.message == message)
        {
            if seen.second == second {
                seen.dropped += 1;
                return None;
            }
            let dropped = std::mem::take(&mut seen.dropped);
            seen.second = second;
            return Some(dropped);
        }
        // A new message takes the place of the one written longest ago.
        let oldest = self
            .recent
            .iter_mut()
            .min_by_key(|r| (r.used, r.second))
            .unwrap_or_else(|| unreachable!("RECENT > 0"));
        *oldest = Recent {
            message,
            second,
            dropped: 0,
            used: true,
        };
        Some(0)
    }
}

/// A call site's state; one `static` per macro call.
pub struct Site(Mutex<Collapse>);

impl Site {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Site {
        const EMPTY: Recent = Recent {
            message: 0,
            second: 0,
            dropped: 0,
            used: false,
        };
        Site(Mutex::new(Collapse {
            recent: [EMPTY; RECENT],
        }))
    }
}

/// One line: `im-server: LEVEL: message key=value ... [repeated=N]`.
pub fn line(level: Level, message: &str, fields: &[(&str, &dyn Display)], repeated: u64) -> String {
    let mut out = format!("im-server: {}: {message}", level.name());
    let mut value = String::new();
    for (key, field) in fields {
        value.clear();
        let _ = write!(value, "{field}");
        put_field(&mut out, key, &value);
    }
    if repeated > 0 {
        let _ = write!(out, " repeated={repeated}");
    }
    out.push('\n');
    out
}

fn put_field(out: &mut String, key: &str, value: &str) {
    let bare = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '=' || c.is_control());
    if bare {
        let _ = write!(out, " {key}={value}");
    } else {
        let _ = write!(out, " {key}={value:?}");
    }
}

fn process_second() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// Writes one event unless its site wrote the same message this second.
/// (The macros check [`enabled`] first, so nothing is formatted for a
/// filtered-out line.)
pub fn emit(site: &Site, level: Level, message: fmt::Arguments, fields: &[(&str, &dyn Display)]) {
    static HASHER: OnceLock<std::hash::RandomState> = OnceLock::new();
    let message = message.to_string();
    let mut hasher = HASHER.get_or_init(Default::default).build_hasher();
    hasher.write(message.as_bytes());
    let admitted = site
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .admit(hasher.finish(), process_second());
    if let Some(repeated) = admitted {
        let text = line(level, &message, fields, repeated);
        // One write per line, so lines from threads never interleave.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// An error line from the binary (`main.rs`, which cannot use the crate's
/// macros): the reason the process stops.
pub fn fatal(why: &str) {
    log_at!(Level::Error, "{why}");
}

/// `log_at!(Level::Warn, "format {args}"; key = value, ...)`: what the
/// level macros expand to.
macro_rules! log_at {
    ($level:expr, $($msg:expr),+ $(; $($key:ident = $value:expr),* $(,)?)?) => {{
        static SITE: $crate::logging::Site = $crate::logging::Site::new();
        if $crate::logging::enabled($level, module_path!()) {
            $crate::logging::emit(
                &SITE,
                $level,
                format_args!($($msg),+),
                &[$($((stringify!($key), &$value as &dyn ::std::fmt::Display)),*)?],
            );
        }
    }};
}

macro_rules! error {
    ($($t:tt)*) => { $crate::logging::log_at!($crate::logging::Level::Error, $($t)*) };
}
macro_rules! warning {
    ($($t:tt)*) => { $crate::logging::log_at!($crate::logging::Level::Warn, $($t)*) };
}
macro_rules! info {
    ($($t:tt)*) => { $crate::logging::log_at!($crate::logging::Level::Info, $($t)*) };
}
#[allow(unused_macros)]
macro_rules! debug {
    ($($t:tt)*) => { $crate::logging::log_at!($crate::logging::Level::Debug, $($t)*) };
}

#[allow(unused_imports)]
pub(crate) use {debug, error, info, log_at, warning};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_message_is_written_once_a_second_with_the_count_dropped() {
        let mut c = Collapse::default();
        assert_eq!(c.admit(7, 0), Some(0));
        for _ in 0..5000 {
            assert_eq!(c.admit(7, 0), None);
        }
        // Another message from the same place is written at once.
        assert_eq!(c.admit(8, 0), Some(0));
        assert_eq!(c.admit(8, 0), None);
        assert_eq!(c.admit(8, 0), None);
        // Next second: written, with what was dropped.
        assert_eq!(c.admit(8, 1), Some(2));
        assert_eq!(c.admit(8, 1), None);
        assert_eq!(c.admit(8, 3), Some(1));
        assert_eq!(c.admit(8, 4), Some(0));
        // Two messages alternating are each collapsed.
        let mut c = Collapse::default();
        assert_eq!(c.admit(1, 0), Some(0));
        assert_eq!(c.admit(2, 0), Some(0));
        for _ in 0..100 {
            assert_eq!(c.admit(1, 0), None);
            assert_eq!(c.admit(2, 0), None);
        }
        assert_eq!(c.admit(2, 1), Some(100));
        // More distinct messages than it remembers: each still written
        // at most once a second while it is remembered.
        for m in 10..20 {
            assert_eq!(c.admit(m, 2), Some(0));
        }
    }

    #[test]
    fn lines_carry_level_message_and_quoted_fields() {
        let peer = "127.0.0.1:5";
        let err = "connection reset by peer";
        let fields: [(&str, &dyn Display); 3] = [("peer", &peer), ("err", &err), ("n", &3)];
        assert_eq!(
            line(Level::Warn, "rpc connection closed", &fields, 0),
            "im-server: warn: rpc connection closed peer=127.0.0.1:5 err=\"connection reset by peer\" n=3\n"
        );
        assert_eq!(
            line(Level::Info, "http listening on [::1]:80", &[("e", &"")], 4),
            "im-server: info: http listening on [::1]:80 e=\"\" repeated=4\n"
        );
        assert_eq!(
            line(Level::Error, "x", &[("k", &"a\"b\nc")], 0),
            "im-server: error: x k=\"a\\\"b\\nc\"\n"
        );
    }

    #[test]
    fn filters_read_like_rust_log() {
        let f: Filter = "warn,rpc=debug,rpc::server=off".parse().expect("parses");
        assert!(f.allows(Level::Warn, "im_server::store::redis"));
        assert!(!f.allows(Level::Info, "im_server::store::redis"));
        assert!(f.allows(Level::Debug, "im_server::rpc::client"));
        assert!(f.allows(Level::Debug, "im_server::rpc"));
        assert!(!f.allows(Level::Error, "im_server::rpc::server"));
        assert!(!f.allows(Level::Debug, "im_server::rpcx"));
        let f: Filter = "im_server::store=error".parse().expect("parses");
        assert!(f.allows(Level::Info, "im_server::roles"));
        assert!(!f.allows(Level::Warn, "im_server::store::memory"));
        assert_eq!("".parse::<Filter>(), Ok(Filter::default()));
        assert!(
            !"off"
                .parse::<Filter>()
                .expect("off")
                .allows(Level::Error, "im_server")
        );
        assert!("loud".parse::<Filter>().is_err());
        assert!("rpc=loud".parse::<Filter>().is_err());
    }
}
