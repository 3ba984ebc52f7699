//! The last few minutes per route, for the admin page: a ring of 10-second buckets, each
//! with its request and error counts and a coarse latency histogram. Prometheus keeps the
//! totals for scrapers; this answers "what is happening now" without a query language.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Width of one bucket.
pub const BUCKET_SECONDS: u64 = 10;
/// Buckets kept: five minutes.
pub const BUCKETS: usize = 30;
/// Latency bucket `i` holds durations up to `250 µs × 2^i`; the last one is unbounded.
const LATENCY_BUCKETS: usize = 20;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// `unix seconds / BUCKET_SECONDS` of the interval it counts; 0 while unused.
    epoch: u64,
    requests: u64,
    client_errors: u64,
    server_errors: u64,
    latency: [u64; LATENCY_BUCKETS],
}

impl Bucket {
    fn percentile_ms(&self, q: f64) -> Option<f64> {
        percentile_ms(&self.latency, q)
    }
}

#[derive(Default)]
struct Ring {
    buckets: [Bucket; BUCKETS],
    total: u64,
}

/// One bucket as `/status` shows it, oldest first.
#[derive(Debug, Serialize)]
pub struct Point {
    /// Start of the interval, unix seconds.
    pub start: u64,
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A route's recent figures: the points, and the last minute summed.
#[derive(Debug, Serialize)]
pub struct RouteRecent {
    pub bucket_seconds: u64,
    pub requests_total: u64,
    pub last_minute: Summary,
    pub points: Vec<Point>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub rate_per_second: f64,
    /// Share of answers with status 500 and up (the proxy's own and the upstream's).
    pub error_rate: f64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Route name -> ring. One short mutex per route per request, under the map's read lock.
#[derive(Default)]
pub struct Recent {
    routes: RwLock<HashMap<String, Mutex<Ring>>>,
}

impl Recent {
    pub fn record(&self, route: &str, status: u16, elapsed: Duration) {
        self.record_at(route, status, elapsed, SystemTime::now());
    }

    fn record_at(&self, route: &str, status: u16, elapsed: Duration, now: SystemTime) {
        let epoch = epoch_of(now);
        let add = |ring: &Mutex<Ring>| {
            let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.total += 1;
            let bucket = &mut ring.buckets[(epoch % BUCKETS as u64) as usize];
            if bucket.epoch != epoch {
                *bucket = Bucket {
                    epoch,
                    ..Bucket::default()
                };
            }
            bucket.requests += 1;
            match status {
                400..=499 => bucket.client_errors += 1,
                500.. => bucket.server_errors += 1,
                _ => {}
            }
            bucket.latency[latency_index(elapsed)] += 1;
        };
        // The common case under the read lock alone; the first request of a route inserts it.
        if let Some(ring) = read(&self.routes).get(route) {
            return add(ring);
        }
        let mut map = self.routes.write().unwrap_or_else(|p| p.into_inner());
        add(map.entry(route.to_owned()).or_default());
    }

    /// The figures of `route` (zeros when it has seen no request yet).
    pub fn snapshot(&self, route: &str) -> RouteRecent {
        self.snapshot_at(route, SystemTime::now())
    }

