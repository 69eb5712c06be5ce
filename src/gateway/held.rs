//! Limits on held work: pulls waiting for new messages (`wait_ms`) and open
//! event streams, per client (its address, or its token's subject) and per
//! gateway process (`--max-held-per-client`, `--max-held`).
//!
//! Held work is cheap in memory (a few KB each) but long: without a limit of
//! its own, 300 connections of 64 pipelined waiting pulls took all 16,384
//! in-flight slots of the RPC tier, and every other client's call waited
//! for one and failed with 504 (issue 20, item 2). Held calls also have
//! in-flight slots of their own in the RPC client and server
//! ([`crate::mux`], [`crate::rpc::server`]), so that even at this limit
//! ordinary calls find theirs free.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::error::ApiError;
use crate::budget::ClientKey;
use crate::error::Error;

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    clients: HashMap<ClientKey, usize>,
}

/// The process's count of held work, shared by every shard.
#[derive(Debug)]
pub struct HeldWork {
    per_client: usize,
    max: usize,
    counts: Mutex<Counts>,
}

impl HeldWork {
    pub fn new(per_client: usize, max: usize) -> Arc<HeldWork> {
        Arc::new(HeldWork {
            per_client,
            max,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more held request of `client`: 429 over its own
    /// limit, 503 `overloaded` over the process's.
    pub fn hold(self: &Arc<Self>, client: ClientKey) -> Result<Held, ApiError> {
        let mut counts = self.lock();
        let holds = counts.clients.get(&client).copied().unwrap_or(0);
        if holds >= self.per_client {
            return Err(ApiError::TooManyHeld);
        }
        if counts.total >= self.max {
            return Err(ApiError::Service(Error::Overloaded));
        }
        counts.total += 1;
        counts.clients.insert(client, holds + 1);
        Ok(Held {
            work: self.clone(),
            client,
        })
    }

    /// Held requests now, over every client.
    pub fn total(&self) -> usize {
        self.lock().total
    }
}

/// One held request's place; given back when dropped.
#[derive(Debug)]
pub struct Held {
    work: Arc<HeldWork>,
    client: ClientKey,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.work.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(holds) = counts.clients.get_mut(&self.client) {
            *holds = holds.saturating_sub(1);
            if *holds == 0 {
                counts.clients.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(last: u8) -> ClientKey {
        ClientKey::of_ip(std::net::IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn a_client_over_its_share_gets_429_and_the_process_503() {
        let work = HeldWork::new(2, 3);
        let a: Vec<Held> = (0..2)
            .map(|_| work.hold(client(1)).expect("room"))
            .collect();
        assert_eq!(work.hold(client(1)).map(|_| ()), Err(ApiError::TooManyHeld));
        let b = work.hold(client(2)).expect("another client is unaffected");
        assert_eq!(
            work.hold(client(3)).map(|_| ()),
            Err(ApiError::Service(Error::Overloaded))
        );
        drop(a);
        drop(b);
        assert_eq!(work.total(), 0);
        assert!(work.hold(client(1)).is_ok());
    }
}
