//! Command-line flags, environment variables and the configuration file,
//! and the paths, timing and access rules derived from them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;

use crate::schedule::Timing;

/// token-agent keeps OAuth 2.0 / OpenID Connect sessions fresh and hands
/// their access tokens to local programs over a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "token-agent", version)]
pub struct Args {
    /// The Unix socket to serve on. [default: $XDG_RUNTIME_DIR/token-agent/agent.sock,
    /// else /tmp/token-agent-$UID/agent.sock]
    #[arg(long, env = "TOKEN_AGENT_SOCK", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// The folder holding the session store.
    /// [default: $XDG_STATE_HOME/token-agent, else ~/.local/state/token-agent]
    #[arg(long, env = "TOKEN_AGENT_STORE", value_name = "DIR")]
    pub store_dir: Option<PathBuf>,

    /// The configuration file (TOML). [default: $XDG_CONFIG_HOME/token-agent/config.toml,
    /// else ~/.config/token-agent/config.toml; a missing default file is fine]
    #[arg(long, env = "TOKEN_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log filter, e.g. `info` or `token_agent=debug`. RUST_LOG is read
    /// when this is not given.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Refresh once this fraction of a token's lifetime has passed.
    #[arg(long, default_value_t = 0.8, value_name = "FRACTION")]
    pub refresh_at: f64,

    /// Refresh at least this long before expiry, where the lifetime allows.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub min_lead: Duration,

    /// Largest random shift of a scheduled refresh, so that sessions
    /// minted together do not all refresh together.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub max_jitter: Duration,

    /// Shortest gap between two scheduled refreshes of one session, so a
    /// provider announcing tiny lifetimes cannot drive a refresh loop.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub min_refresh_gap: Duration,

    /// Access-token lifetime assumed when the provider gives none and the
    /// token carries none.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub default_lifetime: Duration,

    /// Longest wait between retries after a passing failure.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,

    /// How many refreshes the scheduler runs at once.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_concurrent_refreshes: usize,

    /// Time limit for one request to a provider, answer included.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub provider_timeout: Duration,

    /// How long shutdown waits for refreshes already sent to be answered
    /// and stored.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// Everything the agent needs, resolved from [`Args`] and the file.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub store_dir: PathBuf,
    /// The configuration file's contents; defaults when there is none.
    pub file: FileConfig,
    pub timing: Timing,
    pub max_concurrent_refreshes: usize,
    pub provider_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl Args {
    pub fn resolve(&self) -> anyhow::Result<Config> {
        if !(0.1..=0.95).contains(&self.refresh_at) {
            anyhow::bail!("--refresh-at must be between 0.1 and 0.95");
        }
        if self.max_concurrent_refreshes == 0 {
            anyhow::bail!("--max-concurrent-refreshes must be at least 1");
        }

        let socket = match &self.socket {
            Some(path) => path.clone(),
            None => token_agent_proto::default_socket_path(),
        };
        let store_dir = match &self.store_dir {
            Some(path) => path.clone(),
            None => default_store_dir()?,
        };
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => match default_config_path() {
                Some(path) if path.exists() => FileConfig::load(&path)?,
                _ => FileConfig::default(),
            },
        };
        let timing = Timing {
            refresh_at: self.refresh_at,
            min_lead_ms: millis(self.min_lead),
            max_jitter_ms: millis(self.max_jitter),
            min_gap_ms: millis(self.min_refresh_gap),
            default_lifetime_ms: millis(self.default_lifetime).max(1_000),
            backoff_base_ms: 1_000,
            backoff_max_ms: millis(self.max_backoff).max(1_000),
        };

        Ok(Config {
            socket,
            store_dir,
            file,
            timing,
            max_concurrent_refreshes: self.max_concurrent_refreshes,
            provider_timeout: self.provider_timeout,
            shutdown_grace: self.shutdown_grace,
        })
    }
}

/// The configuration file. Every part is optional.
///
/// ```toml
/// [access]
/// allow_uids = [1001]          # besides the agent's own uid and root
/// allow_gids = [2000]
///
/// [store]
/// key_file = "/etc/token-agent/store.key"
///
/// [sessions.work]              # who may be served this session's token
/// allowed_executables = ["/usr/bin/curl"]
/// allowed_units = ["backup.service"]
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub sessions: BTreeMap<String, SessionRules>,
}

/// Who may connect, besides the agent's own uid and root.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    #[serde(default)]
    pub allow_gids: Vec<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub key_file: Option<PathBuf>,
}

/// Which callers may be served one session's token. A caller matches when
/// its executable is listed or it runs in a listed systemd unit. These
/// narrow mistakes; they are no boundary against a hostile process of the
/// same user, which can impersonate any executable.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRules {
    #[serde(default)]
    pub allowed_executables: Vec<PathBuf>,
    #[serde(default)]
    pub allowed_units: Vec<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("the configuration file {} is invalid", path.display()))
    }
}

fn default_config_path() -> Option<PathBuf> {
    if let Some(config) = env_path("XDG_CONFIG_HOME") {
        return Some(config.join("token-agent/config.toml"));
    }
    env_path("HOME").map(|home| home.join(".config/token-agent/config.toml"))
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u64::MAX as u128) as u64
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

/// `$XDG_STATE_HOME/token-agent`, else `~/.local/state/token-agent`.
pub fn default_store_dir() -> anyhow::Result<PathBuf> {
    if let Some(state) = env_path("XDG_STATE_HOME") {
        return Ok(state.join("token-agent"));
    }
    match env_path("HOME") {
        Some(home) => Ok(home.join(".local/state/token-agent")),
        None => anyhow::bail!(
            "neither XDG_STATE_HOME nor HOME is set: pass --store-dir or set TOKEN_AGENT_STORE"
        ),
    }
}
