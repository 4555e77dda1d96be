//! Who may ask, what lands on disk and in logs, lock and unlock, session
//! lifetimes: the real binaries against the real provider.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{binary, wait_until, Provider, Workspace};
use token_agent::store::Store;

/// Every file below `dir`.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_below(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The refresh tokens the store holds now (read with the store's own key,
/// with the agent stopped).
fn stored_refresh_tokens(ws: &Workspace) -> Vec<String> {
    let store = Store::open(&ws.store(), None).expect("open the stopped agent's store");
    store
        .load_all()
        .unwrap()
        .into_iter()
        .filter_map(|r| {
            store
                .refresh_token(&r.name)
                .unwrap()
                .map(|t| t.expose().to_string())
        })
        .collect()
}

/// Runs tokenctl with `input` on standard input.
fn tokenctl_with_input(ws: &Workspace, args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(binary("tokenctl"))
        .arg("--socket")
        .arg(ws.socket())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn no_token_or_secret_reaches_the_store_files_or_a_trace_level_log() {
    let provider = Provider::start(5);
    let ws = Workspace::new();
    let mut agent = ws.spawn_agent(&["--log-level", "trace"]);
    wait_until(Duration::from_secs(20), "the agent listens", || {
        ws.socket().exists()
    });
    let signed_in = ws.import(&provider, "work", &[]);

    // A few rotations, with tokens served along the way.
    let mut served = Vec::new();
    wait_until(Duration::from_secs(30), "three rotations", || {
        served.push(ws.tokenctl_ok(&["get", "work"]).trim().to_string());
        std::thread::sleep(Duration::from_millis(300));
        provider.stats()["refresh_requests"].as_u64().unwrap() >= 4
    });
    assert_eq!(agent.terminate().code(), Some(0));

    let mut secrets = served;
    secrets.push(signed_in["refresh_token"].as_str().unwrap().to_string());
    secrets.push(signed_in["access_token"].as_str().unwrap().to_string());
    secrets.extend(stored_refresh_tokens(&ws));
    secrets.push("basic-secret".to_string());

    let log = std::fs::read(&agent.log).unwrap();
    assert!(contains(&log, "TRACE"), "the log is not at trace level");
    for file in files_below(&ws.store())
        .into_iter()
        .chain([agent.log.clone()])
    {
        let bytes = std::fs::read(&file).unwrap();
        for secret in &secrets {
            assert!(
                !contains(&bytes, secret),
                "{} holds a secret in plain text",
                file.display()
            );
        }
    }
}

#[test]
fn the_socket_store_and_key_are_owner_only() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);

    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ws.socket()), 0o600);
    assert_eq!(mode(ws.socket().parent().unwrap()), 0o700);
    assert_eq!(mode(&ws.store()), 0o700);
    assert_eq!(mode(&ws.store().join("key")), 0o600);
    for file in files_below(&ws.store()) {
        assert_eq!(
            mode(&file) & 0o077,
            0,
            "{} is open to others",
            file.display()
        );
    }
}

#[test]
fn a_socket_folder_writable_by_others_is_refused() {
    let ws = Workspace::new();
    let folder = ws.socket().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o777)).unwrap();

    let mut agent = ws.spawn_agent(&[]);
    assert!(!agent.child.wait().unwrap().success());
    assert!(
        agent.log_text().contains("writable by others"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_process_of_another_user_is_refused_with_a_clear_error() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);

    // Open the path so that only the peer-credential check stands between
    // user nobody and the token.
    for dir in [ws.dir.path(), ws.socket().parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::fs::set_permissions(ws.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();

    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("tokenctl"))
        .arg("--socket")
        .arg(ws.socket())
        .args(["get", "work"])
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(9), "{stderr}");
    assert!(output.stdout.is_empty());
    assert!(stderr.contains("uid 65534 is not allowed"), "{stderr}");
    assert!(agent
        .log_text()
        .contains("refused a connection from another user"));
    assert!(agent.log_text().contains("uid=65534"));
}

