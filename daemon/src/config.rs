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

    /// How log lines look: `auto` (plain without timestamps when stderr is
    /// the journal, with timestamps otherwise), `plain`, or `json`.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Fork to the background once the socket listens, and print shell
    /// commands that set TOKEN_AGENT_SOCK and TOKEN_AGENT_PID (sh syntax).
    #[arg(long, short = 's', visible_alias = "sh")]
    pub daemon: bool,

    /// Like --daemon, printing csh syntax.
    #[arg(short = 'c', conflicts_with_all = ["daemon", "fish"])]
    pub csh: bool,

    /// Like --daemon, printing fish syntax.
    #[arg(long, conflicts_with_all = ["daemon", "csh"])]
    pub fish: bool,

    /// Stop the agent named by TOKEN_AGENT_PID, and print commands that
    /// unset the variables.
    #[arg(short = 'k', conflicts_with_all = ["daemon", "csh", "fish"])]
    pub kill: bool,

    /// Where a backgrounded agent writes its log. [default: discarded]
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Refresh once this fraction of a token's lifetime has passed. [default: 0.8]
    #[arg(long, value_name = "FRACTION")]
    pub refresh_at: Option<f64>,

    /// Refresh at least this long before expiry, where the lifetime allows. [default: 60s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_lead: Option<Duration>,

    /// Largest random shift of a scheduled refresh, so that sessions
    /// minted together do not all refresh together. [default: 10s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_jitter: Option<Duration>,

    /// Shortest gap between two scheduled refreshes of one session, so a
    /// provider announcing tiny lifetimes cannot drive a refresh loop. [default: 30s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_refresh_gap: Option<Duration>,

    /// Access-token lifetime assumed when the provider gives none and the
    /// token carries none. [default: 5m]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub default_lifetime: Option<Duration>,

    /// Longest wait between retries after a passing failure. [default: 60s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_backoff: Option<Duration>,

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Auto,
    Plain,
    Json,
}

/// The shell syntax for `--daemon` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shell {
    Sh,
    Csh,
    Fish,
}

impl Args {
    /// The shell to print for, when the agent is to background itself.
    pub fn background_shell(&self) -> Option<Shell> {
        if self.csh {
            Some(Shell::Csh)
        } else if self.fish {
            Some(Shell::Fish)
        } else if self.daemon {
            Some(Shell::Sh)
        } else {
            None
        }
    }
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
        let file = self.load_file()?;
        let timing = self.timing(&file.timing)?;

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

    /// The configuration file, read anew: at start and on SIGHUP.
    pub fn load_file(&self) -> anyhow::Result<FileConfig> {
        match &self.config {
            Some(path) => FileConfig::load(path),
            None => match default_config_path() {
                Some(path) if path.exists() => FileConfig::load(&path),
                _ => Ok(FileConfig::default()),
            },
        }
    }

