//! The gateway's RPC client over many RPC servers: one [`RpcClient`] (its own
//! multiplexed connections) per endpoint, an endpoint chosen per call by
//! [`crate::balance`], health pings, GOAWAY, and retries where they are safe:
//!
//! * a call that was never written (connection down, queue full) goes to
//!   another endpoint, send or pull;
//! * a pull whose connection broke after it was written is retried once
//!   elsewhere (reading twice is harmless), and so is a send that carries an
//!   idempotency key (the store keeps one message per key);
//! * any other send whose outcome is unknown is not retried: it may have
//!   been stored, and storing it twice would duplicate the message (503).
//!
//! One per gateway shard, like the connections it owns; the balancer's lock
//! is only ever taken by that shard's thread, so it is uncontended.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::client::{RpcCall, RpcClient, RpcClientOptions, RpcRequest};
use super::frame::Frame;
use crate::balance::{Balancer, Change, EndpointId, Policy};
use crate::error::Error;
use crate::metrics::{METRICS, Outcome, RpcMethod};

/// How often idle and recovering endpoints are pinged.
const PING_EVERY: Duration = Duration::from_millis(100);
/// A ping not answered within this counts as a failure.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// Endpoints tried for one call, at most.
const MAX_ATTEMPTS: usize = 3;

