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
//! body read, no parsing and no write; a body sent without a length is charged once read. The cells'
//! bounded queues (full → `503`) stay the last line behind both. Both buckets are off (rate 0) by
//! default.

mod bucket;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::StatusCode;

pub use bucket::TokenBucket;

use crate::http::ApiError;

/// Tenants whose buckets are kept at most; beyond it, full (idle) buckets are forgotten first.
const MAX_TENANTS: usize = 10_000;

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
    tenants: Mutex<HashMap<String, TokenBucket>>,
    global: Mutex<Option<TokenBucket>>,
    in_flight: AtomicU64,
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
            tenants: Mutex::new(HashMap::new()),
            global: Mutex::new(global),
            in_flight: AtomicU64::new(0),
        }
    }

    /// Request bytes admitted and not yet answered.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Charges `bytes` to `tenant` and to the server, or refuses with `429` (the tenant's quota) or
    /// `503` (the server's rate or in-flight budget) and a `Retry-After` from what refused. The bytes
    /// stay in flight until the returned guard is dropped.
    pub fn admit(&self, tenant: &str, bytes: u64) -> Result<Admitted<'_>, ApiError> {
        self.admit_at(tenant, bytes, Instant::now())
    }

    fn admit_at(&self, tenant: &str, bytes: u64, now: Instant) -> Result<Admitted<'_>, ApiError> {
        let o = &self.options;
        let quota = o.quota(tenant);
        let tenant_charged = if quota.bytes_per_sec > 0 {
            if bytes > quota.burst_bytes.max(1) {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "over_quota",
                    format!(
                        "a {bytes}-byte request is larger than tenant {tenant:?}'s burst of {} bytes \
                         (admission.tenant_burst_bytes); send smaller requests",
                        quota.burst_bytes
                    ),
                )
                .retry_after(1));
            }
            let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            if tenants.len() >= MAX_TENANTS && !tenants.contains_key(tenant) {
                forget_idle(&mut tenants, now);
            }
            let bucket = tenants
                .entry(tenant.to_string())
                .or_insert_with(|| TokenBucket::new(quota.bytes_per_sec, quota.burst_bytes, now));
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
            true
        } else {
            false
        };
        // The server refuses, not the tenant: the tenant's quota is not used.
        let give_back_tenant = || {
            if tenant_charged
                && let Some(b) = self
                    .tenants
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(tenant)
            {
                b.give_back(bytes);
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
        let in_flight = self.in_flight.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let admitted = Admitted {
            in_flight: &self.in_flight,
            bytes,
        };
        // A request larger than the whole budget is still served when nothing else is in flight.
        if o.max_in_flight_bytes > 0 && in_flight > o.max_in_flight_bytes && in_flight > bytes {
            drop(admitted);
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
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "the server has {} bytes of requests in flight, its budget \
                     (admission.max_in_flight_bytes); retry shortly",
                    o.max_in_flight_bytes
                ),
            )
            .retry_after(1));
        }
        Ok(admitted)
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

/// Forgets the buckets that are full again (their tenants have been idle), or all if none is.
fn forget_idle(tenants: &mut HashMap<String, TokenBucket>, now: Instant) {
    let before = tenants.len();
    tenants.retain(|_, b| !b.is_full(now));
    if tenants.len() == before {
        tenants.clear();
    }
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
        for bad in ["a", "=5", "a=x", "a=1/0", "a=1,a=2", "a=1/2/3"] {
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
    fn a_request_larger_than_the_burst_is_told_to_shrink() {
        let a = admission();
        let err = a.admit_at("a", 5000, Instant::now()).err();
        assert!(err.is_some_and(|e| e.detail.contains("send smaller requests")));
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
