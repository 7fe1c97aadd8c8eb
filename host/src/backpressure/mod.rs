//! Backpressure at the edge: overload is refused before it costs anything, with a status and a
//! `Retry-After` a client can act on, instead of being queued without bound.
//!
//! Admission of an append request, in order (`bucket` holds the token bucket):
//! 1. the tenant's token bucket, in bytes of request body per second (tenant from the `Procd-Tenant`
//!    header, `default` without one; `admission.tenant_overrides` gives some tenants their own quota)
//!    → `429`, so one tenant over its quota cannot take the others' share;
//! 2. the server's global token bucket in bytes per second, then its budget of request bytes in flight
//!    (admitted and not yet answered: being read, parsed or made durable) → `503`: the server as a whole
//!    is at capacity;
//! 3. per partition, the lag watermark ([`lag_watermark`]): while a partition's handlers are more than
//!    `admission.lag_high_events` behind, its events are refused (`429`, per event in a mixed batch)
//!    until the lag is back under `admission.lag_low_events`; other partitions are not affected;
//! 4. per cell, its bounded queue with [`Priority`]: as it fills, `low` requests are shed first (`503`
//!    at half full), then `normal` (at 80 %), `critical` only when it is full; and as its standing delay
//!    (how long requests wait before the writer takes them) passes `cell.queue_delay_target_ms`,
//!    `normal` requests are shed with a chance rising from 0 there to 1 at twice it (`low` from half of
//!    it to it), so accepted requests do not wait long even when the server runs at its capacity.
//!
//! A request is charged its declared `Content-Length` before its body is read, so a refusal costs no
//! body read, no parsing and no write. A body sent without a length (chunked) first
//! [holds](Admission::hold) `ingest.max_body_bytes` of the in-flight budget while it is read (the most
//! it can be, so slow undeclared uploads cannot hold more memory than the budget), then is charged its
//! real size. A request larger than a bucket's burst could never be admitted: it gets `413
//! larger_than_burst`, not a `Retry-After` that would never come true. The cells' bounded queues (full
//! → `503`) stay the last line behind both. Both buckets are off (rate 0) by default.
//!
//! Tenant names are the client's to choose, so their buckets are bounded: at most [`MAX_TENANTS`]
//! (besides the tenants with overrides), with idle (full again) buckets forgotten when more are needed.
//! While all are in use, further tenants share the *overflow bucket*, with the default quota: inventing
//! names buys no more than one tenant's quota and resets no one's bucket.

mod bucket;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::StatusCode;

pub use bucket::TokenBucket;

use crate::http::ApiError;

/// Tenant buckets kept at most (besides those of tenants with overrides): a bucket and its name take
/// about 200 bytes, so 10 000 bound them at about 2 MB. Beyond it, tenants share the overflow bucket.
pub const MAX_TENANTS: usize = 10_000;

/// The longest tenant name (`Procd-Tenant`, `admission.tenant_overrides`), in bytes: names are kept as
/// map keys, and no real tenant needs more.
pub const MAX_TENANT_BYTES: usize = 128;

/// How often, at most, a full map of tenant buckets is swept for idle ones: a sweep walks all of them,
/// and a flood of fresh tenant names must not pay for one per request.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A tenant's quota: body bytes per second (0: unlimited) and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    /// Body bytes per second.
    pub bytes_per_sec: u64,
    /// Burst, in bytes (also the largest request).
    pub burst_bytes: u64,
}

/// Admission settings; a rate of 0 turns that bucket off.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdmissionOptions {
    /// Body bytes per second each tenant may append.
    pub tenant_bytes_per_sec: u64,
    /// A tenant's burst, in bytes (also its largest request).
    pub tenant_burst_bytes: u64,
    /// Tenants with a quota of their own.
    pub tenant_overrides: HashMap<String, Quota>,
    /// Body bytes per second the whole server accepts.
    pub global_bytes_per_sec: u64,
    /// The server's burst, in bytes.
    pub global_burst_bytes: u64,
    /// Request bytes admitted and not yet answered, at most; 0: no budget.
    pub max_in_flight_bytes: u64,
}

