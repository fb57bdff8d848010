//! The time protocol decisions are taken at, and wall-clock times as Unix
//! milliseconds, the form the store and the wire keep them in.
//!
//! A [`Node`](crate::node::Node) reads the time from its [`Clock`]: the
//! system's in a daemon, one that tests set and advance so that leases,
//! backoff, expiry and the purge can be driven without waiting.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where a node reads the time.
pub(crate) trait Clock: Send + Sync + std::fmt::Debug {
    /// The time now.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that stands still until it is set or advanced.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TestClock(std::sync::Mutex<SystemTime>);

#[cfg(test)]
impl TestClock {
    /// A clock standing at `at`.
    pub(crate) fn at(at: SystemTime) -> Self {
        Self(std::sync::Mutex::new(at))
    }

    /// Moves the clock `by` forward.
    pub(crate) fn advance(&self, by: Duration) {
        let mut t = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t += by;
    }
}

#[cfg(test)]
impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Unix milliseconds.
pub fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// From Unix milliseconds.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
