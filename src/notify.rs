//! Who is waiting for new messages in which chat: the notification hub
//! behind long-polling pulls (`wait_ms`) in the RPC server.
//!
//! A pull that may wait registers a [`Waiter`] for its chat *before* it
//! reads the store, and waits only once its registration is
//! [ready](Waiter::ready): for the embedded store at once; with Redis when
//! the chat's `SSUBSCRIBE` has been confirmed (src/store/subscriber.rs), so
//! a message stored between the read and the wait is still announced. Then
//! an empty read is followed by [`Waiter::changed`], which returns when a
//! message was stored in that chat, when the subscription was lost (the
//! waiter must re-read: something may have been missed), or at the deadline.
//!
//! The hub holds state only for chats with waiters: the first waiter of a
//! chat asks the upstream (Redis) to subscribe, and once the last one has
//! left, a [`Hub::sweep`] at least [`LINGER`] later asks it to unsubscribe
//! and the entry is gone. (A follower asks again as soon as its pull is
//! answered: without the linger every message in a followed room cost an
//! `SUNSUBSCRIBE`, an `SSUBSCRIBE`, a Redis round trip before the next pull
//! could wait, and three hops between threads — ws_load fanout, 100 rooms:
//! 36,000 of each for 37,500 messages.) Each request to the upstream
//! carries the entry's generation, so a late confirmation for an earlier
//! entry of the same chat can never mark a newer one ready. With no
//! upstream (the embedded store) an entry goes with its last waiter.
//!
//! Pure: no I/O, only channels; the upstream is whoever drains
//! [`Hub::with_upstream`]'s receiver.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant};

/// How long a chat stays subscribed upstream after its last waiter left
/// (see the module's doc); [`Hub::sweep`] is called every half of it.
pub const LINGER: Duration = Duration::from_secs(2);

/// What the hub asks of the upstream that announces new messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Start announcing this chat; confirm with [`Hub::confirmed`].
    Subscribe { chat: Box<str>, generation: u64 },
    /// Stop: no one waits for this chat any more.
    Unsubscribe { chat: Box<str> },
}

/// How far a chat's registration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    /// Asked for, not confirmed yet: a waiter must not rely on it.
    Pending,
    /// Every message stored from now on is announced.
    Ready,
    /// Announcements may have been missed (connection lost, slot moved):
    /// waiters re-read; the next new waiter subscribes again.
    Broken,
}

struct Entry {
    waiters: usize,
    /// When the last waiter left (upstream hubs keep the entry a while).
    idle_since: Option<Instant>,
    generation: u64,
    /// Bumped on every announcement (and on breakage, to wake waiters).
    changes: watch::Sender<u64>,
    registration: watch::Sender<Registration>,
}

pub struct Hub {
    chats: Mutex<HashMap<Box<str>, Entry>>,
    /// Chats in `chats`, readable without the lock: a send into a process
    /// where no one waits (the common case) costs one atomic load.
    waited: AtomicUsize,
    /// `None`: announcements come from this process ([`Hub::in_process`]).
    upstream: Option<mpsc::UnboundedSender<Upstream>>,
    next_generation: AtomicU64,
}

impl Hub {
    /// For a store in this process (the embedded store): registrations are
    /// ready at once, and the store calls [`Hub::notify`] itself.
    pub fn in_process() -> Arc<Hub> {
        Arc::new(Hub {
            chats: Mutex::new(HashMap::new()),
            waited: AtomicUsize::new(0),
            upstream: None,
            next_generation: 1.into(),
        })
    }