impl AdmissionOptions {
    /// The quota of `tenant`.
    fn quota(&self, tenant: &str) -> Quota {
        self.tenant_overrides.get(tenant).copied().unwrap_or(Quota {
            bytes_per_sec: self.tenant_bytes_per_sec,
            burst_bytes: self.tenant_burst_bytes,
        })
    }
}

/// Parses `admission.tenant_overrides`: `TENANT=RATE[/BURST]` separated by commas, in body bytes (per
/// second); a rate of 0 exempts the tenant, and the burst defaults to `default_burst`.
pub fn parse_tenant_overrides(
    text: &str,
    default_burst: u64,
) -> Result<HashMap<String, Quota>, String> {
    let mut out = HashMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (tenant, quota) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not TENANT=RATE[/BURST]"))?;
        let tenant = tenant.trim();
        if tenant.is_empty() {
            return Err(format!("{item:?} names no tenant"));
        }
        if tenant.len() > MAX_TENANT_BYTES {
            return Err(format!(
                "tenant {tenant:?} is longer than {MAX_TENANT_BYTES} bytes, the longest Procd-Tenant"
            ));
        }
        let (rate, burst) = match quota.split_once('/') {
            Some((rate, burst)) => (rate, Some(burst)),
            None => (quota, None),
        };
        let number = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("{item:?}: {v:?} is not a whole number of bytes"))
        };
        let quota = Quota {
            bytes_per_sec: number(rate)?,
            burst_bytes: burst.map(number).transpose()?.unwrap_or(default_burst),
        };
        if quota.bytes_per_sec > 0 && quota.burst_bytes == 0 {
            return Err(format!("{item:?}: the burst must be above 0"));
        }
        if out.insert(tenant.to_string(), quota).is_some() {
            return Err(format!("tenant {tenant:?} is listed twice"));
        }
    }
    Ok(out)
}

/// The admission state of the data plane.
#[derive(Debug)]
pub struct Admission {
    options: AdmissionOptions,
    tenants: Mutex<Tenants>,
    global: Mutex<Option<TokenBucket>>,
    in_flight: AtomicU64,
}

/// The tenants' token buckets.
#[derive(Debug, Default)]
struct Tenants {
    /// One per tenant seen lately: at most [`MAX_TENANTS`], plus the tenants with overrides.
    own: HashMap<String, TokenBucket>,
    /// The overflow bucket, with the default quota: shared by the tenants that arrive while
    /// [`MAX_TENANTS`] buckets are kept and none is idle.
    overflow: Option<TokenBucket>,
    /// When `own` was last swept for idle buckets.
    swept: Option<Instant>,
}

impl Tenants {
    /// The bucket `tenant` (of `quota`) is charged to, made full on first use: its own, or the
    /// overflow bucket while [`MAX_TENANTS`] are kept and none is idle. A tenant with an override
    /// always gets its own (there are only as many as the configuration names).
    fn bucket(
        &mut self,
        tenant: &str,
        quota: Quota,
        overridden: bool,
        now: Instant,
    ) -> &mut TokenBucket {
        let fresh = || TokenBucket::new(quota.bytes_per_sec, quota.burst_bytes, now);
        if !overridden && self.own.len() >= MAX_TENANTS && !self.own.contains_key(tenant) {
            self.forget_idle(now);
            if self.own.len() >= MAX_TENANTS {
                // Only tenants without an override get here: theirs is the default quota.
                return self.overflow.get_or_insert_with(fresh);
            }
        }
        self.own.entry(tenant.to_string()).or_insert_with(fresh)
    }

    /// Gives `bytes` back to the bucket `tenant` was charged to.
    fn give_back(&mut self, tenant: &str, bytes: u64) {
        if let Some(bucket) = self.own.get_mut(tenant).or(self.overflow.as_mut()) {
            bucket.give_back(bytes);
        }
    }

