//! Keeping one request's panic from taking down its connection or process.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::task::Poll;

/// Runs `fut`, turning a panic inside any of its polls into `None`.
/// The panic itself has already been reported by the panic hook.
pub async fn catch_panic<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    // AssertUnwindSafe: after a panic the future is dropped, never polled again.
    std::future::poll_fn(
        move |cx| match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Some(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(None),
        },
    )
    .await
}

/// Runs `f`, turning a panic into `None`.
pub fn catch_panic_sync<R>(f: impl FnOnce() -> R) -> Option<R> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}
