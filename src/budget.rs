//! The gateway's process-wide budget for reply bytes held until written
//! (`--max-buffered-bytes`), shared fairly between clients.
//!
//! Every pull reply is charged, by its real size, to the client that asked
//! (its address, or its token's subject with authentication) and to the
//! connection that will write it; the charge rides with the reply's bytes
//! ([`held`]) and ends when the last view of them is dropped, i.e. once the
//! reply has been rendered into the connection's output. That output is
//! charged too, while it waits to be written ([`Charge::resize`]).
//!
//! A pull that answers at once first reserves the most its page can weigh
//! ([`Account::reserve`]; refused: 503 `overloaded` with `Retry-After`, at
//! once, with no call made), and the reservation shrinks to the real size
//! when the reply arrives ([`Reserved::settle`]): so what one client has in
//! flight through the RPC tier is bounded too (64 pipelined full-page pulls
//! on each of 12 connections kept the RPC connection busy for seconds, and
//! other clients' calls behind them timed out). A pull held for new
//! messages (long poll, a stream's next page) reserves nothing while it
//! waits, as held work has its own limits; its reply is charged when it
//! arrives, and dropped there, answered 503, if it does not fit
//! ([`Account::charge`]).
//!
//! Fair shares: a client may hold at most `max / n` where `n` is the number
//! of clients holding anything, counting it, and never more than half of
//! the budget, so one client alone cannot starve the next one to come; a
//! client that holds nothing may take one reply beyond its share (a page
//! may be larger than a small share). The last quarter of the budget is
//! kept for clients that hold little ([`SMALL_HOLD_SHARE`]): shares alone
//! did not stop two addresses, each at its half, from filling the budget
//! between them, after which every other client's pull was 503
//! (`tests/abuse_budget.rs`, 40 attacking addresses). Now an attacker
//! needs an address per `max / 256` of that quarter (64 of them, or 64
//! IPv6 /64s) to leave others nothing, and the others' ordinary pulls
//! (10 messages: 660 KB reserved) are small holds.
//!
//! Counting is by charge, not by worst case: a pull's reply may be anything
//! from 100 bytes to 6.5 MB, and reserving the worst case before the call
//! made pipelined pulls wait for each other (issue 20, items 1 and 4).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

/// `--max-buffered-bytes` unset: 256 MiB, or an eighth of the machine's
/// memory if that is less.
pub const DEFAULT_MAX: usize = 256 * 1024 * 1024;

/// A client holding at most `max / SMALL_HOLD_SHARE` (with the reply it
/// asks room for) may use the whole budget; others only the first
/// [`BIG_HOLDERS_SHARE`]. 1 MiB of the default 256 MiB: a default pull
/// (10 messages) reserves 660 KB.
pub const SMALL_HOLD_SHARE: usize = 256;
/// The part of the budget (in quarters) that clients holding more than a
/// small hold may fill between them.
pub const BIG_HOLDERS_SHARE: usize = 3;

/// The budget when none is configured, sized to the machine.
pub fn default_max() -> usize {
    match machine_memory() {
        Some(ram) => DEFAULT_MAX.min(ram / 8).max(16 * 1024 * 1024),
        None => DEFAULT_MAX,
    }
}

/// The machine's memory in bytes, if `/proc/meminfo` says.
pub fn machine_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    mem_total(&text)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Who is charged: a client address (an IPv6 client by its /64, which one
/// host can rotate through freely) or a token's subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    pub fn of_ip(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey(u128::from(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => ClientKey(u128::from(v6) & !u128::from(u64::MAX)),
        }
    }

    /// A token's subject; never equal to an address's key (the low half of
    /// an IPv6 key is zero, of a mapped IPv4 key all but 32 bits are).
    pub fn of_subject(subject: &str) -> ClientKey {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        subject.hash(&mut hasher);
        ClientKey((1u128 << 127) | (u128::from(hasher.finish()) << 1) | 1)
    }
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    clients: HashMap<ClientKey, usize>,
}

/// The process's budget; see the module doc.
#[derive(Debug)]
pub struct MemoryBudget {
    max: usize,
    state: Mutex<State>,
}

