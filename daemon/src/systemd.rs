//! Working with systemd when it is there: a socket passed by socket
//! activation, readiness and stopping notices, and the watchdog. Every
//! function is a no-op without systemd.

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use anyhow::Context;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The listening socket systemd passed (`LISTEN_FDS`/`LISTEN_PID`), if any.
/// Call before any thread starts: it clears those variables from the
/// environment so that child processes do not take the socket as theirs.
pub fn activated_listener() -> anyhow::Result<Option<UnixListener>> {
    let mut fds = sd_notify::listen_fds().context("cannot read the sockets passed by systemd")?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    if fds.next().is_some() {
        anyhow::bail!("systemd passed more than one socket; the unit should listen on one");
    }
    // SAFETY: systemd hands this descriptor to this process alone (LISTEN_PID
    // matched), and nothing else in the process has taken it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    listener
        .set_nonblocking(true)
        .context("cannot use the socket passed by systemd")?;
    Ok(Some(listener))
}

/// Tells systemd the agent is ready: store open, sessions scheduled,
/// socket listening.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

pub fn notify_reloading() {
    notify(&[NotifyState::Reloading]);
}

pub fn notify_reloaded(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

fn notify(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(false, states) {
        warn!(error = %err, "cannot notify systemd");
    }
}

/// Pets systemd's watchdog at half its interval while the agent runs, when
/// the unit sets `WatchdogSec`.
pub fn spawn_watchdog(shutdown: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let interval = Duration::from_micros(usec / 2);
    debug!(
        interval_ms = interval.as_millis() as u64,
        "watchdog enabled"
    );
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = ticks.tick() => notify(&[NotifyState::Watchdog]),
                () = shutdown.cancelled() => return,
            }
        }
    });
}