/// The endpoints one call has tried, in order: kept inline, as every call
/// has one (a `Vec` would be an allocation per call).
#[derive(Clone, Copy, Default)]
struct Tried {
    ids: [EndpointId; MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    fn as_slice(&self) -> &[EndpointId] {
        &self.ids[..self.len]
    }

    fn contains(&self, id: &EndpointId) -> bool {
        self.as_slice().contains(id)
    }

    /// Callers stop at [`MAX_ATTEMPTS`]; one more is not recorded.
    fn push(&mut self, id: EndpointId) {
        if let Some(slot) = self.ids.get_mut(self.len) {
            *slot = id;
            self.len += 1;
        }
    }
}

type Endpoints = Balancer<SocketAddr, Arc<RpcClient>>;

struct Shared {
    balancer: Mutex<Endpoints>,
    options: RpcClientOptions,
    /// Turns true on [`BalancedClient::close`]: discovery and pings stop.
    closed: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Endpoints> {
        // A panic while holding it leaves plain counters behind: still usable.
        self.balancer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Logs what changed; rare (ejections, recoveries), so printing under the
/// shard's own lock costs nothing on the request path.
fn log_changes(balancer: &mut Endpoints) {
    for (addr, change) in balancer.take_changes() {
        match change {
            Change::Ejected(n) => {
                crate::logging::warning!(
                    "rpc endpoint {addr} ejected after {n} consecutive failures"
                )
            }
            Change::Recovered => crate::logging::info!("rpc endpoint {addr} back in use"),
            Change::GoingAway => crate::logging::info!("rpc endpoint {addr} is going away"),
        }
    }
}

#[derive(Clone)]
pub struct BalancedClient {
    shared: Arc<Shared>,
}

/// One endpoint's share of a call; reports the outcome to the balancer when
/// dropped, so a call abandoned by its HTTP connection is still counted out.
struct Ticket {
    shared: Arc<Shared>,
    id: EndpointId,
    /// See [`Balancer::finished`].
    outcome: Option<bool>,
    /// The endpoint's client, whose metrics count this call.
    client: Arc<RpcClient>,
    method: RpcMethod,
    started: Instant,
    /// For the metrics: abandoned unless an outcome is recorded.
    result: Outcome,
}

impl Ticket {
    /// Records how the call ended, for the balancer and the metrics.
    fn ended(&mut self, result: Result<(), &Error>) {
        let (outcome, counted) = match result {
            Ok(()) => (Some(true), Outcome::Ok),
            Err(Error::Overloaded) => (None, Outcome::Error),
            Err(Error::Timeout) => (Some(false), Outcome::Timeout),
            // Unavailable or Lost: the RPC client fails with no other kind.
            Err(_) => (Some(false), Outcome::Error),
        };
        self.outcome = outcome;
        self.result = counted;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let now = Instant::now();
        self.client.stats().ended(self.result);
        if self.result != Outcome::Abandoned {
            METRICS.rpc_call(self.method, now.saturating_duration_since(self.started));
        }
        let mut balancer = self.shared.lock();
        balancer.finished(self.id, self.outcome, now);
        log_changes(&mut balancer);
    }
}

/// A call in flight.
pub struct BalancedCall {
    call: RpcCall,
    ticket: Ticket,
    /// Endpoints already tried.
    tried: Tried,
    /// A copy to send elsewhere, when there is an elsewhere.
    spare: Option<RpcRequest>,
    deadline: Instant,
    lost_retried: bool,
}

/// Whether a request may run twice: a pull reads; a send with an
/// idempotency key stores one message however often it arrives.
fn repeatable(request: Option<&RpcRequest>) -> bool {
    match request {
        // A second delete answers as the first did (the message is gone).
        Some(RpcRequest::Pull(..) | RpcRequest::Delete(_) | RpcRequest::Changes(_)) => true,
        Some(RpcRequest::Send(send)) => !send.idempotency_key.is_empty(),
        // A second edit would give the message a second edited_at.
        Some(RpcRequest::Ping | RpcRequest::PingStore | RpcRequest::Edit(_)) | None => false,
    }
}

fn policy() -> Policy {
    Policy {
        // Capped low so a restarted server is probed (and used) again within
        // a second of coming back, however long it was gone.
        max_backoff: Duration::from_millis(500),
        ..Policy::default()
    }
}

impl BalancedClient {
    /// Follows `endpoints` for the life of the shard, and pings.
    pub fn new(
        mut endpoints: watch::Receiver<Vec<SocketAddr>>,
        options: RpcClientOptions,
    ) -> BalancedClient {
        let seed = crate::now_micros() as u64 ^ (std::process::id() as u64).rotate_left(32);
        let shared = Arc::new(Shared {
            balancer: Mutex::new(Balancer::new(policy(), seed)),
            options,
            closed: watch::Sender::new(false),
        });
        let client = BalancedClient { shared };
        client.set_endpoints(&endpoints.borrow_and_update());
        let follower = client.clone();
        let mut closed = client.shared.closed.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = endpoints.changed() => if changed.is_err() { return },
                    _ = closed.wait_for(|&c| c) => return,
                }
                let list = endpoints.borrow_and_update().clone();
                follower.set_endpoints(&list);
            }
        });
        let pinger = client.clone();
        let mut closed = client.shared.closed.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = pinger.ping_loop() => {}
                _ = closed.wait_for(|&c| c) => {}
            }
        });
        client
    }

    /// Lets go of every RPC server, for good: the gateway has drained and
    /// sends nothing more. Its connections then close as their last handle
    /// goes, instead of being reopened, and logged as refused, while the
    /// RPC servers (this process's own, on shutdown) close theirs.
    pub fn close(&self) {
        self.shared.closed.send_replace(true);
        self.set_endpoints(&[]);
    }

    fn set_endpoints(&self, list: &[SocketAddr]) {
        let options = &self.shared.options;
        self.shared.lock().set_endpoints(list, |addr| {
            Arc::new(RpcClient::new(addr.to_string(), options))
        });
    }

    /// How many RPC servers this client knows (whether or not they answer).
    pub fn known(&self) -> usize {
        self.shared.lock().len()
    }

    /// Starts `request` on the best endpoint, or another if that one refuses.
    pub fn start(&self, request: RpcRequest) -> Result<BalancedCall, Error> {
        // A pull may be held by the server for its `wait_ms` on top.
        let held = match &request {
            RpcRequest::Pull(pull, _) => Duration::from_millis(pull.wait_ms.max(0) as u64),
            _ => Duration::ZERO,
        };
        let now = Instant::now();
        let deadline = now + self.shared.options.timeout + held;
        let spare = (self.shared.lock().len() > 1).then(|| request.clone());
        self.attempt(request, spare, Tried::default(), deadline, now)
    }

    /// Tries endpoints until one takes `request`; `now` is the clock when
    /// the caller read it (read again for each further endpoint).
    fn attempt(
        &self,
        mut request: RpcRequest,
        spare: Option<RpcRequest>,
        mut tried: Tried,
        deadline: Instant,
        mut now: Instant,
    ) -> Result<BalancedCall, Error> {
        let mut last = Error::Unavailable;
        let method = match &request {
            RpcRequest::Send(_) => RpcMethod::Send,
            RpcRequest::Pull(..) => RpcMethod::Pull,
            RpcRequest::Ping | RpcRequest::PingStore => RpcMethod::Ping,
            RpcRequest::Edit(_) => RpcMethod::Edit,
            RpcRequest::Delete(_) => RpcMethod::Delete,
            RpcRequest::Changes(_) => RpcMethod::Changes,
        };
        while tried.len < MAX_ATTEMPTS {
            if tried.len > 0 {
                now = Instant::now();
            }
            let (id, client) = {
                let mut balancer = self.shared.lock();
                balancer.refresh(now, |client| client.going_away());
                log_changes(&mut balancer);
                match balancer.pick(now, tried.as_slice()) {
                    Some((id, client)) => (id, client.clone()),
                    None => return Err(Error::Unavailable),
                }
            };
            if tried.contains(&id) {
                // Every endpoint has been tried.
                self.shared.lock().finished(id, None, Instant::now());
                return Err(last);
            }
            client.stats().started();
            let mut ticket = Ticket {
                shared: self.shared.clone(),
                id,
                outcome: None,
                client,
                method,
                started: now,
                result: Outcome::Abandoned,
            };
            tried.push(id);
            // The first deadline holds across retries: a call still queued
            // when it passes is never written.
            let started = ticket
                .client
                .start_by(request, tokio::time::Instant::from_std(deadline));
            match started {
                Ok(call) => {
                    return Ok(BalancedCall {
                        call,
                        ticket,
                        tried,
                        spare,
                        deadline,
                        lost_retried: false,
                    });
                }
                Err(err) => {
                    ticket.ended(Err(&err));
                    match &spare {
                        Some(copy) => request = copy.clone(),
                        None => return Err(err),
                    }
                    last = err;
                }
            }
        }
        Err(last)
    }

    /// Waits for the reply, retrying elsewhere where that is safe, all
    /// within the one call timeout.
    pub async fn finish(&self, mut call: BalancedCall) -> Result<Frame, Error> {
        loop {
            let deadline = tokio::time::Instant::from_std(call.deadline);
            let result = match tokio::time::timeout_at(deadline, call.call.wait()).await {
                Ok(result) => result,
                Err(_elapsed) => Err(Error::Timeout),
            };
            let retry = match result {
                Ok(frame) => {
                    call.ticket.ended(Ok(()));
                    return Ok(frame);
                }
                Err(err) => {
                    call.ticket.ended(Err(&err));
                    let safe = match err {
                        Error::Unavailable | Error::Overloaded => true,
                        Error::Lost => {
                            repeatable(call.spare.as_ref())
                                && !std::mem::replace(&mut call.lost_retried, true)
                        }
                        // Timeout: maybe carried out. (The client fails with none of the others.)
                        Error::Timeout
                        | Error::IdempotencyKeyReused
                        | Error::StorageFull
                        | Error::MessageNotFound
                        | Error::Forbidden
                        | Error::Invalid(_)
                        | Error::Internal(_) => false,
                    };
                    match (&call.spare, safe) {
                        (Some(copy), true) => copy.clone(),
                        _ => return Err(err),
                    }
                }
            };
            let BalancedCall {
                ticket,
                tried,
                spare,
                deadline,
                lost_retried,
                ..
            } = call;
            drop(ticket);
            call = self.attempt(retry, spare, tried, deadline, Instant::now())?;
            call.lost_retried = lost_retried;
        }
    }

    /// Pings idle and recovering endpoints, forever.
    async fn ping_loop(self) {
        let mut tick = tokio::time::interval(PING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let targets: Vec<(EndpointId, Arc<RpcClient>)> = {
                let mut balancer = self.shared.lock();
                let now = Instant::now();
                balancer.refresh(now, |client| client.going_away());
                log_changes(&mut balancer);
                balancer
                    .pings_due(now)
                    .into_iter()
                    .filter(|(_, client)| !client.going_away())
                    .map(|(id, client)| (id, client.clone()))
                    .collect()
            };
            for (id, client) in targets {
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    let answered = match client.start(RpcRequest::Ping) {
                        Ok(call) => matches!(
                            tokio::time::timeout(PING_TIMEOUT, call.wait()).await,
                            Ok(Ok(_))
                        ),
                        Err(_) => false,
                    };
                    let mut balancer = shared.lock();
                    if answered {
                        balancer.succeeded(id);
                    } else {
                        balancer.failed(id, Instant::now());
                    }
                    log_changes(&mut balancer);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{PullRequest, SendRequest};

    #[test]
    fn only_pulls_and_keyed_sends_run_twice() {
        let keyed = SendRequest {
            idempotency_key: "k1".into(),
            ..SendRequest::default()
        };
        assert!(repeatable(Some(&RpcRequest::Pull(
            PullRequest::default(),
            None
        ))));
        assert!(repeatable(Some(&RpcRequest::Send(keyed))));
        assert!(!repeatable(Some(&RpcRequest::Send(SendRequest::default()))));
        assert!(!repeatable(Some(&RpcRequest::Ping)));
        assert!(!repeatable(None));
    }
}