impl MemoryBudget {
    pub fn new(max: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            max,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only numbers behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes charged now, over every client.
    pub fn used(&self) -> usize {
        self.lock().total
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// An account for one connection of `client`.
    pub fn account(self: &Arc<Self>, client: ClientKey) -> Account {
        Account {
            budget: self.clone(),
            client,
            connection: Arc::new(AtomicUsize::new(0)),
            reserved: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether `client` may hold `bytes` more (see the module doc).
    fn admits(&self, state: &State, client: ClientKey, bytes: usize) -> bool {
        let holds = state.clients.get(&client).copied().unwrap_or(0);
        let total = state.total.saturating_add(bytes);
        if total > self.max {
            return false;
        }
        if holds.saturating_add(bytes) <= self.max / SMALL_HOLD_SHARE {
            return true;
        }
        if total > self.max / 4 * BIG_HOLDERS_SHARE {
            return false;
        }
        if holds == 0 {
            return true;
        }
        let holders = state.clients.len().max(2);
        holds.saturating_add(bytes) <= self.max / holders
    }

    /// Adds `bytes` (which may be negative as a release) to `client`.
    fn adjust(state: &mut State, client: ClientKey, add: usize, sub: usize) {
        state.total = state.total.saturating_add(add).saturating_sub(sub);
        let holds = state.clients.entry(client).or_insert(0);
        *holds = holds.saturating_add(add).saturating_sub(sub);
        if *holds == 0 {
            state.clients.remove(&client);
        }
    }
}

/// One connection's view of the budget: charges go to its client and are
/// counted for the connection too ([`Account::held`]).
#[derive(Debug, Clone)]
pub struct Account {
    budget: Arc<MemoryBudget>,
    client: ClientKey,
    connection: Arc<AtomicUsize>,
    /// Bytes reserved for this connection's replies still to come.
    reserved: Arc<AtomicUsize>,
}

impl Account {
    /// The same connection, charged to another client (a token's subject).
    pub fn for_client(&self, client: ClientKey) -> Account {
        Account {
            client,
            ..self.clone()
        }
    }

    /// The client charged.
    pub fn client(&self) -> ClientKey {
        self.client
    }

    /// Charges `bytes` if the client's share and the process have room.
    pub fn charge(&self, bytes: usize) -> Option<Charge> {
        let mut state = self.budget.lock();
        if !self.budget.admits(&state, self.client, bytes) {
            return None;
        }
        MemoryBudget::adjust(&mut state, self.client, bytes, 0);
        drop(state);
        self.connection.fetch_add(bytes, Ordering::Relaxed);
        Some(Charge {
            account: self.clone(),
            bytes,
            held: true,
        })
    }

    /// Reserves `bytes` (the most a reply can weigh) like
    /// [`charge`](Self::charge), to be settled when the reply arrives.
    /// Not counted in the connection's [`held`](Self::held) until settled:
    /// that is what the connection holds, not what it may come to hold.
    pub fn reserve(&self, bytes: usize) -> Option<Reserved> {
        let mut charge = self.charge(bytes)?;
        self.connection.fetch_sub(bytes, Ordering::Relaxed);
        self.reserved.fetch_add(bytes, Ordering::Relaxed);
        charge.held = false;
        Some(Reserved(Arc::new(Mutex::new(Some(charge)))))
    }

    /// An empty charge, to be [`resized`](Charge::resize).
    pub fn empty(&self) -> Charge {
        Charge {
            account: self.clone(),
            bytes: 0,
            held: true,
        }
    }

    /// Bytes this connection holds now.
    pub fn held(&self) -> usize {
        self.connection.load(Ordering::Relaxed)
    }

    /// Bytes reserved for this connection's replies still to come.
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }
}

/// Bytes counted against the budget until dropped.
#[derive(Debug)]
pub struct Charge {
    account: Account,
    bytes: usize,
    /// Counted in its connection's [`Account::held`] (a reservation is not).
    held: bool,
}

impl Charge {
    /// Counts `bytes` instead, whatever the budget: for what is already
    /// held and must be written (a connection's output), so that others see
    /// it and further replies are refused while it is there.
    pub fn resize(&mut self, bytes: usize) {
        if bytes == self.bytes {
            return;
        }
        let (add, sub) = (
            bytes.saturating_sub(self.bytes),
            self.bytes.saturating_sub(bytes),
        );
        let mut state = self.account.budget.lock();
        MemoryBudget::adjust(&mut state, self.account.client, add, sub);
        drop(state);
        let counter = match self.held {
            true => &self.account.connection,
            false => &self.account.reserved,
        };
        counter.fetch_add(add, Ordering::Relaxed);
        counter.fetch_sub(sub, Ordering::Relaxed);
        self.bytes = bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.resize(0);
    }
}

/// A reservation for a reply still to come; its clones share it (a call
/// retried on another server). Dropped unsettled (the reply never came, or
/// came for nobody), it is given back.
#[derive(Debug, Clone)]
pub struct Reserved(Arc<Mutex<Option<Charge>>>);

impl Reserved {
    /// The reply has arrived, `bytes` long: the reservation becomes its
    /// charge (`None` if another attempt's reply took it already).
    pub fn settle(&self, bytes: usize) -> Option<Charge> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut charge = slot.take()?;
        // From what may come to what is held: the same bytes move from the
        // connection's reserved count to its held one, then take the real
        // size (never more than the reservation in practice: it is the
        // page's largest; counted as it is if it were).
        let reserved = charge.bytes;
        charge
            .account
            .reserved
            .fetch_sub(reserved, Ordering::Relaxed);
        charge
            .account
            .connection
            .fetch_add(reserved, Ordering::Relaxed);
        charge.held = true;
        charge.resize(bytes);
        Some(charge)
    }
}

/// Bytes that keep their charge for as long as any view of them lives.
struct Held {
    bytes: Bytes,
    _charge: Charge,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A compact copy of `bytes` (not pinning the buffer they are a view of)
/// that holds `charge` until its last view is dropped.
pub fn held(bytes: &[u8], charge: Charge) -> Bytes {
    held_owned(Bytes::copy_from_slice(bytes), charge)
}

/// `bytes` themselves, already compact (made for this), holding `charge`
/// until their last view is dropped.
pub fn held_owned(bytes: Bytes, charge: Charge) -> Bytes {
    Bytes::from_owner(Held {
        bytes,
        _charge: charge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> ClientKey {
        ClientKey::of_ip(IpAddr::from([10, 0, 0, last]))
    }

    /// With 25,600: small holds up to 100, big holders up to 19,200 in all.
    const MAX: usize = 25_600;

    #[test]
    fn one_client_holds_at_most_half_and_others_still_get_room() {
        let budget = MemoryBudget::new(MAX);
        let a = budget.account(ip(1));
        let held: Vec<Charge> = std::iter::from_fn(|| a.charge(2560)).take(20).collect();
        assert_eq!(held.len(), 5, "half of the budget");
        assert_eq!(a.held(), 12_800);
        let b = budget.account(ip(2));
        let b1: Vec<Charge> = std::iter::from_fn(|| b.charge(2048)).take(20).collect();
        assert_eq!(b1.len(), 3, "to three quarters of the budget in all");
        assert!(a.charge(1).is_none(), "a is over its share");
        let c = budget.account(ip(3));
        let small = c.charge(100).expect("a small hold uses the last quarter");
        drop(held);
        assert_eq!((a.held(), budget.used()), (0, 6144 + 100));
        drop((b1, small));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn clients_holding_much_leave_the_last_quarter_to_those_holding_little() {
        let budget = MemoryBudget::new(MAX);
        // Two clients take all they may: 19,200 between them.
        let attackers: Vec<Account> = (1..=2).map(|i| budget.account(ip(i))).collect();
        let mut held = Vec::new();
        for a in &attackers {
            held.extend(std::iter::from_fn(|| a.charge(1000)).take(100));
        }
        assert_eq!(budget.used(), 19_000);
        // A third still gets its small replies, not a big one.
        let victim = budget.account(ip(3));
        assert!(victim.charge(1000).is_none(), "a big reply waits");
        let pulls: Vec<Charge> = (0..2).filter_map(|_| victim.charge(50)).collect();
        assert_eq!(pulls.len(), 2, "small replies fit");
        assert!(victim.charge(200).is_none(), "past its small hold, the cap");
    }

    #[test]
    fn a_client_holding_nothing_takes_one_big_reply_within_the_big_holders_part() {
        let budget = MemoryBudget::new(MAX);
        let clients: Vec<Account> = (1..=5).map(|i| budget.account(ip(i))).collect();
        let _some: Vec<Charge> = clients[..4].iter().filter_map(|c| c.charge(2560)).collect();
        let big = clients[4]
            .charge(8000)
            .expect("its first reply, over a 1/5 share");
        assert!(clients[4].charge(200).is_none(), "beyond that, its share");
        let newcomer = budget.account(ip(9));
        assert!(newcomer.charge(1000).is_none(), "no big reply past 3/4");
        assert!(newcomer.charge(100).is_some(), "a small one fits");
        drop(big);
    }

    #[test]
    fn output_is_counted_whatever_the_budget_and_held_bytes_keep_their_charge() {
        let budget = MemoryBudget::new(100);
        let a = budget.account(ip(1));
        let mut output = a.empty();
        output.resize(500);
        assert_eq!(budget.used(), 500);
        assert!(budget.account(ip(2)).charge(1).is_none());
        output.resize(0);
        let bytes = held(b"reply", a.charge(5).expect("room"));
        let view = bytes.slice(1..3);
        drop(bytes);
        assert_eq!(a.held(), 5, "a view still holds the charge");
        drop(view);
        assert_eq!((a.held(), budget.used()), (0, 0));
    }

    #[test]
    fn a_reservation_settles_to_the_real_size_once() {
        let budget = MemoryBudget::new(1000);
        let a = budget.account(ip(1));
        let reserved = a.reserve(400).expect("room");
        assert!(a.reserve(200).is_none(), "half the budget is reserved");
        assert_eq!(
            (a.held(), a.reserved()),
            (0, 400),
            "what may come is not held"
        );
        let copy = reserved.clone();
        let charge = reserved.settle(30).expect("the first reply settles");
        assert!(copy.settle(30).is_none(), "once");
        assert_eq!((budget.used(), a.held(), a.reserved()), (30, 30, 0));
        drop(charge);
        let unsettled = a.reserve(400).expect("room");
        drop(unsettled);
        assert_eq!((budget.used(), a.reserved()), (0, 0));
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_subjects_apart() {
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let b: IpAddr = "2001:db8::ffff:2".parse().expect("ip");
        assert_eq!(ClientKey::of_ip(a), ClientKey::of_ip(b));
        assert_ne!(ClientKey::of_ip(a), ClientKey::of_subject("alice"));
        assert_eq!(mem_total("MemTotal:  1024 kB\n"), Some(1024 * 1024));
    }
}