    /// Timing from the flags, else the file, else the defaults.
    pub fn timing(&self, file: &TimingConfig) -> anyhow::Result<Timing> {
        let defaults = Timing::default();
        let pick = |flag: Option<Duration>, from_file: Option<Duration>, default_ms: u64| {
            flag.or(from_file).map_or(default_ms, millis)
        };
        let refresh_at = self
            .refresh_at
            .or(file.refresh_at)
            .unwrap_or(defaults.refresh_at);
        if !(0.1..=0.95).contains(&refresh_at) {
            anyhow::bail!("refresh_at must be between 0.1 and 0.95, not {refresh_at}");
        }

        Ok(Timing {
            refresh_at,
            min_lead_ms: pick(self.min_lead, file.min_lead, defaults.min_lead_ms),
            max_jitter_ms: pick(self.max_jitter, file.max_jitter, defaults.max_jitter_ms),
            min_gap_ms: pick(
                self.min_refresh_gap,
                file.min_refresh_gap,
                defaults.min_gap_ms,
            ),
            default_lifetime_ms: pick(
                self.default_lifetime,
                file.default_lifetime,
                defaults.default_lifetime_ms,
            )
            .max(1_000),
            backoff_base_ms: defaults.backoff_base_ms,
            backoff_max_ms: pick(self.max_backoff, file.max_backoff, defaults.backoff_max_ms)
                .max(1_000),
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
/// token_file = "/run/user/1000/bt_u1000"  # the token, rewritten on refresh
/// token_file_mode = "0640"     # default 0600
///
/// [timing]                     # flags override these
/// refresh_at = 0.8
/// min_lead = "60s"
///
/// [metrics]
/// listen = "127.0.0.1:9464"    # Prometheus text at /metrics; off when absent
///
/// [profiles.work]              # read by `tokenctl login`, not by the agent
/// issuer = "https://sso.example.com/realms/acme"
/// client_id = "cli-tool"
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
    #[serde(default)]
    pub timing: TimingConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[profiles.NAME]`: sign-in settings that `tokenctl login` reads
    /// (issuer, client id, secret file, scopes, flow). The agent never uses
    /// them; it accepts the table so one file serves both.
    #[serde(default)]
    pub profiles: BTreeMap<String, toml::Value>,
}

/// Timing settings in the file; each falls back to the built-in default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingConfig {
    pub refresh_at: Option<f64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub min_lead: Option<Duration>,
    #[serde(default, deserialize_with = "duration_text")]
    pub max_jitter: Option<Duration>,
    #[serde(default, deserialize_with = "duration_text")]
    pub min_refresh_gap: Option<Duration>,
    #[serde(default, deserialize_with = "duration_text")]
    pub default_lifetime: Option<Duration>,
    #[serde(default, deserialize_with = "duration_text")]
    pub max_backoff: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A loopback address to serve `/metrics` on.
    pub listen: Option<std::net::SocketAddr>,
}

/// "90s", "5m", "1h 30m".
fn duration_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|err| serde::de::Error::custom(format!("{text:?} is not a duration: {err}")))
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
    /// A file the session's current access token is written to after
    /// every refresh (atomically: a temporary file renamed over it).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The token file's mode, in octal ("0640"); 0600 when absent.
    #[serde(default, deserialize_with = "octal_mode")]
    pub token_file_mode: Option<u32>,
}

/// "0640" or "640": permission bits, nothing above 0o777.
fn octal_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let text = String::deserialize(d)?;
    match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
        Ok(mode) if mode <= 0o777 => Ok(Some(mode)),
        _ => Err(serde::de::Error::custom(format!(
            "{text:?} is not a file mode such as \"0600\""
        ))),
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
        let file: FileConfig = toml::from_str(&text)
            .with_context(|| format!("the configuration file {} is invalid", path.display()))?;
        if let Some(addr) = file.metrics.listen {
            if !addr.ip().is_loopback() {
                anyhow::bail!(
                    "{}: metrics listen on {addr}, which is not a loopback address",
                    path.display()
                );
            }
        }
        Ok(file)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["token-agent"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv)
    }

    #[test]
    fn flags_beat_the_file_which_beats_the_defaults() {
        let file: FileConfig =
            toml::from_str("[timing]\nmin_lead = \"2m\"\nmax_backoff = \"5m\"\n").unwrap();
        let timing = args(&["--max-backoff", "10s"])
            .timing(&file.timing)
            .unwrap();
        assert_eq!(timing.min_lead_ms, 120_000);
        assert_eq!(timing.backoff_max_ms, 10_000);
        assert_eq!(timing.max_jitter_ms, Timing::default().max_jitter_ms);
    }

    #[test]
    fn a_broken_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[timing]\nmin_lead = \"soon\"\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err();
        assert!(format!("{err:#}").contains("config.toml"));

        std::fs::write(&path, "[metrics]\nlisten = \"0.0.0.0:9464\"\n").unwrap();
        assert!(FileConfig::load(&path).is_err());
        std::fs::write(&path, "[surprise]\n").unwrap();
        assert!(FileConfig::load(&path).is_err());
    }

    #[test]
    fn sign_in_profiles_in_the_file_are_accepted_and_left_to_tokenctl() {
        let file: FileConfig = toml::from_str(
            "[profiles.work]\nissuer = \"https://id.example\"\nclient_id = \"cli\"\n\
             scopes = [\"openid\"]\nflow = \"device\"\n",
        )
        .unwrap();
        assert!(file.profiles.contains_key("work"));
    }

    #[test]
    fn a_session_may_name_a_token_file_and_its_mode() {
        let file: FileConfig = toml::from_str(
            "[sessions.work]\ntoken_file = \"/run/bt\"\ntoken_file_mode = \"0640\"\n",
        )
        .unwrap();
        let rules = &file.sessions["work"];
        assert_eq!(rules.token_file.as_deref(), Some(Path::new("/run/bt")));
        assert_eq!(rules.token_file_mode, Some(0o640));
        assert!(toml::from_str::<FileConfig>("[sessions.w]\ntoken_file_mode = \"rw\"\n").is_err());
        assert!(
            toml::from_str::<FileConfig>("[sessions.w]\ntoken_file_mode = \"1777\"\n").is_err()
        );
    }
}
