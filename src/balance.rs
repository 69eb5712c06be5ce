//! Choosing an RPC endpoint for each call, with no I/O.
//!
//! Every endpoint is in one of three named states:
//!
//! ```text
//!            N consecutive failures             back-off elapsed
//!  Healthy ---------------------------> Ejected ----------------> Probing
//!     ^                                    ^                        |  |
//!     |     the probe ping answers         |  the probe ping fails  |  |
//!     +------------------------------------|------------------------+  |
//!                                          +---------------------------+
//!                                            (back-off doubled, capped)
//! ```
//!
//! A call goes to the less loaded of two endpoints drawn at random ("power of
//! two choices" on in-flight calls): nearly as even as least-loaded, without
//! herding every gateway shard onto the same momentarily idle endpoint.
//! Under load the draw is made once per *run*: the calls that follow it while
//! the chosen endpoint still has calls in flight (up to [`Policy::run_calls`],
//! within [`Policy::run_window`]) go to the same endpoint, so they share its
//! connection's writes and its server's reads and Redis batches. Drawn per
//! call, three endpoints each got a third as many calls per write and per
//! batch as one, and spent a third more CPU per send (bench/RESULTS.md).
//! A call with nothing in flight before it (light load) is drawn alone.
//! A Probing endpoint takes no calls: the caller pings it ([`Balancer::pings_due`])
//! and the ping decides, so no client request is risked on a server that may
//! still be dead or frozen. If every
//! endpoint is ejected, all of them are used anyway: with no healthy choice,
//! refusing the call outright would only turn a partial outage into a total
//! one.
//!
//! Time and randomness come from the caller (`now`) and a seeded generator,
//! so the tests drive them.

use std::time::{Duration, Instant};

/// Where an endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Healthy,
    /// Not used until `until`; the next ejection waits twice `backoff`.
    Ejected {
        until: Instant,
        backoff: Duration,
    },
    /// Back-off over: a ping decides whether it is back.
    Probing {
        backoff: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Consecutive failures (calls or pings) that eject a healthy endpoint.
    pub failures_to_eject: u32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Most calls in one run (1: every call is drawn alone).
    pub run_calls: u32,
    /// How long after its draw a run may take calls.
    pub run_window: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            failures_to_eject: 3,
            // Short: a restarted server should take traffic within a second.
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            // About one RPC server's batch at full load; a run of 16 lasts
            // ~0.6 ms at 25k calls/s per shard, short against any time
            // that matters to the spread.
            run_calls: 16,
            run_window: Duration::from_millis(1),
        }
    }
}

/// The calls going to one endpoint since its draw (see the module doc).
#[derive(Debug, Clone, Copy)]
struct Run {
    id: EndpointId,
    drawn: Instant,
    /// Calls it may still take.
    left: u32,
}

/// A state change worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Healthy until now; out after this many consecutive failures.
    Ejected(u32),
    /// Back in use after an ejection.
    Recovered,
    /// It said GOAWAY.
    GoingAway,
}

/// An endpoint's identity for the lifetime of the [`Balancer`], stable across
/// endpoint-set updates (indexes are not).
pub type EndpointId = u64;

struct Entry<K, T> {
    id: EndpointId,
    key: K,
    value: T,
    state: State,
    failures: u32,
    in_flight: usize,
}

/// The endpoints of one gateway shard, each carrying a `T` (its connections).
pub struct Balancer<K, T> {
    entries: Vec<Entry<K, T>>,
    policy: Policy,
    next_id: EndpointId,
    rng: u64,
    changes: Vec<(K, Change)>,
    run: Option<Run>,
}

impl<K: PartialEq + Clone, T> Balancer<K, T> {
    pub fn new(policy: Policy, seed: u64) -> Self {
        Balancer {
            entries: Vec::new(),
            policy,
            next_id: 0,
            // xorshift must not start at 0.
            rng: seed | 1,
            changes: Vec::new(),
            run: None,
        }
    }

