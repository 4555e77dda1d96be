//! token-agent: a per-user daemon that keeps OAuth 2.0 / OpenID Connect
//! sessions fresh and hands their access tokens to local programs over a
//! Unix socket.
//!
//! The modules, by job:
//! - [`store`]: the sled store, the only module that touches disk;
//! - [`seal`]: encryption of records at rest, the only module with crypto;
//! - [`oauth`]: the provider client, the only module that speaks HTTP;
//! - [`sessions`]: the in-memory view of every session;
//! - [`peer`]: who is connecting, and what they may take;
//! - [`schedule`] and [`scheduler`]: when each session is due, and the one
//!   timer structure that wakes the refresher; [`clock`]: its clocks and
//!   the signal that the wall clock jumped;
//! - [`refresh`]: one refresh through its steps, keeping the invariants;
//! - [`agent`]: what each request does;
//! - [`server`]: the socket, framing and per-connection handling;
//! - [`shutdown`]: signals and draining;
//! - [`systemd`]: socket activation, readiness, watchdog;
//! - [`metrics`]: counters and Prometheus text;
//! - [`token_file`]: a session's token written to a file on every refresh;
//! - [`config`]: flags and environment.
//!
//! The binary is a thin `main` over [`start`].

pub mod agent;
pub mod clock;
pub mod config;
pub mod metrics;
pub mod oauth;
pub mod packed_token;
pub mod peer;
pub mod refresh;
pub mod schedule;
pub mod scheduler;
pub mod seal;
pub mod server;
pub mod sessions;
pub mod shutdown;
pub mod store;
pub mod systemd;
pub mod token_file;

use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::agent::{Agent, Facts};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::oauth::Provider;
use crate::peer::AccessPolicy;
use crate::refresh::Refresher;
use crate::scheduler::Scheduler;
use crate::sessions::Sessions;
use crate::store::Store;

/// A started agent: the store open, every session scheduled, the socket
/// listening.
pub struct Running {
    pub agent: Arc<Agent>,
    pub shutdown: CancellationToken,
    config: Config,
    store: Arc<Store>,
    /// Whether the socket file is ours to remove at exit; not when systemd
    /// passed it.
    owns_socket: bool,
    scheduler: JoinHandle<()>,
    server: JoinHandle<()>,
    connections: TaskTracker,
}

/// Opens the store, plans every session and starts serving on a socket of
/// its own. Fails fast when the store is locked or damaged, or the socket
/// cannot be bound.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with(config, None).await
}

/// Like [`start`], serving on `activated` when systemd passed a socket.
pub async fn start_with(
    config: Config,
    activated: Option<std::os::unix::net::UnixListener>,
) -> anyhow::Result<Running> {
    let started_at = sessions::now_ms();
    let store = Arc::new(Store::open(
        &config.store_dir,
        config.file.store.key_file.as_deref(),
    )?);
    let refresher = Arc::new(Refresher {
        store: store.clone(),
        provider: Provider::new(config.provider_timeout)?,
        scheduler: Arc::new(Scheduler::default()),
        sessions: Arc::new(Sessions::default()),
        metrics: Arc::new(Metrics::default()),
        timing: RwLock::new(config.timing),
        tasks: TaskTracker::new(),
        token_files: RwLock::new(token_file::from_rules(&config.file.sessions)),
    });
    let policy = AccessPolicy::new(&config.file.access, &config.file.sessions);
    let facts = Facts {
        started_at,
        socket: config.socket.display().to_string(),
        store: store.path().display().to_string(),
        key_source: store.key_source().to_string(),
    };
    let agent = Arc::new(Agent::load(&store, refresher.clone(), policy, facts)?);
    release_freed_memory();

    let owns_socket = activated.is_none();
    let listener = match activated {
        Some(listener) => {
            info!("serving on the socket passed by systemd");
            tokio::net::UnixListener::from_std(listener)?
        }
        None => server::bind(&config.socket)?,
    };

    let shutdown = CancellationToken::new();
    let scheduler = tokio::spawn(refresher.scheduler.clone().run(
        config.max_concurrent_refreshes,
        shutdown.clone(),
        {
            let agent = agent.clone();
            move |name, permit| agent.start_scheduled(name, permit)
        },
    ));
    let connections = TaskTracker::new();
    let server = tokio::spawn(server::serve(
        listener,
        agent.clone(),
        shutdown.clone(),
        connections.clone(),
    ));
    if let Some(addr) = config.file.metrics.listen {
        tokio::spawn(metrics::serve_http(
            addr,
            refresher.metrics.clone(),
            agent.sessions.clone(),
            shutdown.clone(),
        ));
    }
    systemd::spawn_watchdog(shutdown.clone());

    info!(
        socket = %config.socket.display(),
        store = %store.path().display(),
        sessions = agent.sessions.len(),
        key = %store.key_source(),
        scheduled = refresher.scheduler.len(),
        took_ms = sessions::now_ms().saturating_sub(started_at),
        "token-agent ready"
    );
    systemd::notify_ready(&format!("serving {} sessions", agent.sessions.len()));

    Ok(Running {
        agent,
        shutdown,
        config,
        store,
        owns_socket,
        scheduler,
        server,
        connections,
    })
}

/// Hands the memory that loading freed back to the system. Loading reads
/// every sealed record and sled's pages once, some hundreds of megabytes at
/// 100,000 sessions, which glibc's allocator would otherwise keep.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages; it touches no
    // memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Applies a new configuration to a running agent.
pub struct Reloader {
    agent: Arc<Agent>,
    config: Config,
}

impl Reloader {
    /// Applies a new configuration: access rules and timing. The socket,
    /// the store and the limits fixed at start need a restart, and say so.
    pub fn reload(&self, new: Config) {
        systemd::notify_reloading();
        if new.socket != self.config.socket || new.store_dir != self.config.store_dir {
            warn!(
                "the socket and store paths change only with a restart; keeping the current ones"
            );
        }
        self.agent
            .set_policy(AccessPolicy::new(&new.file.access, &new.file.sessions));
        *self
            .agent
            .refresher
            .timing
            .write()
            .unwrap_or_else(|e| e.into_inner()) = new.timing;
        *self
            .agent
            .refresher
            .token_files
            .write()
            .unwrap_or_else(|e| e.into_inner()) = token_file::from_rules(&new.file.sessions);
        self.agent.write_token_files();
        info!("configuration reloaded: access rules, timing and token files apply from now on");
        systemd::notify_reloaded(&format!("serving {} sessions", self.agent.sessions.len()));
    }
}

impl Running {
    pub fn reloader(&self) -> Reloader {
        Reloader {
            agent: self.agent.clone(),
            config: self.config.clone(),
        }
    }

    /// Waits for `shutdown`, then lets refreshes already sent finish and be
    /// stored, flushes and closes the store and removes the socket.
    pub async fn stopped(self) -> anyhow::Result<()> {
        let _ = self.server.await;
        systemd::notify_stopping();
        let _ = self.scheduler.await;
        shutdown::drain(
            &self.agent.refresher.tasks,
            &self.connections,
            self.config.shutdown_grace,
        )
        .await;
        self.store
            .close()
            .await
            .context("cannot flush and close the store at shutdown")?;
        if self.owns_socket {
            let _ = std::fs::remove_file(&self.config.socket);
        }
        info!("token-agent stopped");
        Ok(())
    }
}