    /// Forgets the buckets that are full again (their tenants have been idle, so a new bucket would be
    /// the same), at most once per [`SWEEP_INTERVAL`]. Never the others: that would reset the quota
    /// of every tenant over it.
    fn forget_idle(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_INTERVAL)
        {
            return;
        }
        self.swept = Some(now);
        self.own.retain(|_, b| !b.is_full(now));
    }
}

/// Bytes of one admitted request, counted in the server's in-flight budget until it is dropped (when
/// the request is answered).
#[derive(Debug)]
#[must_use = "the request's bytes are in flight only while this is held"]
pub struct Admitted<'a> {
    in_flight: &'a AtomicU64,
    bytes: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Admission {
    /// Admission with `options`.
    pub fn new(options: AdmissionOptions) -> Self {
        let global = (options.global_bytes_per_sec > 0).then(|| {
            TokenBucket::new(
                options.global_bytes_per_sec,
                options.global_burst_bytes,
                Instant::now(),
            )
        });
        Self {
            options,
            tenants: Mutex::new(Tenants::default()),
            global: Mutex::new(global),
            in_flight: AtomicU64::new(0),
        }
    }

    /// Request bytes admitted and not yet answered.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Charges `bytes` to `tenant` and to the server, or refuses with `413` (larger than a burst: it
    /// never fits), `429` (the tenant's quota) or `503` (the server's rate or in-flight budget) and a
    /// `Retry-After` from what refused. The bytes stay in flight until the returned guard is dropped.
    pub fn admit(&self, tenant: &str, bytes: u64) -> Result<Admitted<'_>, ApiError> {
        self.admit_at(tenant, bytes, Instant::now())
    }

    /// Holds `bytes` of the server's in-flight budget only (no token bucket is charged), or refuses
    /// with `503` and `Retry-After: 1`; released when the guard is dropped. A request larger than the
    /// whole budget is still held when nothing else is in flight.
    pub fn hold(&self, bytes: u64) -> Result<Admitted<'_>, ApiError> {
        let in_flight = self.in_flight.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let held = Admitted {
            in_flight: &self.in_flight,
            bytes,
        };
        let budget = self.options.max_in_flight_bytes;
        if budget > 0 && in_flight > budget && in_flight > bytes {
            drop(held);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "the server has {budget} bytes of requests in flight, its budget \
                     (admission.max_in_flight_bytes); retry shortly"
                ),
            )
            .retry_after(1));
        }
        Ok(held)
    }

    fn admit_at(&self, tenant: &str, bytes: u64, now: Instant) -> Result<Admitted<'_>, ApiError> {
        let o = &self.options;
        let quota = o.quota(tenant);
        let overridden = o.tenant_overrides.contains_key(tenant);
        self.check_bursts(tenant, quota, overridden, bytes)?;
        let tenant_charged = quota.bytes_per_sec > 0;
        if tenant_charged {
            let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            let bucket = tenants.bucket(tenant, quota, overridden, now);
            bucket.try_take(bytes, now).map_err(|wait| {
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "over_quota",
                    format!(
                        "tenant {tenant:?} is over its quota of {} bytes/s \
                         (admission.tenant_bytes_per_sec); retry in {} ms",
                        quota.bytes_per_sec,
                        wait.as_millis()
                    ),
                )
                .retry_after(secs(wait))
            })?;
        }
        // The server refuses, not the tenant: the tenant's quota is not used.
        let give_back_tenant = || {
            if tenant_charged {
                self.tenants
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .give_back(tenant, bytes);
            }
        };
        let mut global = self.global.lock().unwrap_or_else(|p| p.into_inner());
        let global_charged = match global.as_mut() {
            None => false,
            Some(bucket) => match bucket.try_take(bytes, now) {
                Ok(()) => true,
                Err(wait) => {
                    drop(global);
                    give_back_tenant();
                    return Err(overloaded(o, wait));
                }
            },
        };
        drop(global);
        self.hold(bytes).inspect_err(|_| {
            give_back_tenant();
            if global_charged
                && let Some(b) = self
                    .global
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
            {
                b.give_back(bytes);
            }
        })
    }

    /// Refuses with `413` a request that no wait would admit: larger than its tenant's burst or the
    /// server's (a bucket never holds more than its burst).
    fn check_bursts(
        &self,
        tenant: &str,
        quota: Quota,
        overridden: bool,
        bytes: u64,
    ) -> Result<(), ApiError> {
        let o = &self.options;
        // As `TokenBucket::new`: a burst of 0 holds 1.
        let burst = if quota.bytes_per_sec > 0 && bytes > quota.burst_bytes.max(1) {
            let key = if overridden {
                "its entry in admission.tenant_overrides"
            } else {
                "admission.tenant_burst_bytes"
            };
            format!(
                "tenant {tenant:?}'s burst of {} bytes ({key})",
                quota.burst_bytes
            )
        } else if o.global_bytes_per_sec > 0 && bytes > o.global_burst_bytes.max(1) {
            format!(
                "the server's burst of {} bytes (admission.global_burst_bytes)",
                o.global_burst_bytes
            )
        } else {
            return Ok(());
        };
        Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger_than_burst",
            format!(
                "a {bytes}-byte request is larger than {burst}, so it can never be admitted; \
                 send smaller requests"
            ),
        ))
    }
}

