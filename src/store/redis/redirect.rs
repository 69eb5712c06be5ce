//! What a Redis Cluster's answer means for the command that got it, as
//! redis-rs's `choose_response` decides it (pure): return the reply, load
//! the library and run again, follow a redirection, retry after a pause, or
//! give up without resending.
//!
//! MOVED, ASK, TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN and READONLY
//! prove the command did not run, and so does `Function not found`: each
//! may be resent. A lost connection or a timeout may have run it: never
//! resent (503).

use crate::error::Error;
use crate::metrics::Redirection;
use crate::resp::Reply;
use crate::resp::cluster::{Redirect, classify};

/// What to do after a reply.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// The reply is the command's (an error reply included): return it.
    Return,
    /// The node lacks the function library (flushed, restored): load it and
    /// run the same command once more, in order on one connection.
    ReloadLibrary,
    /// The slot has moved for good: patch the map, ask for a refresh,
    /// resend to its owner.
    Moved { slot: u16, addr: String },
    /// The slot is migrating and the key is at `addr` already: resend there
    /// once, after `ASKING`.
    Ask { addr: String },
    /// The node cannot serve it right now: resend after a pause; `refresh`
    /// names why the map is probably stale, if it is.
    Retry { refresh: Option<&'static str> },
}

impl Next {
    /// The redirection metric this counts as, if it is one.
    pub(super) fn redirection(&self) -> Option<Redirection> {
        match self {
            Next::Moved { .. } => Some(Redirection::Moved),
            Next::Ask { .. } => Some(Redirection::Ask),
            Next::Retry { .. } => Some(Redirection::Retry),
            Next::Return | Next::ReloadLibrary => None,
        }
    }
}

/// What to do after `reply` from the node at `asked`; `reloaded`: the
/// library was loaded again for this command already (once is enough).
pub(super) fn after_reply(reply: &Reply, asked: &str, reloaded: bool) -> Next {
    let Reply::Error(error) = reply else {
        return Next::Return;
    };
    if error.contains("Function not found") && !reloaded {
        return Next::ReloadLibrary;
    }
    match classify(error, asked) {
        None => Next::Return,
        Some(Redirect::Moved { slot, addr }) => Next::Moved { slot, addr },
        Some(Redirect::Ask { addr, .. }) => Next::Ask { addr },
        Some(Redirect::Retry { refresh }) => Next::Retry {
            refresh: refresh.then(|| retry_reason(error)),
        },
    }
}

/// For the log line of the refresh a retryable error asked for.
fn retry_reason(error: &str) -> &'static str {
    match error.split_ascii_whitespace().next() {
        Some("READONLY") => "READONLY",
        Some("MASTERDOWN") => "MASTERDOWN",
        _ => "CLUSTERDOWN",
    }
}

/// A command that got no reply.
#[derive(Debug)]
pub(super) enum Failure {
    /// Not answered by the deadline: maybe run.
    Elapsed,
    /// Refused or lost by the connection.
    Failed(Error),
}

/// How a command that got no reply ends: never resent.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct GiveUp {
    pub(super) error: Error,
    /// Why to ask for a map refresh, if the master may be gone.
    pub(super) refresh: Option<&'static str>,
    /// Whether the master is suspected of being frozen (the map is then
    /// re-read often for a while).
    pub(super) suspect: bool,
}

pub(super) fn after_failure(failure: Failure) -> GiveUp {
    let give_up = |error, refresh, suspect| GiveUp {
        error,
        refresh,
        suspect,
    };
    match failure {
        // Not connected, or the connection broke with the command maybe
        // run: the master may be gone.
        Failure::Failed(Error::Unavailable) => {
            give_up(Error::Unavailable, Some("connection lost"), false)
        }
        // Overloaded, or Timeout: never written.
        Failure::Failed(err) => give_up(err, None, false),
        // Maybe run: never resent. A master that stopped answering may
        // have been replaced (a stale map after timeouts kept clients
        // on a frozen node: fred #59).
        Failure::Elapsed => give_up(Error::Unavailable, Some("timeout"), true),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn error(text: &'static str) -> Reply {
        Reply::Error(text.into())
    }

    #[test]
    fn replies_that_are_the_commands_are_returned() {
        for reply in [
            Reply::Integer(7),
            Reply::SimpleString(Bytes::from_static(b"OK")),
            error("OOM command not allowed"),
            error("CROSSSLOT Keys in request don't hash to the same slot"),
        ] {
            assert_eq!(after_reply(&reply, "h:1", false), Next::Return, "{reply:?}");
        }
    }

    #[test]
    fn a_missing_library_is_loaded_once() {
        let missing = error("ERR Function not found");
        assert_eq!(after_reply(&missing, "h:1", false), Next::ReloadLibrary);
        assert_eq!(after_reply(&missing, "h:1", true), Next::Return);
    }

    #[test]
    fn moved_and_ask_redirect() {
        let moved = after_reply(&error("MOVED 3999 :6381"), "10.0.0.1:6379", false);
        assert_eq!(
            moved,
            Next::Moved {
                slot: 3999,
                addr: "10.0.0.1:6381".into()
            }
        );
        assert_eq!(moved.redirection(), Some(Redirection::Moved));
        let ask = after_reply(&error("ASK 3999 10.0.0.2:6380"), "h:1", true);
        assert_eq!(
            ask,
            Next::Ask {
                addr: "10.0.0.2:6380".into()
            }
        );
        assert_eq!(ask.redirection(), Some(Redirection::Ask));
    }

    #[test]
    fn busy_nodes_are_retried_and_stale_maps_refreshed() {
        for (reply, refresh) in [
            ("TRYAGAIN Multiple keys request during rehashing", None),
            ("LOADING Redis is loading the dataset", None),
            ("CLUSTERDOWN The cluster is down", Some("CLUSTERDOWN")),
            ("MASTERDOWN Link with MASTER is down", Some("MASTERDOWN")),
            (
                "READONLY You can't write against a replica.",
                Some("READONLY"),
            ),
        ] {
            let next = after_reply(&error(reply), "h:1", false);
            assert_eq!(next, Next::Retry { refresh }, "{reply}");
            assert_eq!(next.redirection(), Some(Redirection::Retry));
        }
    }

    #[test]
    fn failures_are_never_resent() {
        assert_eq!(
            after_failure(Failure::Failed(Error::Unavailable)),
            GiveUp {
                error: Error::Unavailable,
                refresh: Some("connection lost"),
                suspect: false
            }
        );
        for never_written in [Error::Overloaded, Error::Timeout] {
            assert_eq!(
                after_failure(Failure::Failed(never_written.clone())),
                GiveUp {
                    error: never_written,
                    refresh: None,
                    suspect: false
                }
            );
        }
        assert_eq!(
            after_failure(Failure::Elapsed),
            GiveUp {
                error: Error::Unavailable,
                refresh: Some("timeout"),
                suspect: true
            }
        );
    }
}
