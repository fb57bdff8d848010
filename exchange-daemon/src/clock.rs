//! Wall-clock times as Unix milliseconds, the form the store and the wire
//! keep them in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix milliseconds.
pub fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// From Unix milliseconds.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
