//! A token bucket: `rate` tokens per second refill up to `burst`; taking `n` tokens succeeds only if
//! `n` are there, otherwise it says how long until they will be. Time is passed in (an `Instant`), so
//! tests drive it without sleeping.

use std::time::{Duration, Instant};

/// One token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens held at once (also the largest single take that can ever succeed).
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` tokens per second up to `burst`.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes `n` tokens, or returns how long until `n` will be available (`n` above the burst can
    /// never be: the wait is then for a full bucket, so the caller learns to send less).
    pub fn try_take(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let n = n as f64;
        if n <= self.tokens {
            self.tokens -= n;
            return Ok(());
        }
        let missing = n.min(self.burst) - self.tokens;
        let wait = if self.rate > 0.0 {
            Duration::from_secs_f64((missing / self.rate).max(0.0))
        } else {
            Duration::from_secs(3600)
        };
        Err(wait.max(Duration::from_millis(1)))
    }

    /// Whether the bucket would be full at `now` (its owner has been idle long enough).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Gives back `n` tokens taken for work that was not done after all (never above the burst).
    pub fn give_back(&mut self, n: u64) {
        self.tokens = (self.tokens + n as f64).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_at_most_burst_plus_rate_times_t_over_any_window() {
        let (rate, burst) = (1000u64, 250u64);
        for seed in 0..20u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let t0 = Instant::now();
            let mut bucket = TokenBucket::new(rate, burst, t0);
            // Random arrivals of random sizes over 3 s; record what was admitted and when.
            let mut admitted: Vec<(Duration, u64)> = Vec::new();
            let mut at = Duration::ZERO;
            while at < Duration::from_secs(3) {
                at += Duration::from_micros(rng.u64(0..5000));
                let n = rng.u64(1..100);
                if bucket.try_take(n, t0 + at).is_ok() {
                    admitted.push((at, n));
                }
            }
            // Every window [a, b] between two admissions admits at most burst + rate × (b - a).
            for i in 0..admitted.len() {
                let mut sum = 0u64;
                for &(b, n) in &admitted[i..] {
                    sum += n;
                    let span = (b - admitted[i].0).as_secs_f64();
                    let bound = burst as f64 + rate as f64 * span;
                    assert!(
                        sum as f64 <= bound + 1e-6,
                        "seed {seed}: {sum} tokens in {span} s > {bound}"
                    );
                }
            }
            assert!(!admitted.is_empty());
        }
    }

    #[test]
    fn refills_at_the_rate_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(100, 10, t0);
        assert_eq!(bucket.try_take(10, t0), Ok(()));
        assert_eq!(bucket.try_take(5, t0), Err(Duration::from_millis(50)));
        let later = t0 + Duration::from_millis(50);
        assert_eq!(bucket.try_take(5, later), Ok(()));
        // Idle time does not store more than the burst.
        let much_later = later + Duration::from_secs(60);
        assert_eq!(bucket.try_take(10, much_later), Ok(()));
        assert!(bucket.try_take(1, much_later).is_err());
        // More than the burst waits for a full bucket.
        assert_eq!(
            bucket.try_take(50, much_later),
            Err(Duration::from_millis(100))
        );
        bucket.give_back(4);
        assert_eq!(bucket.try_take(4, much_later), Ok(()));
    }
}
