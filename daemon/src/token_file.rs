//! Token files: a session's current access token written to a file after
//! every refresh, for programs that can only read a file (Vault Agent's
//! "sinks"; the WLCG bearer-token location `$XDG_RUNTIME_DIR/bt_u$UID`).
//!
//! A reader never sees a partial or empty file: the token goes to a new
//! temporary file in the same folder, is synced, and is renamed over the
//! old one, which is atomic within one file system. The file holds the
//! token alone, without a line break.
//!
//! Writes happen after the store flush, on the refresher's task, under the
//! session's gate: a few small synchronous writes, so two refreshes of one
//! session cannot write out of order.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::SessionRules;

/// The mode of a token file unless configured.
pub const DEFAULT_MODE: u32 = 0o600;

/// Where one session's token goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    pub path: PathBuf,
    pub mode: u32,
}

/// The token files configured in `[sessions.NAME]`, by session name.
pub fn from_rules<'a>(
    rules: impl IntoIterator<Item = (&'a String, &'a SessionRules)>,
) -> HashMap<String, TokenFile> {
    rules
        .into_iter()
        .filter_map(|(name, rules)| {
            let path = rules.token_file.clone()?;
            let mode = rules.token_file_mode.unwrap_or(DEFAULT_MODE);
            Some((name.clone(), TokenFile { path, mode }))
        })
        .collect()
}

impl TokenFile {
    /// Replaces the file's contents with `token`, atomically.
    pub fn write(&self, token: &str) -> std::io::Result<()> {
        let folder = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file_name = self
            .path
            .file_name()
            .ok_or_else(|| std::io::Error::other("the token file path names no file"))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(file_name);
        temp_name.push(format!(".tmp{}", std::process::id()));
        let temp = folder.join(temp_name);

        let written = self.write_temp(&temp, token.as_bytes());
        if let Err(err) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(err);
        }
        std::fs::rename(&temp, &self.path).inspect_err(|_| {
            let _ = std::fs::remove_file(&temp);
        })?;
        // The rename itself is made durable by syncing the folder.
        if let Ok(dir) = std::fs::File::open(folder) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn write_temp(&self, temp: &Path, token: &[u8]) -> std::io::Result<()> {
        // A leftover from a crash is ours to replace.
        let _ = std::fs::remove_file(temp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(self.mode)
            .open(temp)?;
        // The umask may have taken bits the configuration asked for.
        file.set_permissions(std::fs::Permissions::from_mode(self.mode))?;
        file.write_all(token)?;
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_file_holds_the_token_alone_with_the_configured_mode() {
        let dir = tempfile::tempdir().unwrap();
        let file = TokenFile {
            path: dir.path().join("bt"),
            mode: 0o640,
        };
        file.write("token-1").unwrap();
        file.write("token-2").unwrap();
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "token-2");
        let mode = std::fs::metadata(&file.path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_reader_never_sees_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = TokenFile {
            path: dir.path().join("bt"),
            mode: DEFAULT_MODE,
        };
        file.write(&"a".repeat(4096)).unwrap();
        let path = file.path.clone();
        let reader = std::thread::spawn(move || {
            for _ in 0..2000 {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    text.len() == 4096
                        && (text.chars().all(|c| c == 'a') || text.chars().all(|c| c == 'b'))
                );
            }
        });
        for i in 0..200 {
            let c = if i % 2 == 0 { "b" } else { "a" };
            file.write(&c.repeat(4096)).unwrap();
        }
        reader.join().unwrap();
    }

    #[test]
    fn only_sessions_with_a_file_are_listed() {
        let mut rules = std::collections::BTreeMap::new();
        rules.insert("plain".to_string(), SessionRules::default());
        rules.insert(
            "filed".to_string(),
            SessionRules {
                token_file: Some("/run/bt".into()),
                ..SessionRules::default()
            },
        );
        let files = from_rules(&rules);
        assert_eq!(files.len(), 1);
        assert_eq!(files["filed"].mode, DEFAULT_MODE);
    }
}
