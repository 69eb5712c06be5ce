//! How much history a chat keeps (`--retain-messages`, `--retain-age-s`),
//! and the background sweep that trims chats nobody writes to.
//!
//! Reads never return a message outside the window, trimmed or not: a pull
//! reads from the age floor up (so `limit`, `has_more` and `next_cursor`
//! count only messages inside it), an edit or delete of an older message is
//! a 404. By count, the window is exact on write: `im_send_keep` (Redis) and
//! the embedded store's append drop what is beyond the newest N in the same
//! step that stores (a send adds at most its batch, so that is what it
//! removes, unless N was just lowered). By age, each send's run also
//! removes up to 64 expired messages of its chat in one run of 16
//! (amortised, bounded work per send),
//! and the sweep removes the rest and those of idle chats: every
//! [`SWEEP_PAUSE`], a pass over the chats (Redis: `SCAN` of `im:{*` on
//! each master, a few hundred keys per step; `im_trim` per chat, which
//! also drops the chat's tombstones below the floor).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::error::Error;
use crate::resp::{Reply, command};

/// The retention options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept per chat; 0 = any number.
    pub messages: usize,
    /// How long a message is kept; zero = forever.
    pub age: Duration,
}

/// Between two sweep passes.
pub const SWEEP_PAUSE: Duration = Duration::from_secs(10);
/// Keys one `SCAN` step asks for.
pub const SCAN_COUNT: &str = "200";

impl Retention {
    pub fn is_on(&self) -> bool {
        self.messages > 0 || !self.age.is_zero()
    }

    /// The oldest `send_time` inside the window at `now` (µs); 0 = any.
    pub fn floor(&self, now: i64) -> i64 {
        match self.age.as_micros() {
            0 => 0,
            age => now
                .saturating_sub(i64::try_from(age).unwrap_or(i64::MAX))
                .max(1),
        }
    }
}

/// One sweeper per process (every thread has its own store): the first
/// store to start one takes this.
static SWEEPING: AtomicBool = AtomicBool::new(false);

/// Whether the caller is the process's sweeper (age retention on, and no
/// other store started one).
pub fn take_sweeper(retention: &Retention) -> bool {
    !retention.age.is_zero() && !SWEEPING.swap(true, Ordering::SeqCst)
}

/// One pass of the sweep over one Redis node: `SCAN`s its chats and trims
/// each (`im_trim`, one chat per call: on a Cluster a call's keys share a
/// slot). `run` sends one command to the node; a failed step ends the pass
/// (the next one starts over). Returns the messages removed.
pub(super) async fn sweep_node<F, Fut>(run: F, retention: &Retention) -> u64
where
    F: Fn(Bytes) -> Fut,
    Fut: Future<Output = Result<Reply, Error>>,
{
    let mut cursor = Bytes::from_static(b"0");
    let mut removed = 0u64;
    loop {
        let scan = command::encode(&[
            b"SCAN",
            &cursor,
            b"MATCH",
            b"im:{*",
            b"COUNT",
            SCAN_COUNT.as_bytes(),
            b"TYPE",
            b"zset",
        ]);
        let Ok(Reply::Array(reply)) = run(scan).await else {
            return removed;
        };
        let mut reply = reply.into_iter();
        let (Some(Reply::BulkString(next)), Some(Reply::Array(keys))) =
            (reply.next(), reply.next())
        else {
            return removed;
        };
        let floor = retention.floor(crate::now_micros()).to_string();
        for key in keys {
            let Reply::BulkString(key) = key else {
                continue;
            };
            // `im:{<chat>}` -> `im:del:{<chat>}` (see `lifecycle::deleted_key`).
            let tombs = [&b"im:del:"[..], key.get(3..).unwrap_or_default()].concat();
            let trim =
                command::encode(&[b"FCALL", b"im_trim", b"2", &key, &tombs, floor.as_bytes()]);
            if let Ok(Reply::Integer(n)) = run(trim).await {
                removed += n.max(0) as u64;
            }
        }
        if &next[..] == b"0" {
            return removed;
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_follows_the_age() {
        let off = Retention::default();
        assert!(!off.is_on());
        assert_eq!(off.floor(1_000_000_000), 0);
        let day = Retention {
            messages: 0,
            age: Duration::from_secs(1),
        };
        assert!(day.is_on());
        assert_eq!(day.floor(5_000_000), 4_000_000);
        assert_eq!(day.floor(10), 1, "never 0 (which means any)");
    }
}