    /// For a store elsewhere (Redis): registrations are sent to the
    /// returned receiver and wait for [`Hub::confirmed`].
    pub fn with_upstream() -> (Arc<Hub>, mpsc::UnboundedReceiver<Upstream>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub {
            chats: Mutex::new(HashMap::new()),
            waited: AtomicUsize::new(0),
            upstream: Some(tx),
            next_generation: 1.into(),
        });
        (hub, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Entry>> {
        // The map stays consistent whatever panicked while holding it.
        self.chats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a waiter for `chat` (subscribing upstream if it is the
    /// first, or if the chat's subscription broke).
    pub fn register(self: &Arc<Self>, chat: &str) -> Waiter {
        let mut chats = self.lock();
        let count = chats.len() + usize::from(!chats.contains_key(chat));
        self.waited.store(count, Ordering::Release);
        let entry = chats.entry(chat.into()).or_insert_with(|| Entry {
            waiters: 0,
            idle_since: None,
            generation: 0,
            changes: watch::channel(0).0,
            registration: watch::channel(Registration::Broken).0,
        });
        entry.waiters += 1;
        entry.idle_since = None;
        if *entry.registration.borrow() == Registration::Broken {
            match &self.upstream {
                None => {
                    entry.registration.send_replace(Registration::Ready);
                }
                Some(upstream) => {
                    let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                    entry.generation = generation;
                    entry.registration.send_replace(Registration::Pending);
                    let chat = chat.into();
                    // A closed upstream leaves it Pending: waiters give up
                    // at their deadline and answer what they read.
                    let _ = upstream.send(Upstream::Subscribe { chat, generation });
                }
            }
        }
        Waiter {
            hub: self.clone(),
            chat: chat.into(),
            changes: entry.changes.subscribe(),
            registration: entry.registration.subscribe(),
        }
    }

    fn unregister(&self, chat: &str) {
        let mut chats = self.lock();
        let Some(entry) = chats.get_mut(chat) else {
            return;
        };
        entry.waiters -= 1;
        if entry.waiters > 0 {
            return;
        }
        match self.upstream {
            // Kept subscribed for the next waiter, until a sweep.
            Some(_) => entry.idle_since = Some(Instant::now()),
            None => {
                chats.remove(chat);
                self.waited.store(chats.len(), Ordering::Release);
            }
        }
    }

    /// Unsubscribes the chats nobody has waited for since [`LINGER`]
    /// before `now`. Called every `LINGER / 2` by the upstream's owner.
    pub fn sweep(&self, now: Instant) {
        let Some(upstream) = &self.upstream else {
            return;
        };
        let mut chats = self.lock();
        chats.retain(|chat, entry| {
            let idle = entry
                .idle_since
                .is_some_and(|t| now.duration_since(t) >= LINGER);
            if idle {
                let _ = upstream.send(Upstream::Unsubscribe { chat: chat.clone() });
            }
            !idle
        });
        self.waited.store(chats.len(), Ordering::Release);
    }

    /// A message was stored in `chat`: wakes its waiters (only them).
    pub fn notify(&self, chat: &str) {
        // A waiter registers (under the lock, storing `waited`) before it
        // reads the store, and this runs after the store's write: so if
        // it reads 0, no registered waiter can have missed this message.
        if self.waited.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(entry) = self.lock().get(chat) {
            entry.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The upstream confirmed the subscription made for `generation`.
    pub fn confirmed(&self, chat: &str, generation: u64) {
        if let Some(entry) = self.lock().get(chat)
            && entry.generation == generation
            && *entry.registration.borrow() == Registration::Pending
        {
            entry.registration.send_replace(Registration::Ready);
        }
    }

    /// `chat`'s announcements may have been missed: its waiters re-read.
    pub fn lost(&self, chat: &str) {
        if let Some(entry) = self.lock().get(chat) {
            Self::break_entry(entry);
        }
    }

    /// Every announcement may have been missed (the upstream connection
    /// broke): all waiters re-read, and new ones subscribe again.
    pub fn lost_all(&self) {
        for entry in self.lock().values() {
            Self::break_entry(entry);
        }
    }

    fn break_entry(entry: &Entry) {
        entry.registration.send_replace(Registration::Broken);
        entry.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Chats with waiters now (gauges, tests).
    pub fn chats_waited_on(&self) -> usize {
        self.lock().values().filter(|e| e.waiters > 0).count()
    }
}

/// One pull's registration for its chat; dropping it unregisters.
pub struct Waiter {
    hub: Arc<Hub>,
    chat: Box<str>,
    changes: watch::Receiver<u64>,
    registration: watch::Receiver<Registration>,
}

impl Waiter {
    /// Waits until every message stored from now on will be announced to
    /// this waiter. `false` if that cannot be had by `deadline` (the
    /// upstream is slow or down): then waiting would risk a missed message,
    /// and the pull answers what it reads.
    pub async fn ready(&mut self, deadline: Instant) -> bool {
        let ready = self.registration.wait_for(|r| *r != Registration::Pending);
        match tokio::time::timeout_at(deadline, ready).await {
            Ok(Ok(r)) => *r == Registration::Ready,
            _ => false,
        }
    }

    /// Whether every message stored is still announced to this waiter (its
    /// registration did not break since it was ready).
    pub fn is_ready(&self) -> bool {
        *self.registration.borrow() == Registration::Ready
    }

    /// Returns when a message was stored in the chat since registration
    /// (or since the last call), when the registration broke, or at
    /// `deadline`, whichever is first.
    pub async fn changed(&mut self, deadline: Instant) {
        let _ = tokio::time::timeout_at(deadline, self.changes.changed()).await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.hub.unregister(&self.chat);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    #[tokio::test]
    async fn in_process_waiters_are_ready_and_woken_by_their_chat_only() {
        let hub = Hub::in_process();
        let mut a = hub.register("a");
        let mut b = hub.register("b");
        assert!(a.ready(soon()).await && b.ready(soon()).await);
        hub.notify("a");
        let start = Instant::now();
        a.changed(Instant::now() + Duration::from_secs(5)).await;
        assert!(start.elapsed() < Duration::from_secs(1), "a was woken");
        assert!(!b.changes.has_changed().unwrap_or(true), "b was not");
        drop((a, b));
        assert_eq!(
            hub.chats_waited_on(),
            0,
            "no state survives the last waiter"
        );
    }

    #[tokio::test]
    async fn a_notification_between_register_and_wait_is_not_lost() {
        let hub = Hub::in_process();
        let mut w = hub.register("c");
        hub.notify("c"); // "stored" after registering, before waiting
        let start = Instant::now();
        w.changed(Instant::now() + Duration::from_secs(5)).await;
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn upstream_registrations_wait_for_their_own_confirmation() {
        let (hub, mut up) = Hub::with_upstream();
        let mut first = hub.register("c");
        let Some(Upstream::Subscribe { generation: g1, .. }) = up.recv().await else {
            panic!("subscribe expected");
        };
        assert!(!first.ready(soon()).await, "pending until confirmed");
        let mut second = hub.register("c");
        assert!(up.try_recv().is_err(), "one subscription per chat");
        hub.confirmed("c", g1);
        assert!(first.ready(soon()).await && second.ready(soon()).await);
        drop((first, second));
        assert_eq!(hub.chats_waited_on(), 0);
        // Lingering: a waiter that comes back is ready at once.
        let now = Instant::now();
        hub.sweep(now + LINGER / 2);
        let mut back = hub.register("c");
        assert!(
            up.try_recv().is_err(),
            "still subscribed: {:?}",
            up.try_recv()
        );
        assert!(back.ready(soon()).await);
        drop(back);
        hub.sweep(Instant::now() + LINGER);
        assert_eq!(
            up.recv().await,
            Some(Upstream::Unsubscribe { chat: "c".into() })
        );
        // A new entry ignores the confirmation of the old one.
        let mut third = hub.register("c");
        let Some(Upstream::Subscribe { generation: g2, .. }) = up.recv().await else {
            panic!("subscribe expected");
        };
        assert_ne!(g1, g2);
        hub.confirmed("c", g1);
        assert!(
            !third.ready(soon()).await,
            "a stale confirmation is ignored"
        );
        hub.confirmed("c", g2);
        assert!(third.ready(soon()).await);
    }

    #[tokio::test]
    async fn a_lost_subscription_wakes_waiters_and_is_made_again() {
        let (hub, mut up) = Hub::with_upstream();
        let mut w = hub.register("c");
        let Some(Upstream::Subscribe { generation, .. }) = up.recv().await else {
            panic!("subscribe expected");
        };
        hub.confirmed("c", generation);
        assert!(w.ready(soon()).await);
        hub.lost_all();
        let start = Instant::now();
        w.changed(Instant::now() + Duration::from_secs(5)).await;
        assert!(start.elapsed() < Duration::from_secs(1), "woken to re-read");
        let mut again = hub.register("c");
        assert!(
            matches!(up.recv().await, Some(Upstream::Subscribe { .. })),
            "subscribed again"
        );
        assert!(!again.ready(soon()).await);
    }
}