/// The server's rate refused a request.
fn overloaded(o: &AdmissionOptions, wait: Duration) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!(
            "the server is at its ingest capacity of {} bytes/s (admission.global_bytes_per_sec); \
             retry in {} ms",
            o.global_bytes_per_sec,
            wait.as_millis()
        ),
    )
    .retry_after(secs(wait))
}

/// How much a request matters when a cell's queue fills (`Procd-Priority` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Priority {
    /// Shed first, once the queue is half full.
    Low,
    /// Shed once the queue is 80 % full.
    #[default]
    Normal,
    /// Refused only when the queue is full.
    Critical,
}

impl Priority {
    /// Parses the `Procd-Priority` header value.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "low" => Ok(Self::Low),
            "normal" => Ok(Self::Normal),
            "critical" => Ok(Self::Critical),
            other => Err(format!(
                "Procd-Priority {other:?} is not one of critical, normal, low"
            )),
        }
    }

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::Critical => "critical",
        }
    }

    /// The probability with which a request of this priority is shed from a queue whose requests wait
    /// `delay` before the writer takes them: for `normal`, 0 up to the `target`, then rising linearly to
    /// 1 at twice the target; for `low` the same from half the target to the target; `critical` never
    /// by delay (only by a full queue). A zero target turns this off.
    ///
    /// Shedding a growing share between the two thresholds, rather than everything past one, lets the
    /// admitted rate settle at what the writer absorbs instead of swinging between all and nothing
    /// (which also spreads refusals over clients instead of hitting whoever arrives in the off phase).
    pub fn shed_chance(self, delay: Duration, target: Duration) -> f64 {
        let from = match self {
            _ if target.is_zero() => return 0.0,
            Self::Low => target / 2,
            Self::Normal => target,
            Self::Critical => return 0.0,
        };
        if delay <= from {
            return 0.0;
        }
        ((delay - from).as_secs_f64() / from.as_secs_f64()).min(1.0)
    }

    /// Whether a request of this priority is admitted to a queue with that `delay`: a draw against
    /// [`shed_chance`](Self::shed_chance) with `uniform`, a number in `[0, 1)`.
    pub fn admits_delay(self, delay: Duration, target: Duration, uniform: f64) -> bool {
        uniform >= self.shed_chance(delay, target)
    }

    /// Whether a request of this priority may join a queue holding `depth` of `capacity` entries:
    /// `low` is shed first, then `normal`, `critical` only when the queue is full.
    pub fn admits(self, depth: usize, capacity: usize) -> bool {
        let capacity = capacity.max(1);
        let limit = match self {
            Self::Low => capacity / 2,
            Self::Normal => capacity * 4 / 5,
            Self::Critical => capacity,
        };
        depth < limit.max(1)
    }
}

/// Lag watermarks with hysteresis: a partition starts refusing writes when its lag goes above `high`
/// and resumes only once it is back below `low`, so it does not flap around one threshold. Returns
/// whether the partition refuses writes now.
pub fn lag_watermark(refusing: bool, lag: u64, high: u64, low: u64) -> bool {
    if refusing { lag >= low } else { lag > high }
}

