//! Admission before the RPC handshake (with `--rpc-secret-file`): a
//! connection that has proven nothing yet holds one of a few slots of its
//! own, not one of the `--max-rpc-connections` that authenticated gateways
//! need, and for a short time only.
//!
//! When every slot is taken, a new connection evicts the one that has been
//! waiting longest rather than being refused: idle connections opened by
//! someone without the secret then cannot keep a gateway out (its handshake
//! takes one round trip; theirs never ends), and what they cost is bounded
//! by the pool's size.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Pending handshakes of one accept loop, oldest first.
#[derive(Debug)]
struct Pending {
    slots: usize,
    next_id: u64,
    /// Each pending connection's id and the sender whose drop evicts it.
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Pending {
    /// A new connection's id and receiver; when the pool was full, the
    /// oldest is taken out (its sender dropped: it is evicted).
    fn admit(&mut self) -> (u64, oneshot::Receiver<()>, bool) {
        let evicted = if self.waiting.len() >= self.slots {
            self.waiting.pop_front().is_some()
        } else {
            false
        };
        self.next_id = self.next_id.wrapping_add(1);
        let (tx, rx) = oneshot::channel();
        self.waiting.push_back((self.next_id, tx));
        (self.next_id, rx, evicted)
    }

    fn leave(&mut self, id: u64) {
        self.waiting.retain(|(waiting, _)| *waiting != id);
    }
}

/// The pool of pre-handshake slots, shared by the accept loop and the
/// connections it admitted.
#[derive(Clone, Debug)]
pub struct Admission(Arc<Mutex<Pending>>);

impl Admission {
    pub fn new(slots: usize) -> Admission {
        Admission(Arc::new(Mutex::new(Pending {
            slots: slots.max(1),
            next_id: 0,
            waiting: VecDeque::new(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a new connection to the handshake: its ticket, and whether an
    /// older pending one was evicted to make room.
    pub fn admit(&self) -> (Ticket, bool) {
        let (id, evicted_rx, evicted_other) = self.lock().admit();
        let ticket = Ticket {
            id,
            pool: self.clone(),
            evicted: evicted_rx,
        };
        (ticket, evicted_other)
    }

    /// Connections in the handshake now.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// A connection's slot in the handshake pool, given back when dropped.
pub struct Ticket {
    id: u64,
    pool: Admission,
    evicted: oneshot::Receiver<()>,
}

impl Ticket {
    /// Resolves when a newer connection took this one's slot.
    pub async fn evicted(&mut self) {
        let _ = (&mut self.evicted).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pool.lock().leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evicted_now(ticket: &mut Ticket) -> bool {
        !matches!(
            ticket.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }

    #[test]
    fn a_full_pool_evicts_its_oldest_and_a_finished_handshake_frees_its_slot() {
        let pool = Admission::new(2);
        let (mut a, ev) = pool.admit();
        assert!(!ev);
        let (mut b, ev) = pool.admit();
        assert!(!ev);
        assert_eq!(pool.pending(), 2);
        let (mut c, ev) = pool.admit();
        assert!(ev, "the pool was full");
        assert!(evicted_now(&mut a), "the oldest goes");
        assert!(!evicted_now(&mut b) && !evicted_now(&mut c));
        assert_eq!(pool.pending(), 2);
        // b finishes its handshake: its slot is free, nobody is evicted.
        drop(b);
        assert_eq!(pool.pending(), 1);
        let (mut d, ev) = pool.admit();
        assert!(!ev);
        assert!(!evicted_now(&mut c) && !evicted_now(&mut d));
        // Dropping an evicted ticket changes nothing.
        drop(a);
        assert_eq!(pool.pending(), 2);
    }
}
