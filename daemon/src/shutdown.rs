//! Stopping: which signal asked for it, and waiting for the work in hand.
//!
//! A refresh already sent must be answered and stored before the process
//! exits: its answer may rotate the refresh token, and throwing it away
//! would leave the store holding a token the provider has spent.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Cancels `shutdown` on SIGTERM or SIGINT; calls `reload` on SIGHUP.
pub async fn watch_signals(shutdown: CancellationToken, reload: impl Fn() + Send + 'static) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot watch signals; stop the agent with SIGKILL only as a last resort");
        return;
    };
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => {
                info!(signal = "SIGHUP", "reloading the configuration");
                reload();
                continue;
            }
        };
        info!(
            signal = name,
            "stopping: no new connections; finishing refreshes in flight"
        );
        shutdown.cancel();
        return;
    }
}

/// Waits for refreshes and open requests to finish, up to `grace`.
pub async fn drain(refreshes: &TaskTracker, connections: &TaskTracker, grace: Duration) {
    refreshes.close();
    connections.close();
    let both = async {
        refreshes.wait().await;
        connections.wait().await;
    };
    if tokio::time::timeout(grace, both).await.is_err() {
        warn!(
            refreshes = refreshes.len(),
            grace_s = grace.as_secs(),
            "shutdown grace ran out with refreshes still in flight; their sessions are marked \
             in flight in the store and are retried at the next start"
        );
    }
}
