//! The 401 rule (contract §3), once: when an upstream 401 leads to a replay with a fresh
//! token, and when it only retires the token that was sent.

use std::sync::Arc;

use super::{Admitted, RequestLog};
use crate::metrics::RouteLabels;
use crate::state::Shared;
use crate::token::AccessToken;

/// After the upstream answered `status` to a request sent with `sent`: the token to replay
/// it with, or `None` to pass the answer on. Only a 401 on a route with `retry_on_401` that
/// sent a token qualifies. A body too large to keep (`replayable == false`) is not replayed,
/// but the token is still retired so the next request gets a fresh one. The replay is noted
/// in the access log and counted. Forced refreshes are rate-limited by the holder.
pub(crate) async fn after_answer(
    shared: &Shared,
    admitted: &Admitted<'_>,
    status: u16,
    sent: Option<&Arc<AccessToken>>,
    replayable: bool,
    log: &mut RequestLog,
) -> Option<Arc<AccessToken>> {
    if status != 401 || !admitted.route.config.retry_on_401 {
        return None;
    }
    let ((profile, holder), sent) = (admitted.holder?, sent?);
    if !holder.invalidate(sent) || !replayable {
        return None;
    }
    let fresh = match holder.get(profile).await {
        Ok(fresh) if !Arc::ptr_eq(&fresh, sent) => fresh,
        _ => return None,
    };
    log.replayed = true;
    log.fingerprint = Some(fresh.fingerprint.clone());
    shared
        .metrics
        .replays
        .get_or_create(&RouteLabels {
            route: admitted.route.config.name.clone(),
        })
        .inc();
    Some(fresh)
}