    fn snapshot_at(&self, route: &str, now: SystemTime) -> RouteRecent {
        let current = epoch_of(now);
        let ring = read(&self.routes).get(route).map(|r| {
            let r = r.lock().unwrap_or_else(|p| p.into_inner());
            (r.buckets, r.total)
        });
        let (buckets, total) = ring.unwrap_or(([Bucket::default(); BUCKETS], 0));
        let mut points = Vec::with_capacity(BUCKETS);
        let mut minute = Bucket::default();
        for age in (0..BUCKETS as u64).rev() {
            let epoch = current.saturating_sub(age);
            let b = buckets[(epoch % BUCKETS as u64) as usize];
            let b = if b.epoch == epoch && epoch != 0 {
                b
            } else {
                Bucket::default()
            };
            // The last minute: the current (partial) bucket and the five before it.
            if age < 60 / BUCKET_SECONDS {
                minute.requests += b.requests;
                minute.client_errors += b.client_errors;
                minute.server_errors += b.server_errors;
                for (m, x) in minute.latency.iter_mut().zip(b.latency) {
                    *m += x;
                }
            }
            points.push(Point {
                start: epoch * BUCKET_SECONDS,
                requests: b.requests,
                client_errors: b.client_errors,
                server_errors: b.server_errors,
                p50_ms: b.percentile_ms(0.5),
                p99_ms: b.percentile_ms(0.99),
            });
        }
        // The current bucket is partly over: rate over the time actually covered.
        let into_bucket = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64() % BUCKET_SECONDS as f64)
            .unwrap_or(0.0);
        let window = (60 - BUCKET_SECONDS) as f64 + into_bucket.max(1.0);
        RouteRecent {
            bucket_seconds: BUCKET_SECONDS,
            requests_total: total,
            last_minute: Summary {
                requests: minute.requests,
                rate_per_second: minute.requests as f64 / window,
                error_rate: if minute.requests == 0 {
                    0.0
                } else {
                    minute.server_errors as f64 / minute.requests as f64
                },
                client_errors: minute.client_errors,
                server_errors: minute.server_errors,
                p50_ms: minute.percentile_ms(0.5),
                p99_ms: minute.percentile_ms(0.99),
            },
            points,
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn epoch_of(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / BUCKET_SECONDS)
        .unwrap_or(0)
}

fn latency_index(elapsed: Duration) -> usize {
    let quarter_ms = elapsed.as_micros().div_ceil(250);
    // 0 for <= 250 µs, 1 for <= 500 µs, ...: the bit length of (quarters - 1).
    let index = u128::BITS - quarter_ms.saturating_sub(1).leading_zeros();
    (index as usize).min(LATENCY_BUCKETS - 1)
}

/// The upper bound of the latency bucket holding the `q` quantile: never below the truth.
fn percentile_ms(latency: &[u64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    let count: u64 = latency.iter().sum();
    if count == 0 {
        return None;
    }
    let rank = ((count as f64 * q).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(0.25 * (1u64 << i) as f64);
        }
    }
    Some(0.25 * (1u64 << (LATENCY_BUCKETS - 1)) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn latency_buckets_double_from_a_quarter_millisecond() {
        let us = Duration::from_micros;
        assert_eq!(latency_index(us(0)), 0);
        assert_eq!(latency_index(us(250)), 0);
        assert_eq!(latency_index(us(251)), 1);
        assert_eq!(latency_index(us(500)), 1);
        assert_eq!(latency_index(us(501)), 2);
        assert_eq!(latency_index(Duration::from_millis(3)), 4);
        assert_eq!(
            latency_index(Duration::from_secs(3600)),
            LATENCY_BUCKETS - 1
        );
    }

    #[test]
    fn buckets_count_recent_requests_and_forget_old_ones() {
        let recent = Recent::default();
        let ms = Duration::from_millis;
        // 1_000_000 is a bucket boundary (divisible by 10).
        for _ in 0..98 {
            recent.record_at("api", 200, ms(1), at(1_000_000));
        }
        recent.record_at("api", 404, ms(1), at(1_000_001));
        recent.record_at("api", 502, ms(40), at(1_000_002));
        recent.record_at("api", 200, ms(1), at(1_000_015));
        let s = recent.snapshot_at("api", at(1_000_019));
        assert_eq!(s.requests_total, 101);
        assert_eq!(s.points.len(), BUCKETS);
        let last = &s.points[BUCKETS - 1];
        let before = &s.points[BUCKETS - 2];
        assert_eq!((last.start, last.requests), (1_000_010, 1));
        assert_eq!(before.requests, 100);
        assert_eq!((before.client_errors, before.server_errors), (1, 1));
        assert_eq!(before.p50_ms, Some(1.0));
        assert_eq!(before.p99_ms, Some(1.0));
        assert_eq!(s.last_minute.requests, 101);
        assert!((s.last_minute.error_rate - 1.0 / 101.0).abs() < 1e-9);
        // 99th of 101 sorted values is still 1 ms; the max (40 ms) is beyond it.
        assert_eq!(s.last_minute.p99_ms, Some(1.0));
        // Rate over 50 s of whole buckets plus 9 s of the current one.
        assert!((s.last_minute.rate_per_second - 101.0 / 59.0).abs() < 1e-9);

        // A minute later the old bucket has left the last minute, five minutes later the ring.
        let s = recent.snapshot_at("api", at(1_000_075));
        assert_eq!(s.last_minute.requests, 0);
        assert_eq!(s.points.iter().map(|p| p.requests).sum::<u64>(), 101);
        let s = recent.snapshot_at("api", at(1_000_400));
        assert_eq!(s.points.iter().map(|p| p.requests).sum::<u64>(), 0);
        assert_eq!(s.requests_total, 101);
        // A bucket reused by a later interval starts from zero.
        recent.record_at("api", 200, ms(1), at(1_000_300));
        let s = recent.snapshot_at("api", at(1_000_300));
        assert_eq!(s.points[BUCKETS - 1].requests, 1);
        assert_eq!(s.last_minute.requests, 1);
    }

    #[test]
    fn an_unknown_route_is_all_zeros() {
        let s = Recent::default().snapshot("nothing");
        assert_eq!(s.requests_total, 0);
        assert!(s
            .points
            .iter()
            .all(|p| p.requests == 0 && p.p50_ms.is_none()));
        assert_eq!(s.last_minute.error_rate, 0.0);
    }
}
