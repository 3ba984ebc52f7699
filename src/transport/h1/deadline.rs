//! A timeout that is cheap to move forward, for the fast path's per-request deadlines.

use std::pin::Pin;

/// A timeout that is cheap to move forward: one timer per connection and purpose, re-armed
/// only when it fires before the current deadline. A fresh tokio timer per request costs a
/// timer-wheel insertion and removal (under the driver's lock) on every request.
#[derive(Default)]
pub(super) struct Deadline {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Deadline {
    /// Runs `work` to completion, or gives up (`None`) once `at` has passed.
    pub(super) async fn until<F: std::future::Future>(
        &mut self,
        at: tokio::time::Instant,
        work: F,
    ) -> Option<F::Output> {
        let sleep = match &mut self.sleep {
            // Firing late is never right; firing early is fixed up below.
            Some(sleep) if sleep.deadline() <= at => sleep,
            Some(sleep) => {
                sleep.as_mut().reset(at);
                sleep
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return Some(out),
                _ = sleep.as_mut() => {
                    if tokio::time::Instant::now() >= at {
                        return None;
                    }
                    sleep.as_mut().reset(at);
                }
            }
        }
    }
}