/// `Retry-After` is in whole seconds: round up, at least 1.
fn secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission() -> Admission {
        Admission::new(AdmissionOptions {
            tenant_bytes_per_sec: 1000,
            tenant_burst_bytes: 1000,
            global_bytes_per_sec: 1500,
            global_burst_bytes: 1500,
            ..AdmissionOptions::default()
        })
    }

    #[test]
    fn overridden_tenants_have_their_own_quota_and_rate_0_exempts() {
        let a = Admission::new(AdmissionOptions {
            tenant_bytes_per_sec: 100,
            tenant_burst_bytes: 100,
            tenant_overrides: parse_tenant_overrides("big=1000/5000, internal=0", 100)
                .unwrap_or_default(),
            ..AdmissionOptions::default()
        });
        let t0 = Instant::now();
        assert!(a.admit_at("small", 100, t0).is_ok());
        assert!(a.admit_at("small", 1, t0).is_err(), "default quota spent");
        for _ in 0..5 {
            assert!(a.admit_at("big", 1000, t0).is_ok());
        }
        assert!(a.admit_at("big", 1000, t0).is_err(), "its own burst spent");
        let later = t0 + Duration::from_secs(1);
        assert!(
            a.admit_at("big", 1000, later).is_ok(),
            "refills at its own rate"
        );
        for _ in 0..100 {
            assert!(a.admit_at("internal", 1 << 20, t0).is_ok(), "exempt");
        }
    }

    #[test]
    fn tenant_overrides_parse_or_say_what_is_wrong() {
        let parsed = parse_tenant_overrides(" a=10/20 ,b=5,, ", 99);
        assert_eq!(
            parsed.map(|m| {
                let mut v: Vec<_> = m.into_iter().collect();
                v.sort_by(|x, y| x.0.cmp(&y.0));
                v
            }),
            Ok(vec![
                (
                    "a".to_string(),
                    Quota {
                        bytes_per_sec: 10,
                        burst_bytes: 20
                    }
                ),
                (
                    "b".to_string(),
                    Quota {
                        bytes_per_sec: 5,
                        burst_bytes: 99
                    }
                ),
            ])
        );
        let long = format!("{}=5", "x".repeat(MAX_TENANT_BYTES + 1));
        for bad in ["a", "=5", "a=x", "a=1/0", "a=1,a=2", "a=1/2/3", &long] {
            assert!(parse_tenant_overrides(bad, 99).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_in_flight_budget_refuses_with_503_until_requests_are_answered() {
        let a = Admission::new(AdmissionOptions {
            max_in_flight_bytes: 1000,
            ..AdmissionOptions::default()
        });
        let first = a.admit("t", 600);
        assert!(first.is_ok());
        let second = a.admit("t", 600).err();
        assert_eq!(
            second.map(|e| (e.status, e.code)),
            Some((StatusCode::SERVICE_UNAVAILABLE, "overloaded"))
        );
        assert_eq!(a.in_flight_bytes(), 600, "a refusal holds nothing");
        drop(first);
        assert_eq!(a.in_flight_bytes(), 0);
        // Alone, a request larger than the budget still goes through.
        let big = a.admit("t", 5000);
        assert!(big.is_ok());
        assert!(a.admit("t", 1).is_err());
    }

    #[test]
    fn a_tenant_over_its_quota_gets_429_and_others_do_not_notice() {
        let a = admission();
        let t0 = Instant::now();
        assert!(a.admit_at("hot", 1000, t0).is_ok());
        let err = a.admit_at("hot", 500, t0).err();
        assert_eq!(
            err.as_ref().map(|e| e.status),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
        assert_eq!(err.and_then(|e| e.retry_after_secs), Some(1));
        assert!(
            a.admit_at("calm", 400, t0).is_ok(),
            "another tenant is unaffected"
        );
    }

    #[test]
    fn the_server_refuses_with_503_and_the_tenant_keeps_its_quota() {
        let a = admission();
        let t0 = Instant::now();
        assert!(a.admit_at("a", 1000, t0).is_ok());
        let err = a.admit_at("b", 1000, t0).err();
        assert_eq!(err.map(|e| e.status), Some(StatusCode::SERVICE_UNAVAILABLE));
        // b's bucket got its tokens back: once the server has room, b's full burst passes.
        let later = t0 + Duration::from_millis(700);
        assert!(a.admit_at("b", 1000, later).is_ok());
    }

    #[test]
    fn a_request_larger_than_a_burst_gets_413_without_retry_after() {
        let a = admission();
        let t0 = Instant::now();
        let refusal = |tenant: &str, bytes: u64| {
            a.admit_at(tenant, bytes, t0)
                .err()
                .map(|e| (e.status, e.code, e.retry_after_secs, e.detail))
        };
        // Larger than the tenant's burst (1000): no wait would let it in.
        let tenant = refusal("a", 1001);
        assert!(
            matches!(&tenant, Some((StatusCode::PAYLOAD_TOO_LARGE, "larger_than_burst", None, d))
                if d.contains("admission.tenant_burst_bytes")),
            "{tenant:?}"
        );
        // Larger than the server's burst (1500), for a tenant without a quota.
        let b = Admission::new(AdmissionOptions {
            global_bytes_per_sec: 1500,
            global_burst_bytes: 1500,
            ..AdmissionOptions::default()
        });
        let global = b
            .admit_at("a", 1501, t0)
            .err()
            .map(|e| (e.status, e.code, e.retry_after_secs, e.detail));
        assert!(
            matches!(&global, Some((StatusCode::PAYLOAD_TOO_LARGE, "larger_than_burst", None, d))
                if d.contains("admission.global_burst_bytes")),
            "{global:?}"
        );
        // Nothing was charged: a request of exactly the burst still fits.
        assert!(a.admit_at("a", 1000, t0).is_ok());
        assert!(b.admit_at("a", 1500, t0).is_ok());
    }

    #[test]
    fn fresh_tenant_names_share_one_overflow_bucket_and_reset_no_one() {
        let a = Admission::new(AdmissionOptions {
            tenant_bytes_per_sec: 100,
            tenant_burst_bytes: 100,
            ..AdmissionOptions::default()
        });
        let t0 = Instant::now();
        assert!(a.admit_at("hot", 100, t0).is_ok());
        assert!(a.admit_at("hot", 1, t0).is_err(), "over its quota");
        // The map fills with tenants that are not idle (their buckets are not full).
        for i in 1..MAX_TENANTS {
            assert!(a.admit_at(&format!("busy-{i}"), 1, t0).is_ok());
        }
        // Fresh names beyond it share one bucket of the default quota...
        let fresh: Vec<_> = (0..20)
            .map(|i| a.admit_at(&format!("fresh-{i}"), 10, t0).is_ok())
            .collect();
        assert_eq!(fresh, [[true; 10], [false; 10]].concat());
        // ...and none of them reset the tenant over its quota.
        assert!(a.admit_at("hot", 1, t0).is_err(), "still over its quota");
        assert!(a.admit_at("busy-1", 99, t0).is_ok(), "kept its own bucket");
        // Once buckets are idle again they are forgotten, and a new tenant gets its own.
        let later = t0 + Duration::from_secs(2);
        assert!(a.admit_at("newcomer", 100, later).is_ok());
        assert!(a.admit_at("other", 100, later).is_ok(), "not the overflow");
    }

    #[test]
    fn a_hold_counts_only_in_flight_and_is_released_when_dropped() {
        let a = Admission::new(AdmissionOptions {
            tenant_bytes_per_sec: 100,
            tenant_burst_bytes: 100,
            max_in_flight_bytes: 1000,
            ..AdmissionOptions::default()
        });
        let t0 = Instant::now();
        // Alone, a hold larger than the budget is granted; it takes no tenant tokens.
        let held = a.hold(4096);
        assert!(held.is_ok());
        assert_eq!(a.in_flight_bytes(), 4096);
        let refused = a.admit_at("t", 100, t0).err();
        assert_eq!(
            refused.map(|e| (e.status, e.code, e.retry_after_secs)),
            Some((StatusCode::SERVICE_UNAVAILABLE, "overloaded", Some(1)))
        );
        let second = a.hold(1).err();
        assert_eq!(
            second.map(|e| (e.status, e.retry_after_secs)),
            Some((StatusCode::SERVICE_UNAVAILABLE, Some(1)))
        );
        drop(held);
        assert_eq!(a.in_flight_bytes(), 0);
        // The refusal gave the tenant its tokens back: its whole burst passes.
        assert!(a.admit_at("t", 100, t0).is_ok());
    }

    #[test]
    fn watermarks_have_hysteresis() {
        let (high, low) = (100, 20);
        let mut refusing = false;
        let mut flips = Vec::new();
        for lag in [0, 50, 100, 101, 150, 60, 21, 20, 19, 50, 100, 101] {
            let next = lag_watermark(refusing, lag, high, low);
            if next != refusing {
                flips.push((lag, next));
            }
            refusing = next;
        }
        assert_eq!(flips, [(101, true), (19, false), (101, true)]);
    }

    #[test]
    fn low_is_shed_first_then_normal_then_critical() {
        let capacity = 100;
        let shed_at = |p: Priority| (0..=capacity).find(|&d| !p.admits(d, capacity));
        assert_eq!(shed_at(Priority::Low), Some(50));
        assert_eq!(shed_at(Priority::Normal), Some(80));
        assert_eq!(shed_at(Priority::Critical), Some(100));
        for depth in 0..=capacity {
            // Whatever admits a lower priority admits every higher one.
            if Priority::Low.admits(depth, capacity) {
                assert!(Priority::Normal.admits(depth, capacity));
            }
            if Priority::Normal.admits(depth, capacity) {
                assert!(Priority::Critical.admits(depth, capacity));
            }
        }
        assert!(
            Priority::Low.admits(0, 1),
            "a tiny queue still takes one request"
        );
        assert_eq!(Priority::parse(" Critical"), Ok(Priority::Critical));
        assert!(Priority::parse("urgent").is_err());
    }

    #[test]
    fn the_queue_delay_sheds_low_then_normal_and_never_critical() {
        let target = Duration::from_millis(100);
        let ms = Duration::from_millis;
        let chance = |p: Priority, d: u64| p.shed_chance(ms(d), target);
        // `low`: from half the target to the target.
        assert_eq!(chance(Priority::Low, 50), 0.0);
        assert!((chance(Priority::Low, 75) - 0.5).abs() < 1e-9);
        assert_eq!(chance(Priority::Low, 100), 1.0);
        // `normal`: from the target to twice it.
        assert_eq!(chance(Priority::Normal, 100), 0.0);
        assert!((chance(Priority::Normal, 125) - 0.25).abs() < 1e-9);
        assert_eq!(chance(Priority::Normal, 200), 1.0);
        assert_eq!(chance(Priority::Normal, 10_000), 1.0);
        assert_eq!(chance(Priority::Critical, 10_000), 0.0);
        assert_eq!(
            Priority::Low.shed_chance(ms(10_000), Duration::ZERO),
            0.0,
            "off"
        );
        // Between the thresholds, the share shed over many draws is the chance.
        let mut rng = fastrand::Rng::with_seed(3);
        let shed = (0..10_000)
            .filter(|_| !Priority::Normal.admits_delay(ms(150), target, rng.f64()))
            .count();
        assert!(
            (4_700..5_300).contains(&shed),
            "{shed} of 10 000 shed at p = 0.5"
        );
        assert!(Priority::Normal.admits_delay(ms(100), target, 0.0));
        assert!(!Priority::Normal.admits_delay(ms(200), target, 0.999_999));
    }

    #[test]
    fn off_by_default() {
        let a = Admission::new(AdmissionOptions::default());
        for _ in 0..1000 {
            assert!(a.admit("any", 1 << 30).is_ok());
        }
    }
}
