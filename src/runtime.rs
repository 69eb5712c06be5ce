//! The process's tokio runtimes are all current-thread ones: one per shard,
//! one to wait for shutdown signals, one per background thread (discovery,
//! registration, the Redis subscriber). Built here, in one way.

use std::future::Future;

use tokio::runtime::Runtime;

/// A current-thread runtime with I/O and timers.
pub(crate) fn current_thread() -> Result<Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

/// Runs `task` on a thread `im-<what>` with a current-thread runtime of its
/// own: discovery, registration and the Redis subscriber keep their timers
/// and connections off the shards that serve requests.
pub(crate) fn spawn_on_own_runtime(
    what: &'static str,
    task: impl Future<Output = ()> + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(format!("im-{what}"))
        .spawn(move || match current_thread() {
            Ok(runtime) => runtime.block_on(task),
            Err(err) => crate::logging::error!("{what} cannot start"; err = err),
        })
        .map_err(|e| format!("cannot start the {what} thread: {e}"))
}
