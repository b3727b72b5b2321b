//! The self-sizing pool: grows by steps while callers keep waiting for a
//! connection, up to a ceiling (never past what the server would accept:
//! the role's and the database's `CONNECTION LIMIT` and `max_connections`
//! less its reserved slots, each less the connections already open), and
//! shrinks back to the configured size once connections have stayed idle
//! for the idle timeout.

use std::time::Duration;

use crate::pool::PoolStatus;

/// Connections added per step.
const STEP: usize = 2;
/// Ticks in a row with waiters before a step up.
const WAITING_TICKS: u32 = 2;

/// A change of the pool's maximum size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resize {
    Grow { from: usize, to: usize },
    Shrink { from: usize, to: usize },
}

impl Resize {
    pub(crate) fn direction(self) -> &'static str {
        match self {
            Resize::Grow { .. } => "up",
            Resize::Shrink { .. } => "down",
        }
    }
}

/// Decides resizes from the pool's figures, one tick at a time.
#[derive(Debug)]
pub(crate) struct Sizer {
    base: usize,
    ceiling: usize,
    shrink_after_ticks: u32,
    waiting_ticks: u32,
    idle_ticks: u32,
}

impl Sizer {
    pub(crate) fn new(
        base: usize,
        ceiling: usize,
        idle_timeout: Duration,
        tick: Duration,
    ) -> Sizer {
        let ticks = (idle_timeout.as_secs_f64() / tick.as_secs_f64())
            .ceil()
            .max(1.0);
        Sizer {
            base,
            ceiling,
            shrink_after_ticks: ticks.min(f64::from(u32::MAX)) as u32,
            waiting_ticks: 0,
            idle_ticks: 0,
        }
    }

    /// One observation; `server_free` is how many more connections the
    /// server would accept, when known. The pool may hold what it has open
    /// plus that: a maximum above it would only be refused (53300).
    pub(crate) fn observe(
        &mut self,
        pool: PoolStatus,
        server_free: Option<usize>,
    ) -> Option<Resize> {
        if pool.waiting > 0 {
            self.idle_ticks = 0;
            self.waiting_ticks += 1;
            let room = server_free.map_or(usize::MAX, |free| pool.size.saturating_add(free));
            let ceiling = self.ceiling.min(room);
            if self.waiting_ticks >= WAITING_TICKS && pool.max < ceiling {
                self.waiting_ticks = 0;
                return Some(Resize::Grow {
                    from: pool.max,
                    to: (pool.max + STEP).min(ceiling),
                });
            }
            return None;
        }
        self.waiting_ticks = 0;
        if pool.max > self.base && pool.in_use < self.base {
            self.idle_ticks += 1;
            if self.idle_ticks >= self.shrink_after_ticks {
                self.idle_ticks = 0;
                return Some(Resize::Shrink {
                    from: pool.max,
                    to: self.base,
                });
            }
        } else {
            self.idle_ticks = 0;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(max: usize, in_use: usize, waiting: usize) -> PoolStatus {
        PoolStatus {
            size: in_use,
            idle: 0,
            in_use,
            waiting,
            max,
            opened_total: 0,
        }
    }

    fn sizer() -> Sizer {
        Sizer::new(4, 9, Duration::from_secs(2), Duration::from_millis(500))
    }

    #[test]
    fn grows_by_steps_while_callers_wait_up_to_the_ceiling() {
        let mut s = sizer();
        assert_eq!(
            s.observe(status(4, 4, 3), None),
            None,
            "one tick is not a trend"
        );
        assert_eq!(
            s.observe(status(4, 4, 3), None),
            Some(Resize::Grow { from: 4, to: 6 })
        );
        s.observe(status(6, 6, 3), None);
        assert_eq!(
            s.observe(status(6, 6, 3), None),
            Some(Resize::Grow { from: 6, to: 8 })
        );
        s.observe(status(8, 8, 3), None);
        assert_eq!(
            s.observe(status(8, 8, 3), None),
            Some(Resize::Grow { from: 8, to: 9 })
        );
        s.observe(status(9, 9, 3), None);
        assert_eq!(s.observe(status(9, 9, 3), None), None, "at the ceiling");
    }

    #[test]
    fn never_past_what_the_server_leaves_free() {
        let mut s = sizer();
        s.observe(status(4, 4, 3), Some(1));
        assert_eq!(
            s.observe(status(4, 4, 3), Some(1)),
            Some(Resize::Grow { from: 4, to: 5 })
        );
        s.observe(status(5, 5, 3), Some(0));
        assert_eq!(s.observe(status(5, 5, 3), Some(0)), None);
    }

    #[test]
    fn room_is_counted_from_the_connections_open_not_the_maximum() {
        // A maximum of 5 with 2 open, at a server that takes no more: the
        // limit is 2, already passed; no growth however long callers wait.
        let mut s = sizer();
        for _ in 0..4 {
            assert_eq!(s.observe(status(5, 2, 30), Some(0)), None);
        }
        // Two open under a maximum of 1 (lowered at a refusal while a third
        // was being opened): the pool may use both.
        let mut s = sizer();
        s.observe(status(1, 2, 30), Some(0));
        assert_eq!(
            s.observe(status(1, 2, 30), Some(0)),
            Some(Resize::Grow { from: 1, to: 2 })
        );
    }

    #[test]
    fn shrinks_back_after_the_idle_timeout() {
        let mut s = sizer();
        for _ in 0..3 {
            assert_eq!(s.observe(status(8, 1, 0), None), None);
        }
        assert_eq!(
            s.observe(status(8, 1, 0), None),
            Some(Resize::Shrink { from: 8, to: 4 })
        );
        // Busy above the base: no shrink.
        let mut s = sizer();
        for _ in 0..10 {
            assert_eq!(s.observe(status(8, 6, 0), None), None);
        }
    }
}
