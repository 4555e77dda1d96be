//! The two clocks the scheduler reads, and the signal that the wall clock
//! jumped.
//!
//! Expiries are wall-clock deadlines, while tokio's timers run on the
//! monotonic clock, which on Linux stands still while the machine is
//! suspended: a laptop that sleeps through a token's expiry would otherwise
//! refresh only when its timer fires, up to [`crate::scheduler`]'s longest
//! sleep after waking. On Linux a `timerfd` armed with
//! `TFD_TIMER_CANCEL_ON_SET` is cancelled by the kernel whenever the wall
//! clock is set and on every resume from suspend, so the scheduler hears of
//! both at once.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use crate::sessions::now_ms;

pub type Jumped<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What the scheduler needs of time. Tests use a clock they move by hand.
pub trait Clock: Send + Sync {
    /// Wall-clock time, Unix milliseconds.
    fn wall_ms(&self) -> u64;
    /// Monotonic milliseconds from any fixed origin; stands still in suspend.
    fn mono_ms(&self) -> u64;
    /// Resolves when the wall clock may have jumped; never, where that
    /// cannot be known.
    fn jumped(&self) -> Jumped<'_>;
}

/// The machine's clocks.
pub struct SystemClock {
    origin: Instant,
    #[cfg(target_os = "linux")]
    watch: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
}

impl SystemClock {
    /// Must be called inside the tokio runtime (the jump watch registers
    /// with its reactor). Without a timerfd the clock still works; jumps are
    /// then noticed at the scheduler's next look.
    pub fn new() -> SystemClock {
        SystemClock {
            origin: Instant::now(),
            #[cfg(target_os = "linux")]
            watch: linux::watch()
                .map_err(|err| {
                    tracing::warn!(
                        error = %err,
                        "cannot watch for clock jumps; a resume is noticed within 30 s"
                    )
                })
                .ok(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        now_ms()
    }

    fn mono_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn jumped(&self) -> Jumped<'_> {
        #[cfg(target_os = "linux")]
        if let Some(watch) = &self.watch {
            return Box::pin(linux::cancelled(watch));
        }
        Box::pin(std::future::pending())
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{SystemTime, UNIX_EPOCH};

    use tokio::io::unix::AsyncFd;

    /// About fifty years: the timer is never meant to expire, only to be
    /// cancelled.
    const FAR_AHEAD_SECS: i64 = 50 * 365 * 24 * 3600;

    pub fn watch() -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: timerfd_create has no memory preconditions; the result is
        // checked before it is owned.
        let fd = unsafe {
            libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        arm(&fd)?;
        // SAFETY: the AsyncFd owns the OwnedFd, whose descriptor stays
        // open and the same until the AsyncFd is dropped.
        unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|err| io::Error::other(err.to_string()))
    }

    /// Arms the timer far ahead, to be cancelled by the next clock change.
    fn arm(fd: &OwnedFd) -> io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: now + FAR_AHEAD_SECS,
                tv_nsec: 0,
            },
        };
        // SAFETY: a valid descriptor and a valid itimerspec; the old value
        // is not asked for.
        let result = unsafe {
            libc::timerfd_settime(
                fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Resolves when the kernel cancels the timer: the wall clock was set,
    /// or the machine resumed.
    pub async fn cancelled(watch: &AsyncFd<OwnedFd>) {
        loop {
            let Ok(mut guard) = watch.readable().await else {
                return std::future::pending().await;
            };
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a buffer of 8.
            let read = unsafe {
                libc::read(
                    watch.as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            let err = io::Error::last_os_error();
            guard.clear_ready();
            if read >= 0 {
                // Fifty years passed, or the clock was set that far ahead.
                let _ = arm(watch.get_ref());
                return;
            }
            match err.raw_os_error() {
                Some(libc::ECANCELED) => {
                    let _ = arm(watch.get_ref());
                    return;
                }
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return std::future::pending().await,
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::sync::Notify;

    /// A clock moved by hand; `suspend` moves the wall clock alone and says
    /// so, as the kernel does on resume.
    pub(crate) struct ManualClock {
        wall: AtomicU64,
        mono: AtomicU64,
        jumped: Notify,
    }

    impl ManualClock {
        pub(crate) fn at(wall_ms: u64) -> ManualClock {
            ManualClock {
                wall: AtomicU64::new(wall_ms),
                mono: AtomicU64::new(0),
                jumped: Notify::new(),
            }
        }

        /// The machine sleeps for `ms` and wakes.
        pub(crate) fn suspend(&self, ms: u64) {
            self.wall.fetch_add(ms, Ordering::SeqCst);
            self.jumped.notify_waiters();
        }
    }

    impl Clock for ManualClock {
        fn wall_ms(&self) -> u64 {
            self.wall.load(Ordering::SeqCst)
        }

        fn mono_ms(&self) -> u64 {
            self.mono.load(Ordering::SeqCst)
        }

        fn jumped(&self) -> Jumped<'_> {
            Box::pin(self.jumped.notified())
        }
    }

    #[tokio::test]
    async fn the_system_clock_watch_exists_and_stays_quiet() {
        // Setting the clock needs privileges the tests do not have; the
        // watch must at least exist and stay quiet while nothing happens.
        let clock = SystemClock::new();
        assert!(clock.watch.is_some(), "no timerfd watch");
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(50), clock.jumped()).await;
        assert!(quiet.is_err(), "a jump was reported while none happened");
        assert!(clock.wall_ms() > 1_600_000_000_000);
    }
}
