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
//!   timer structure that wakes the refresher;
//! - [`refresh`]: one refresh through its steps, keeping the invariants;
//! - [`agent`]: what each request does;
//! - [`server`]: the socket, framing and per-connection handling;
//! - [`shutdown`]: signals and draining;
//! - [`config`]: flags and environment.
//!
//! The binary is a thin `main` over [`start`].

pub mod agent;
pub mod config;
pub mod oauth;
pub mod peer;
pub mod refresh;
pub mod schedule;
pub mod scheduler;
pub mod seal;
pub mod server;
pub mod sessions;
pub mod shutdown;
pub mod store;

use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::agent::Agent;
use crate::config::Config;
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
    scheduler: JoinHandle<()>,
    server: JoinHandle<()>,
    connections: TaskTracker,
}

/// Opens the store, plans every session and starts serving. Fails fast when
/// the store is locked or damaged, or the socket cannot be bound.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let store = Arc::new(Store::open(
        &config.store_dir,
        config.file.store.key_file.as_deref(),
    )?);
    let refresher = Arc::new(Refresher {
        store: store.clone(),
        provider: Provider::new(config.provider_timeout)?,
        scheduler: Arc::new(Scheduler::default()),
        sessions: Arc::new(Sessions::default()),
        timing: RwLock::new(config.timing),
        tasks: TaskTracker::new(),
    });
    let policy = AccessPolicy::new(&config.file.access, &config.file.sessions);
    let agent = Arc::new(Agent::load(&store, refresher.clone(), policy)?);
    let listener = server::bind(&config.socket)?;

    info!(
        socket = %config.socket.display(),
        store = %store.path().display(),
        sessions = agent.sessions.len(),
        key = %store.key_source(),
        scheduled = refresher.scheduler.len(),
        "token-agent ready"
    );

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

    Ok(Running {
        agent,
        shutdown,
        config,
        store,
        scheduler,
        server,
        connections,
    })
}

impl Running {
    /// Waits for `shutdown`, then lets refreshes already sent finish and be
    /// stored, flushes the store and removes the socket.
    pub async fn stopped(self) -> anyhow::Result<()> {
        let _ = self.server.await;
        let _ = self.scheduler.await;
        shutdown::drain(
            &self.agent.refresher.tasks,
            &self.connections,
            self.config.shutdown_grace,
        )
        .await;
        self.store
            .flush()
            .await
            .context("cannot flush the store at shutdown")?;
        let _ = std::fs::remove_file(&self.config.socket);
        info!("token-agent stopped");
        Ok(())
    }
}
