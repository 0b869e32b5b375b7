//! Opt-in wall-time accounting of the kernels [`super::backend`] routes, per operation and
//! shape: what `cargo xtask bench layers` prints as the training step's per-layer table.
//!
//! Off unless [`enable`] was called: then each routed call costs one relaxed atomic load. On,
//! each call adds its wall time to a table keyed by `(op, shape)`; [`take`] empties it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<(&'static str, String), Entry>> = Mutex::new(BTreeMap::new());

/// One row of the table: calls and their total wall time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    /// Calls.
    pub calls: u64,
    /// Total wall time, nanoseconds.
    pub ns: u64,
}

/// Starts (or stops) the accounting for the whole process.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// `f()`, its wall time added to `(op, shape())` when the accounting is on.
pub(crate) fn time<R>(
    op: &'static str,
    shape: impl FnOnce() -> String,
    f: impl FnOnce() -> R,
) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let r = f();
    let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let e = table.entry((op, shape())).or_default();
    e.calls += 1;
    e.ns += ns;
    r
}

/// The table so far, `(op, shape) -> entry`, emptied.
pub fn take() -> BTreeMap<(&'static str, String), Entry> {
    std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_while_enabled() {
        take();
        time("x", || "a".into(), || ());
        assert!(take().is_empty());
        enable(true);
        time("x", || "a".into(), || ());
        time("x", || "a".into(), || ());
        time("y", || "b".into(), || ());
        enable(false);
        // Other tests' kernels may add rows of their own while it is on.
        let t = take();
        assert_eq!(t[&("x", "a".to_string())].calls, 2);
        assert_eq!(t[&("y", "b".to_string())].calls, 1);
    }
}