#[test]
fn a_session_rule_serves_listed_executables_only() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let config = ws.secret_file(
        "config.toml",
        "[sessions.guarded]\nallowed_executables = [\"/usr/bin/nothing-like-this\"]\n",
    );
    let _agent = ws.start_agent(&["--config", config.to_str().unwrap()]);
    ws.import(&provider, "guarded", &[]);
    ws.import(&provider, "open", &[]);

    let output = ws.tokenctl(&["get", "guarded"]);
    assert_eq!(output.status.code(), Some(9));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not served to"));
    ws.tokenctl_ok(&["get", "open"]);
}

#[test]
fn a_store_opened_with_another_key_is_refused_and_left_untouched() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let mut agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);
    assert_eq!(agent.terminate().code(), Some(0));

    let snapshot = |dir: &Path| -> HashMap<PathBuf, Vec<u8>> {
        files_below(dir)
            .into_iter()
            .filter(|f| !f.ends_with("lock"))
            .map(|f| (f.clone(), std::fs::read(&f).unwrap()))
            .collect()
    };
    let before = snapshot(&ws.store());

    let other_key = ws.secret_file("other.key", &"ab".repeat(32));
    let config = ws.secret_file(
        "config.toml",
        &format!("[store]\nkey_file = {:?}\n", other_key.to_str().unwrap()),
    );
    let mut wrong = ws.spawn_agent(&["--config", config.to_str().unwrap()]);
    assert!(!wrong.child.wait().unwrap().success());
    assert!(
        wrong.log_text().contains("written with another key"),
        "{}",
        wrong.log_text()
    );
    let after = snapshot(&ws.store());
    let changed: Vec<_> = after
        .iter()
        .filter(|(path, bytes)| before.get(*path) != Some(*bytes))
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(
        changed.is_empty() && after.len() == before.len(),
        "the store changed: {changed:?}"
    );

    // With its own key the store opens and serves as before.
    let _agent = ws.start_agent(&[]);
    let token = ws.tokenctl_ok(&["get", "work", "--min-valid", "1s"]);
    assert!(provider.is_active(token.trim()));
}

#[test]
fn a_locked_agent_serves_nothing_but_keeps_refreshing() {
    let provider = Provider::start(5);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);

    let locked = tokenctl_with_input(&ws, &["lock"], "open sesame\n");
    assert!(
        locked.status.success(),
        "{}",
        String::from_utf8_lossy(&locked.stderr)
    );
    let refused = ws.tokenctl(&["get", "work"]);
    assert_eq!(refused.status.code(), Some(8));
    assert!(refused.stdout.is_empty());

    // Refreshes go on while locked, so nothing lapses.
    let before = provider.stats()["refresh_requests"].as_u64().unwrap();
    wait_until(Duration::from_secs(15), "a refresh while locked", || {
        provider.stats()["refresh_requests"].as_u64().unwrap() > before
    });

    let wrong = tokenctl_with_input(&ws, &["unlock"], "open barley\n");
    assert_eq!(wrong.status.code(), Some(9));
    assert_eq!(ws.tokenctl(&["get", "work"]).status.code(), Some(8));

    let unlocked = tokenctl_with_input(&ws, &["unlock"], "open sesame\n");
    assert!(unlocked.status.success());
    let token = ws.tokenctl_ok(&["get", "work"]);
    assert!(provider.is_active(token.trim()));
}

#[test]
fn a_session_is_removed_and_revoked_when_its_lifetime_ends() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let agent = ws.start_agent(&[]);
    ws.import(&provider, "brief", &["--lifetime", "3s"]);
    let token = ws.tokenctl_ok(&["get", "brief"]).trim().to_string();
    assert!(provider.is_active(&token));

    wait_until(Duration::from_secs(10), "the session is gone", || {
        ws.tokenctl(&["get", "brief"]).status.code() == Some(4)
    });
    assert!(
        agent.log_text().contains("refresh token revoked"),
        "{}",
        agent.log_text()
    );
    assert!(
        !provider.is_active(&token),
        "the grant outlived the session's revocation"
    );
}
