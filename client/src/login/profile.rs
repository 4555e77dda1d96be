//! Sign-in profiles: `[profiles.NAME]` in the agent's configuration file
//! (`$XDG_CONFIG_HOME/token-agent/config.toml`). Only `tokenctl login`
//! reads them; the agent accepts the table and ignores it. Secrets never
//! live here: `client_secret_file` names a file.
//!
//! ```toml
//! [profiles.work]
//! issuer = "https://sso.example.com/realms/acme"
//! client_id = "cli-tool"
//! client_secret_file = "~/.config/token-agent/work.secret"
//! client_auth = "post"                  # basic | post | none
//! scopes = ["openid", "email"]
//! flow = "device"                       # device | browser | client-credentials
//! offline = true                        # ask for offline_access when listed
//! auth_params = { access_type = "offline", prompt = "consent" }   # Google
//! idle_timeout = "8h"
//! lifetime = "7d"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One profile; every field may be overridden by a flag.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub client_auth: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub flow: Option<String>,
    pub offline: Option<bool>,
    /// Read the discovery document (default true); false for providers
    /// without one, such as GitHub, with the endpoints below.
    pub discovery: Option<bool>,
    pub token_endpoint: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub device_authorization_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub userinfo_endpoint: Option<String>,
    /// Extra parameters on the authorization request.
    #[serde(default)]
    pub auth_params: BTreeMap<String, String>,
    pub idle_timeout: Option<String>,
    pub lifetime: Option<String>,
}

/// Only the part of the file `tokenctl` reads; the rest is the agent's.
#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

/// `--config`, else `$TOKEN_AGENT_CONFIG`, else the XDG default.
pub fn config_path(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = flag {
        return Some(path.to_path_buf());
    }
    let from_env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(path) = from_env("TOKEN_AGENT_CONFIG") {
        return Some(PathBuf::from(path));
    }
    if let Some(dir) = from_env("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("token-agent/config.toml"));
    }
    from_env("HOME").map(|home| PathBuf::from(home).join(".config/token-agent/config.toml"))
}

/// Reads profile `name` from the file at `path`.
pub fn load(path: &Path, name: &str) -> Result<Profile, String> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        format!(
            "cannot read the configuration file {}: {err}",
            path.display()
        )
    })?;
    let mut file: ConfigFile = toml::from_str(&text)
        // The message only: the full error quotes the offending line, which
        // could be a secret someone pasted in by mistake.
        .map_err(|err| {
            format!(
                "the configuration file {} is invalid: {}",
                path.display(),
                err.message()
            )
        })?;
    let mut profile = file
        .profiles
        .remove(name)
        .ok_or_else(|| format!("no profile [profiles.{name}] in {}", path.display()))?;
    profile.client_secret_file = profile.client_secret_file.map(|p| expand_home(&p));
    Ok(profile)
}

fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_reads_beside_the_agents_own_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            r#"
[timing]
refresh_at = 0.8

[profiles.work]
issuer = "https://sso.example.com/realms/acme"
client_id = "cli"
scopes = ["openid", "email"]
flow = "device"
auth_params = { access_type = "offline", prompt = "consent" }
"#,
        )
        .unwrap();
        let profile = load(&path, "work").unwrap();
        assert_eq!(profile.client_id.as_deref(), Some("cli"));
        assert_eq!(profile.scopes, ["openid", "email"]);
        assert_eq!(profile.auth_params["prompt"], "consent");
        assert!(load(&path, "home").unwrap_err().contains("no profile"));
    }

    #[test]
    fn a_secret_in_a_profile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[profiles.p]\nclient_secret = \"s3cret\"\n").unwrap();
        let err = load(&path, "p").unwrap_err();
        assert!(err.contains("client_secret"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
}
