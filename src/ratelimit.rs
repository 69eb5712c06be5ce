//! Token-bucket rate limits per client (user, or IP address when
//! authentication is off), shared by every shard of a gateway process.
//!
//! Memory is bounded whatever the clients do: a bucket that has refilled to
//! its burst is the same as no bucket and is dropped, and each stripe of the
//! table holds at most a fixed number of buckets. A flood of distinct keys
//! (a million spoofed-looking IPs) therefore costs at most
//! `max_buckets` × ~40 bytes; past that, the least recently used bucket in
//! the stripe is forgotten (that client starts again with a full burst,
//! which errs towards serving rather than refusing).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// `N/s` or `N/m`, with an optional burst: `20/s`, `600/m`, `20/s:40`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: requests allowed at once after a quiet spell.
    pub burst: f64,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        let bad =
            || format!("rate {text:?}: expected N/s or N/m, optionally :BURST (e.g. 20/s:40)");
        let (rate, burst) = match text.split_once(':') {
            Some((rate, burst)) => (rate, Some(burst)),
            None => (text, None),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let seconds = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            _ => return Err(bad()),
        };
        let burst = match burst {
            Some(b) => b.trim().parse::<u32>().map_err(|_| bad())?,
            None => count.max(1),
        };
        if count == 0 || burst == 0 {
            return Err(bad());
        }
        Ok(Rate {
            per_second: count as f64 / seconds,
            burst: burst as f64,
        })
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
    /// Counts the bucket in `im_rate_limit_buckets` while it is held.
    _counted: crate::metrics::Tracked,
}

impl Bucket {
    fn refilled(&self, rate: &Rate, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * rate.per_second).min(rate.burst)
    }
}

/// Stripes of the table: shards contend only when they hash to one stripe.
const STRIPES: usize = 64;

pub struct Limiter {
    rate: Rate,
    per_stripe: usize,
    hasher: RandomState,
    stripes: Vec<Mutex<HashMap<u64, Bucket>>>,
}

impl Limiter {
    /// A limiter remembering at most about `max_buckets` clients.
    pub fn new(rate: Rate, max_buckets: usize) -> Limiter {
        Limiter {
            rate,
            per_stripe: max_buckets.div_ceil(STRIPES).max(1),
            hasher: RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token for `client`; `Err(wait)` when there is none, with
    /// how long until there will be.
    pub fn check(&self, client: &[u8], now: Instant) -> Result<(), Duration> {
        // Keys are hashed with a per-process random key: a client cannot aim
        // its keys at one stripe, and two clients share a bucket only on a
        // 64-bit collision.
        let key = self.hasher.hash_one(client);
        let stripe = &self.stripes[(key as usize) % STRIPES];
        let mut buckets = stripe
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let tokens = match buckets.get(&key) {
            Some(bucket) => bucket.refilled(&self.rate, now),
            None => {
                if buckets.len() >= self.per_stripe {
                    self.make_room(&mut buckets, now);
                }
                self.rate.burst
            }
        };
        let (left, result) = if tokens < 1.0 {
            let wait = (1.0 - tokens) / self.rate.per_second;
            (tokens, Err(Duration::from_secs_f64(wait)))
        } else {
            (tokens - 1.0, Ok(()))
        };
        match buckets.get_mut(&key) {
            Some(bucket) => {
                bucket.tokens = left;
                bucket.updated = now;
            }
            None => {
                let counted = crate::metrics::track(crate::metrics::Gauge::RateLimitBuckets);
                let bucket = Bucket {
                    tokens: left,
                    updated: now,
                    _counted: counted,
                };
                buckets.insert(key, bucket);
            }
        }
        result
    }

    /// Drops the buckets that have refilled; if none has, the least recently
    /// used one.
    fn make_room(&self, buckets: &mut HashMap<u64, Bucket>, now: Instant) {
        buckets.retain(|_, b| b.refilled(&self.rate, now) < self.rate.burst);
        if buckets.len() >= self.per_stripe
            && let Some((&oldest, _)) = buckets.iter().min_by_key(|(_, b)| b.updated)
        {
            buckets.remove(&oldest);
        }
    }

    /// Buckets held now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u32 {
    (wait.as_secs_f64().ceil() as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(
            "20/s".parse(),
            Ok(Rate {
                per_second: 20.0,
                burst: 20.0
            })
        );
        assert_eq!(
            "20/s:40".parse(),
            Ok(Rate {
                per_second: 20.0,
                burst: 40.0
            })
        );
        assert_eq!(
            "60/m".parse(),
            Ok(Rate {
                per_second: 1.0,
                burst: 60.0
            })
        );
        for bad in ["", "20", "0/s", "20/h", "x/s", "20/s:0", "20/s:x", "-1/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn burst_then_refill() {
        let limiter = Limiter::new("2/s:3".parse().expect("rate"), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check(b"alice", t0), Ok(()));
        }
        let wait = limiter.check(b"alice", t0).expect_err("over the burst");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(retry_after_secs(wait), 1);
        assert_eq!(limiter.check(b"bob", t0), Ok(()), "others are not affected");
        assert!(
            limiter
                .check(b"alice", t0 + Duration::from_millis(499))
                .is_err()
        );
        assert_eq!(
            limiter.check(b"alice", t0 + Duration::from_millis(1000)),
            Ok(())
        );
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_clients() {
        let limiter = Limiter::new("1/s:1".parse().expect("rate"), 1000);
        let t0 = Instant::now();
        for i in 0..200_000u32 {
            let _ = limiter.check(&i.to_be_bytes(), t0 + Duration::from_micros(i as u64));
        }
        assert!(limiter.len() <= 1000 + STRIPES, "{} buckets", limiter.len());
        // Refilled buckets are dropped when room is needed.
        let later = t0 + Duration::from_secs(10);
        for i in 0..2000u32 {
            let _ = limiter.check(&(1_000_000 + i).to_be_bytes(), later);
        }
        assert!(limiter.len() <= 1000 + STRIPES, "{} buckets", limiter.len());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
