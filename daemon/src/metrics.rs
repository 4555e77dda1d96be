//! Counters and a latency histogram, rendered as Prometheus text for the
//! `metrics` request and, when configured, for `GET /metrics` on a loopback
//! address. Lock-free atomics: counting costs the serving path nothing
//! measurable.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use token_agent_proto::SessionState;

use crate::sessions::Sessions;

/// Upper bounds of the refresh-latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 9] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// How a refresh ended, for the counter's label.
#[derive(Debug, Clone, Copy)]
pub enum RefreshOutcome {
    Success,
    Transient,
    NeedsSignIn,
    ClientRejected,
    StoreFailed,
}

const OUTCOMES: [(RefreshOutcome, &str); 5] = [
    (RefreshOutcome::Success, "success"),
    (RefreshOutcome::Transient, "transient"),
    (RefreshOutcome::NeedsSignIn, "needs_sign_in"),
    (RefreshOutcome::ClientRejected, "client_rejected"),
    (RefreshOutcome::StoreFailed, "store_failed"),
];

#[derive(Default)]
pub struct Metrics {
    refreshes: [AtomicU64; 5],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    gets_served: AtomicU64,
    gets_failed: AtomicU64,
}

impl Metrics {
    pub fn refreshed(&self, outcome: RefreshOutcome, took: Duration) {
        self.refreshes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        let seconds = took.as_secs_f64();
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn got(&self, served: bool) {
        let counter = if served {
            &self.gets_served
        } else {
            &self.gets_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, sessions: &Sessions) -> String {
        let mut out = String::new();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);

        out.push_str("# HELP token_agent_refreshes_total Refresh attempts by outcome.\n");
        out.push_str("# TYPE token_agent_refreshes_total counter\n");
        for (outcome, label) in OUTCOMES {
            let value = load(&self.refreshes[outcome as usize]);
            let _ = writeln!(
                out,
                "token_agent_refreshes_total{{outcome=\"{label}\"}} {value}"
            );
        }

        out.push_str("# HELP token_agent_refresh_duration_seconds Time from request to answer.\n");
        out.push_str("# TYPE token_agent_refresh_duration_seconds histogram\n");
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(
                out,
                "token_agent_refresh_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                load(bucket)
            );
        }
        let count = load(&self.latency_count);
        let _ = writeln!(
            out,
            "token_agent_refresh_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = load(&self.latency_sum_micros) as f64 / 1e6;
        let _ = writeln!(out, "token_agent_refresh_duration_seconds_sum {sum}");
        let _ = writeln!(out, "token_agent_refresh_duration_seconds_count {count}");

        out.push_str("# HELP token_agent_gets_total Token requests by result.\n");
        out.push_str("# TYPE token_agent_gets_total counter\n");
        let _ = writeln!(
            out,
            "token_agent_gets_total{{result=\"served\"}} {}",
            load(&self.gets_served)
        );
        let _ = writeln!(
            out,
            "token_agent_gets_total{{result=\"error\"}} {}",
            load(&self.gets_failed)
        );

        out.push_str("# HELP token_agent_sessions Sessions by state.\n");
        out.push_str("# TYPE token_agent_sessions gauge\n");
        for (state, count) in sessions_by_state(sessions) {
            let _ = writeln!(out, "token_agent_sessions{{state=\"{state}\"}} {count}");
        }
        out
    }
}

/// How many sessions are in each state, every state listed.
pub fn sessions_by_state(sessions: &Sessions) -> Vec<(&'static str, u64)> {
    let mut counts = [0u64; 5];
    for session in sessions.all() {
        counts[state_index(session.record().state.state)] += 1;
    }
    STATE_NAMES.iter().copied().zip(counts).collect()
}

const STATE_NAMES: [&str; 5] = [
    "fresh",
    "refreshing",
    "retrying",
    "needs_sign_in",
    "client_misconfigured",
];

fn state_index(state: SessionState) -> usize {
    match state {
        SessionState::Fresh => 0,
        SessionState::Refreshing => 1,
        SessionState::Retrying => 2,
        SessionState::NeedsSignIn => 3,
        SessionState::ClientMisconfigured => 4,
    }
}

/// Serves `GET /metrics` on `addr` (a loopback address, checked when the
/// configuration is read) until `shutdown`.
pub async fn serve_http(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    sessions: Arc<Sessions>,
    shutdown: CancellationToken,
) {
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(err) => {
            warn!(%addr, error = %err, "cannot serve metrics; continuing without them");
            return;
        }
    };
    info!(%addr, "serving metrics at /metrics");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            // One small request per connection; anything that is not a GET
            // of /metrics gets a 404.
            let mut head = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head)).await;
            let Ok(Ok(len)) = read else { return };
            let is_metrics = head[..len].starts_with(b"GET /metrics ");
            let (status, body) = if is_metrics {
                ("200 OK", metrics.render(&sessions))
            } else {
                (
                    "404 Not Found",
                    "only /metrics is served here\n".to_string(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_outcomes_and_buckets() {
        let metrics = Metrics::default();
        metrics.refreshed(RefreshOutcome::Success, Duration::from_millis(80));
        metrics.refreshed(RefreshOutcome::Transient, Duration::from_secs(3));
        metrics.got(true);
        let text = metrics.render(&Sessions::default());
        assert!(text.contains("token_agent_refreshes_total{outcome=\"success\"} 1"));
        assert!(text.contains("token_agent_refreshes_total{outcome=\"transient\"} 1"));
        assert!(text.contains("token_agent_refresh_duration_seconds_bucket{le=\"0.1\"} 1"));
        assert!(text.contains("token_agent_refresh_duration_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("token_agent_refresh_duration_seconds_count 2"));
        assert!(text.contains("token_agent_gets_total{result=\"served\"} 1"));
        assert!(text.contains("token_agent_sessions{state=\"fresh\"} 0"));
    }
}