    /// Makes the endpoint set `keys`: keeps the state (and value) of those
    /// already known, creates the new ones with `make`, drops the rest.
    pub fn set_endpoints(&mut self, keys: &[K], mut make: impl FnMut(&K) -> T) {
        self.entries.retain(|e| keys.contains(&e.key));
        for key in keys {
            if self.entries.iter().any(|e| &e.key == key) {
                continue;
            }
            self.next_id += 1;
            self.entries.push(Entry {
                id: self.next_id,
                key: key.clone(),
                value: make(key),
                state: State::Healthy,
                failures: 0,
                in_flight: 0,
            });
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Chooses an endpoint for one call, never one of `exclude` while another
    /// usable one exists, and counts the call as in flight: every `Some`
    /// must be matched by one [`Balancer::finished`].
    pub fn pick(&mut self, now: Instant, exclude: &[EndpointId]) -> Option<(EndpointId, &T)> {
        self.wake(now);
        let chosen = match self.continue_run(now, exclude) {
            Some(i) => i,
            None => {
                let i = self.draw(exclude)?;
                self.run = Some(Run {
                    id: self.entries[i].id,
                    drawn: now,
                    left: self.policy.run_calls.saturating_sub(1),
                });
                i
            }
        };
        let entry = &mut self.entries[chosen];
        entry.in_flight += 1;
        Some((entry.id, &entry.value))
    }

    /// The current run's endpoint, if the run goes on: calls left, inside
    /// its window, the endpoint healthy, not excluded, and busy (with
    /// nothing in flight there is nothing to share a write with).
    fn continue_run(&mut self, now: Instant, exclude: &[EndpointId]) -> Option<usize> {
        let run = self.run.as_mut()?;
        if run.left == 0
            || now.saturating_duration_since(run.drawn) >= self.policy.run_window
            || exclude.contains(&run.id)
        {
            return None;
        }
        let i = self
            .entries
            .iter()
            .position(|e| e.id == run.id && e.state == State::Healthy && e.in_flight > 0)?;
        run.left -= 1;
        Some(i)
    }

    /// Power of two choices on in-flight calls among the healthy endpoints
    /// not in `exclude`; if there are none (all look dead, or were tried),
    /// among any not yet tried, then among all.
    fn draw(&mut self, exclude: &[EndpointId]) -> Option<usize> {
        for fallback in 0..3 {
            let usable = |e: &Entry<K, T>| match fallback {
                0 => e.state == State::Healthy && !exclude.contains(&e.id),
                1 => !exclude.contains(&e.id),
                _ => true,
            };
            let n = self.entries.iter().filter(|e| usable(e)).count();
            let (first, second) = match n {
                0 => continue,
                1 => (0, 0),
                n => (self.random(n), self.random(n - 1)),
            };
            let nth = |k: usize| {
                let mut candidates = self.entries.iter().enumerate().filter(|(_, e)| usable(e));
                candidates.nth(k).map(|(i, _)| i)
            };
            let a = nth(first)?;
            if n == 1 {
                return Some(a);
            }
            // The second is drawn from the others: index n-1 stands in for `a`.
            let b = nth(if second == first { n - 1 } else { second })?;
            let less_loaded = self.entries[b].in_flight < self.entries[a].in_flight;
            return Some(if less_loaded { b } else { a });
        }
        None
    }

    /// Records how a picked call ended: `Some(true)` answered, `Some(false)`
    /// failed in a way that blames the endpoint, `None` neither (e.g. the
    /// caller's own invalid request, or a call that never left).
    pub fn finished(&mut self, id: EndpointId, outcome: Option<bool>, now: Instant) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
        match outcome {
            Some(true) => self.succeeded(id),
            Some(false) => self.failed(id, now),
            None => {}
        }
    }

    /// An answer from the endpoint outside a call (a ping).
    pub fn succeeded(&mut self, id: EndpointId) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) {
            entry.failures = 0;
            if entry.state != State::Healthy {
                self.changes.push((entry.key.clone(), Change::Recovered));
            }
            entry.state = State::Healthy;
        }
    }

    /// A failure outside a call (a ping that failed).
    pub fn failed(&mut self, id: EndpointId, now: Instant) {
        let policy = self.policy;
        let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) else {
            return;
        };
        entry.failures = entry.failures.saturating_add(1);
        entry.state = match entry.state {
            State::Healthy if entry.failures >= policy.failures_to_eject => {
                self.changes
                    .push((entry.key.clone(), Change::Ejected(entry.failures)));
                State::Ejected {
                    until: now + policy.min_backoff,
                    backoff: policy.min_backoff,
                }
            }
            State::Probing { backoff } => {
                let backoff = (backoff * 2).min(policy.max_backoff);
                State::Ejected {
                    until: now + backoff,
                    backoff,
                }
            }
            other => other,
        };
    }

    /// The endpoint said it is going away (GOAWAY): no new calls until the
    /// shortest back-off has passed, then it is probed like any other.
    pub fn going_away(&mut self, id: EndpointId, now: Instant) {
        let policy = self.policy;
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) {
            if entry.state == State::Healthy {
                self.changes.push((entry.key.clone(), Change::GoingAway));
            }
            entry.state = State::Ejected {
                until: now + policy.min_backoff,
                backoff: policy.min_backoff,
            };
        }
    }

    /// The endpoints to ping now: healthy ones with no call in flight (an
    /// idle endpoint is otherwise never checked) and those whose back-off
    /// is over (the ping is their probe).
    pub fn pings_due(&mut self, now: Instant) -> Vec<(EndpointId, &T)> {
        self.wake(now);
        self.entries
            .iter()
            .filter(|e| match e.state {
                State::Healthy => e.in_flight == 0,
                State::Probing { .. } => true,
                State::Ejected { .. } => false,
            })
            .map(|e| (e.id, &e.value))
            .collect()
    }

    /// Marks every endpoint for which `going_away` holds as going away.
    pub fn refresh(&mut self, now: Instant, going_away: impl Fn(&T) -> bool) {
        let gone: Vec<EndpointId> = self
            .entries
            .iter()
            .filter(|e| !matches!(e.state, State::Ejected { .. }) && going_away(&e.value))
            .map(|e| e.id)
            .collect();
        for id in gone {
            self.going_away(id, now);
        }
    }

    /// State changes since the last call, oldest first (for logging).
    pub fn take_changes(&mut self) -> Vec<(K, Change)> {
        std::mem::take(&mut self.changes)
    }

    #[cfg(test)]
    pub fn state(&self, key: &K) -> Option<State> {
        self.entries.iter().find(|e| &e.key == key).map(|e| e.state)
    }

    #[cfg(test)]
    pub fn key(&self, id: EndpointId) -> Option<&K> {
        self.entries.iter().find(|e| e.id == id).map(|e| &e.key)
    }

    /// Ejected endpoints whose back-off has passed become Probing.
    fn wake(&mut self, now: Instant) {
        for entry in &mut self.entries {
            if let State::Ejected { until, backoff } = entry.state
                && now >= until
            {
                entry.state = State::Probing { backoff };
            }
        }
    }

    /// Uniform in `0..n` (xorshift64; modulo bias is irrelevant for n this small).
    fn random(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(n: u32) -> (Balancer<u32, ()>, Instant) {
        let mut b = Balancer::new(Policy::default(), 42);
        let keys: Vec<u32> = (0..n).collect();
        b.set_endpoints(&keys, |_| ());
        (b, Instant::now())
    }

    fn key_of(b: &Balancer<u32, ()>, id: EndpointId) -> u32 {
        *b.key(id).expect("picked endpoint exists")
    }

    #[test]
    fn equal_endpoints_get_equal_shares() {
        let (mut b, now) = balancer(3);
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            let (id, _) = b.pick(now, &[]).expect("an endpoint");
            counts[key_of(&b, id) as usize] += 1;
            b.finished(id, Some(true), now);
        }
        for c in counts {
            assert!((9_000..=11_000).contains(&c), "{counts:?}");
        }
    }

    /// Calls with others in flight (load) go in runs of `run_calls`; the
    /// next draw then prefers an idle endpoint over the run's busy one.
    #[test]
    fn under_load_calls_go_in_runs() {
        let (mut b, now) = balancer(3);
        let (first, _) = b.pick(now, &[]).expect("an endpoint");
        for i in 1..Policy::default().run_calls {
            let (id, _) = b.pick(now, &[]).expect("an endpoint");
            assert_eq!(id, first, "call {i} of the run");
        }
        let (next, _) = b.pick(now, &[]).expect("an endpoint");
        assert_ne!(
            next, first,
            "a new draw: the run's endpoint has 16 in flight"
        );
    }

    #[test]
    fn a_run_ends_with_its_window_or_an_ejection() {
        let policy = Policy::default();
        let (mut b, now) = balancer(2);
        let (first, _) = b.pick(now, &[]).expect("an endpoint");
        let (id, _) = b.pick(now + policy.run_window, &[]).expect("an endpoint");
        assert_ne!(id, first, "after the window: drawn, and the idle one wins");
        let (mut b, now) = balancer(2);
        let (first, _) = b.pick(now, &[]).expect("an endpoint");
        for _ in 0..policy.failures_to_eject {
            b.failed(first, now);
        }
        let (id, _) = b.pick(now, &[]).expect("an endpoint");
        assert_ne!(id, first, "no call to an endpoint ejected mid-run");
    }

    /// One call at a time (nothing else in flight): every call is drawn, so
    /// a call goes where the one before went a third of the time, not in runs.
    #[test]
    fn calls_one_at_a_time_are_drawn_alone() {
        let (mut b, now) = balancer(3);
        let mut previous = None;
        let mut repeats = 0;
        for _ in 0..3_000 {
            let (id, _) = b.pick(now, &[]).expect("an endpoint");
            b.finished(id, Some(true), now);
            repeats += u32::from(previous == Some(id));
            previous = Some(id);
        }
        assert!(
            (800..1_200).contains(&repeats),
            "{repeats} repeats in 3,000"
        );
    }

    /// With calls always in flight (runs on), shares stay even over time.
    #[test]
    fn runs_keep_shares_equal_under_load() {
        let (mut b, now) = balancer(3);
        let mut counts = [0u32; 3];
        let mut in_flight = std::collections::VecDeque::new();
        for _ in 0..30_000 {
            let (id, _) = b.pick(now, &[]).expect("an endpoint");
            counts[key_of(&b, id) as usize] += 1;
            in_flight.push_back(id);
            if in_flight.len() > 40 {
                let done = in_flight.pop_front().expect("in flight");
                b.finished(done, Some(true), now);
            }
        }
        for c in counts {
            assert!((9_000..=11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let (mut b, now) = balancer(2);
        // Pin 5 calls on whatever comes first, then every pick must go to the other.
        let (busy, _) = b.pick(now, &[]).expect("an endpoint");
        for _ in 0..4 {
            if let Some((id, _)) = b.pick(now, &[busy]) {
                assert_ne!(id, busy);
                b.finished(id, None, now);
            }
        }
        for _ in 0..100 {
            let (id, _) = b.pick(now, &[]).expect("an endpoint");
            assert_ne!(id, busy, "the loaded endpoint must lose every draw");
            b.finished(id, None, now);
        }
    }

    #[test]
    fn ejection_after_n_failures_backoff_doubles_probe_recovers() {
        let (mut b, t0) = balancer(2);
        let dead = 0u32;
        let dead_id = b.entries[0].id;
        for i in 0..3 {
            assert_eq!(b.state(&dead), Some(State::Healthy), "after {i} failures");
            b.failed(dead_id, t0);
        }
        let ms = Duration::from_millis;
        assert_eq!(
            b.state(&dead),
            Some(State::Ejected {
                until: t0 + ms(100),
                backoff: ms(100)
            })
        );
        for _ in 0..50 {
            let (id, _) = b.pick(t0 + ms(50), &[]).expect("an endpoint");
            assert_ne!(id, dead_id, "ejected endpoint picked");
            b.finished(id, None, t0);
        }
        // Back-off over: probing, by ping only.
        let t1 = t0 + ms(100);
        let picks: Vec<EndpointId> = (0..200)
            .filter_map(|_| b.pick(t1, &[]).map(|(id, _)| id))
            .collect();
        assert!(!picks.contains(&dead_id), "a probing endpoint took a call");
        for id in picks {
            b.finished(id, None, t1);
        }
        assert_eq!(b.state(&dead), Some(State::Probing { backoff: ms(100) }));
        // The probe fails: ejected again for twice as long.
        b.failed(dead_id, t1);
        assert_eq!(
            b.state(&dead),
            Some(State::Ejected {
                until: t1 + ms(200),
                backoff: ms(200)
            })
        );
        // Next probe answers: healthy again.
        let t2 = t1 + ms(200);
        b.wake(t2);
        assert_eq!(b.state(&dead), Some(State::Probing { backoff: ms(200) }));
        b.succeeded(dead_id);
        assert_eq!(b.state(&dead), Some(State::Healthy));
        assert_eq!(
            b.take_changes(),
            vec![(dead, Change::Ejected(3)), (dead, Change::Recovered)]
        );
        assert!(b.take_changes().is_empty());
    }

    #[test]
    fn backoff_is_capped() {
        let (mut b, t) = balancer(2);
        let id = b.entries[0].id;
        for _ in 0..3 {
            b.failed(id, t);
        }
        let mut now = t;
        for _ in 0..20 {
            if let Some(State::Ejected { until, .. }) = b.state(&0) {
                now = until;
            }
            b.wake(now);
            b.failed(id, now);
        }
        assert!(matches!(
            b.state(&0),
            Some(State::Ejected { backoff, .. }) if backoff == Duration::from_secs(5)
        ));
    }

    #[test]
    fn never_eject_all() {
        let (mut b, t) = balancer(3);
        let ids: Vec<EndpointId> = b.entries.iter().map(|e| e.id).collect();
        for &id in &ids {
            for _ in 0..3 {
                b.failed(id, t);
            }
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let (id, _) = b.pick(t, &[]).expect("all dead still yields an endpoint");
            seen.insert(id);
            b.finished(id, None, t);
        }
        assert_eq!(seen.len(), 3, "with all ejected, all are tried");
    }

    #[test]
    fn exclude_steers_retries_elsewhere() {
        let (mut b, t) = balancer(3);
        for _ in 0..100 {
            let (first, _) = b.pick(t, &[]).expect("an endpoint");
            let (second, _) = b.pick(t, &[first]).expect("an endpoint");
            assert_ne!(first, second);
            b.finished(first, None, t);
            b.finished(second, None, t);
        }
        // One endpoint only: excluded or not, it is the one.
        let (mut one, t) = balancer(1);
        let (id, _) = one.pick(t, &[]).expect("an endpoint");
        assert_eq!(one.pick(t, &[id]).map(|(i, _)| i), Some(id));
    }

    #[test]
    fn set_endpoints_keeps_state_of_survivors() {
        let (mut b, t) = balancer(3);
        let id1 = b.entries[1].id;
        for _ in 0..3 {
            b.failed(id1, t);
        }
        let mut made = Vec::new();
        b.set_endpoints(&[1, 2, 7], |k| made.push(*k));
        assert_eq!(made, vec![7]);
        assert_eq!(b.len(), 3);
        assert!(matches!(b.state(&1), Some(State::Ejected { .. })));
        assert_eq!(b.state(&0), None);
        assert_eq!(b.state(&7), Some(State::Healthy));
        // A finish for a dropped endpoint is ignored.
        b.finished(12345, Some(false), t);
    }

    #[test]
    fn going_away_stops_new_calls_at_once() {
        let (mut b, t) = balancer(3);
        b.refresh(t, |_| false);
        assert_eq!(b.state(&2), Some(State::Healthy));
        let gone = b.entries[2].id;
        // `refresh` asks about each endpoint's value; here the key decides.
        let mut flagged: Balancer<u32, u32> = Balancer::new(Policy::default(), 7);
        flagged.set_endpoints(&[0, 1, 2], |k| *k);
        flagged.refresh(t, |v| *v == 2);
        assert!(matches!(flagged.state(&2), Some(State::Ejected { .. })));
        b.going_away(gone, t);
        for _ in 0..100 {
            let (id, _) = b.pick(t, &[]).expect("an endpoint");
            assert_ne!(id, gone);
            b.finished(id, None, t);
        }
    }

    #[test]
    fn pings_go_to_idle_healthy_and_probing_endpoints() {
        let (mut b, t) = balancer(3);
        let ids: Vec<EndpointId> = b.entries.iter().map(|e| e.id).collect();
        for _ in 0..3 {
            b.failed(ids[0], t);
        }
        let (busy, _) = b.pick(t, &[ids[0]]).expect("an endpoint");
        let pinged: Vec<EndpointId> = b.pings_due(t).into_iter().map(|(id, _)| id).collect();
        assert_eq!(pinged.len(), 1, "not the ejected one, not the busy one");
        assert!(!pinged.contains(&busy) && !pinged.contains(&ids[0]));
        let later = t + Duration::from_millis(100);
        let pinged: Vec<EndpointId> = b.pings_due(later).into_iter().map(|(id, _)| id).collect();
        assert!(pinged.contains(&ids[0]), "back-off over: probed by a ping");
        b.succeeded(ids[0]);
        assert_eq!(b.state(&0), Some(State::Healthy));
    }
}
