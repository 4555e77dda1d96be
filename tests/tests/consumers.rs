//! The ways programs reach their tokens, end to end: the real binaries and
//! a real `git` against the real provider (oidc-provider, refresh-token
//! rotation on). Access tokens live 60 s here, so nothing rotates behind a
//! test's back unless it asks.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::{binary, Provider, Workspace};
use serde_json::Value;
use token_agent_client::{AsyncClient, Client, TokenOptions};

const ACCESS_TTL: u64 = 60;

fn assert_no_replay(provider: &Provider) {
    let stats = provider.stats();
    assert_eq!(stats["replays"], Value::from(0), "a replay: {stats}");
}

fn started(provider: &Provider, extra: &[&str]) -> (Workspace, common::Agent) {
    let ws = Workspace::new();
    let agent = ws.start_agent(extra);
    ws.import(provider, "work", &[]);
    (ws, agent)
}

#[test]
fn get_prints_the_token_raw_as_json_and_as_a_header() {
    let provider = Provider::start(ACCESS_TTL);
    let (ws, _agent) = started(&provider, &[]);

    let raw = ws.tokenctl_ok(&["get", "work"]);
    let token = raw.trim_end_matches('\n');
    assert!(!token.is_empty() && !token.contains('\n'));
    assert!(provider.is_active(token));

    let json: Value = serde_json::from_str(&ws.tokenctl_ok(&["get", "work", "--format", "json"]))
        .expect("one JSON object");
    assert_eq!(json["access_token"], token);
    assert_eq!(json["token_type"], "Bearer");
    let expires_in = json["expires_in"].as_u64().unwrap();
    assert!(expires_in > 0 && expires_in <= ACCESS_TTL, "{json}");
    assert!(json["expires_at"].as_u64().unwrap() > expires_in);

    let header = ws.tokenctl_ok(&["get", "work", "--format", "header"]);
    assert_eq!(header, format!("Authorization: Bearer {token}\n"));
}

#[test]
fn tokenctl_and_tokenctl_full_answer_get_alike() {
    let provider = Provider::start(ACCESS_TTL);
    let (ws, _agent) = started(&provider, &[]);
    let run = |binary_name: &str, args: &[&str]| {
        Command::new(binary(binary_name))
            .env("TOKEN_AGENT_SOCK", ws.socket())
            .args(args)
            .output()
            .unwrap()
    };

    for args in [
        &["get", "work"][..],
        &["get", "work", "--format", "header", "--min-valid", "5s"],
        // Handed over by tokenctl: a duration it leaves to clap.
        &["get", "work", "--min-valid", "1m 30s"],
        &["get", "absent"],
    ] {
        let fast = run("tokenctl", args);
        let full = run("tokenctl-full", args);
        assert_eq!(fast.status.code(), full.status.code(), "{args:?}");
        assert_eq!(fast.stdout, full.stdout, "{args:?}");
        assert_eq!(fast.stderr, full.stderr, "{args:?}");
    }
    assert_eq!(run("tokenctl", &["get", "absent"]).status.code(), Some(4));
    let token = String::from_utf8(run("tokenctl", &["get", "work"]).stdout).unwrap();
    assert!(provider.is_active(token.trim()));

    // JSON: the same fields, though expires_in may tick between the two.
    let json = |binary_name: &str| -> Value {
        let out = run(binary_name, &["get", "work", "--format=json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (fast, full) = (json("tokenctl"), json("tokenctl-full"));
    for field in ["access_token", "token_type", "expires_at"] {
        assert_eq!(fast[field], full[field], "{field}");
    }
    assert_eq!(fast["access_token"].as_str(), Some(token.trim()));
}

#[test]
fn exec_hands_the_token_to_the_command_and_passes_its_exit_code_through() {
    let provider = Provider::start(ACCESS_TTL);
    let (ws, _agent) = started(&provider, &[]);
    let token = ws.tokenctl_ok(&["get", "work"]).trim().to_string();

    let out = ws.dir.path().join("seen");
    let script = format!(
        "printf %s \"$MY_TOKEN\" > '{}'; test -z \"$ACCESS_TOKEN\" || exit 1; exit 42",
        out.display()
    );
    let run = ws.tokenctl(&[
        "exec", "work", "--env", "MY_TOKEN", "--", "sh", "-c", &script,
    ]);
    assert_eq!(run.status.code(), Some(42), "{run:?}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), token);

    // The default variable, and a command's own options left alone.
    let run = ws.tokenctl(&[
        "exec",
        "work",
        "--",
        "sh",
        "-c",
        "test -n \"$ACCESS_TOKEN\"",
    ]);
    assert!(run.status.success(), "{run:?}");
    let missing = ws.tokenctl(&["exec", "work", "--", "/no/such/program"]);
    assert_eq!(missing.status.code(), Some(127));
}

#[test]
fn the_kubectl_plugin_prints_an_exec_credential_that_parses_back() {
    let provider = Provider::start(ACCESS_TTL);
    let (ws, _agent) = started(&provider, &[]);

    let printed = ws.tokenctl_ok(&["kubectl", "work"]);
    let credential: Value = serde_json::from_str(&printed).expect("JSON");
    // The fields client.authentication.k8s.io/v1 defines for a plugin's
    // answer, and nothing else at the top.
    assert_eq!(credential["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(credential["kind"], "ExecCredential");
    let top: HashSet<&str> = credential
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(top, HashSet::from(["apiVersion", "kind", "status"]));
    let status = credential["status"].as_object().unwrap();
    let token = status["token"].as_str().unwrap();
    assert!(provider.is_active(token));

    // expirationTimestamp is RFC 3339 UTC and names the token's expiry.
    let stamp = status["expirationTimestamp"].as_str().unwrap();
    assert_eq!(stamp.len(), 20, "{stamp}");
    assert!(
        stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
        "{stamp}"
    );
    let parsed = Command::new("date")
        .args(["-u", "-d", stamp, "+%s"])
        .output()
        .unwrap();
    let parsed: u64 = String::from_utf8(parsed.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let json: Value =
        serde_json::from_str(&ws.tokenctl_ok(&["get", "work", "--format", "json"])).unwrap();
    assert_eq!(json["access_token"], token);
    assert_eq!(json["expires_at"].as_u64(), Some(parsed));
}

/// A git smart-HTTP server on 127.0.0.1 that wants `token`: a request
/// without it gets 401, one with it (Basic password or Bearer) an empty
/// repository. Returns the port and the Authorization headers it saw.
fn git_server(token: String) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut authorization = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("authorization") {
                        authorization = Some(value.trim().to_string());
                    }
                }
            }
            let accepted = authorization.as_deref().is_some_and(|auth| {
                log.lock().unwrap().push(auth.to_string());
                carries(auth, &token)
            });
            let response = if accepted {
                let mut body = pkt_line("# service=git-upload-pack\n");
                body.push_str("0000");
                body.push_str(&pkt_line(&format!(
                    "{} capabilities^{{}}\0agent=test\n",
                    "0".repeat(40)
                )));
                body.push_str("0000");
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\n\
                     Cache-Control: no-cache\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"test\"\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (port, seen)
}

fn pkt_line(text: &str) -> String {
    format!("{:04x}{text}", text.len() + 4)
}

/// Whether an Authorization header value carries `token`.
fn carries(auth: &str, token: &str) -> bool {
    if let Some(bearer) = auth.strip_prefix("Bearer ") {
        return bearer == token;
    }
    let Some(basic) = auth.strip_prefix("Basic ") else {
        return false;
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic)
        .unwrap_or_default();
    let decoded = String::from_utf8(decoded).unwrap_or_default();
    decoded
        .split_once(':')
        .is_some_and(|(_, password)| password == token)
}

#[test]
fn git_fetches_through_the_credential_helper_with_the_current_token() {
    let provider = Provider::start(ACCESS_TTL);
    let (ws, _agent) = started(&provider, &[]);
    let token = ws.tokenctl_ok(&["get", "work"]).trim().to_string();
    let (port, seen) = git_server(token.clone());

    let helper = format!(
        "!'{}' --socket '{}' git-credential work",
        binary("tokenctl").display(),
        ws.socket().display()
    );
    let home = ws.dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let run = Command::new("git")
        .args(["-c", "credential.helper="])
        .args(["-c", &format!("credential.helper={helper}")])
        .args(["ls-remote", &format!("http://127.0.0.1:{port}/repo")])
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .output()
        .expect("run git (Debian package git)");
    assert!(
        run.status.success(),
        "git ls-remote failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|auth| carries(auth, &token)),
        "git never sent the token: {} headers",
        seen.len()
    );
}

#[test]
fn the_git_helper_answers_the_credential_protocol() {
    let provider = Provider::start(ACCESS_TTL);
    let (ws, _agent) = started(&provider, &[]);
    let json: Value =
        serde_json::from_str(&ws.tokenctl_ok(&["get", "work", "--format", "json"])).unwrap();
    let token = json["access_token"].as_str().unwrap();
    let expires_at = json["expires_at"].as_u64().unwrap();

    let helper = |action: &str, input: &str| {
        let mut child = Command::new(binary("tokenctl"))
            .arg("--socket")
            .arg(ws.socket())
            .args(["git-credential", "work", action])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };

    let basic = helper("get", "protocol=https\nhost=git.example\n\n");
    assert_eq!(
        basic,
        format!("username=oauth2\npassword={token}\npassword_expiry_utc={expires_at}\n")
    );
    let bearer = helper(
        "get",
        "capability[]=authtype\nprotocol=https\nhost=git.example\n\n",
    );
    assert!(bearer.starts_with(&format!(
        "capability[]=authtype\nauthtype=Bearer\ncredential={token}\n"
    )));
    assert!(bearer.contains(&format!("password_expiry_utc={expires_at}\n")));
    assert_eq!(helper("store", "protocol=https\npassword=x\n\n"), "");
    assert_eq!(helper("erase", "protocol=https\n\n"), "");
}

#[test]
fn a_down_scoped_token_has_fewer_scopes_and_is_cached_apart() {
    let provider = Provider::start(ACCESS_TTL);
    let (ws, _agent) = started(&provider, &[]);
    let main = ws.tokenctl_ok(&["get", "work"]).trim().to_string();
    let main_scope = provider.introspect(&main)["scope"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(main_scope.contains("offline_access"), "{main_scope}");

    provider.reset_stats();
    let narrow = ws
        .tokenctl_ok(&["get", "work", "--scope", "openid"])
        .trim()
        .to_string();
    assert_ne!(narrow, main);
    let introspected = provider.introspect(&narrow);
    assert_eq!(introspected["active"], true);
    assert_eq!(introspected["scope"], "openid");

    // Cached: the same token again, without asking the provider.
    let again = ws.tokenctl_ok(&["get", "work", "--scope", "openid", "--min-valid", "10s"]);
    assert_eq!(again.trim(), narrow);
    assert_eq!(provider.stats()["refresh_requests"], 1);
    // Never served in place of the session's own token.
    assert_eq!(ws.tokenctl_ok(&["get", "work"]).trim(), main);

    // The down-scoped answer rotated the session's refresh token; the
    // next ordinary refresh presents the new one.
    ws.tokenctl_ok(&["refresh", "work"]);
    let fresh = ws.tokenctl_ok(&["get", "work"]).trim().to_string();
    assert!(provider.is_active(&fresh));
    assert_eq!(provider.stats()["refresh_requests"], 2);
    assert_no_replay(&provider);
}

#[test]
fn the_token_file_is_never_partial_across_many_rotations() {
    let provider = Provider::start(ACCESS_TTL);
    let ws = Workspace::new();
    let token_file = ws.dir.path().join("bt_u1000");
    let config = ws.secret_file(
        "config.toml",
        &format!(
            "[sessions.work]\ntoken_file = {:?}\n",
            token_file.display().to_string()
        ),
    );
    let _agent = ws.start_agent(&["--config", config.to_str().unwrap()]);
    ws.import(&provider, "work", &[]);
    let first = std::fs::read_to_string(&token_file).expect("written at import");
    assert_eq!(first, ws.tokenctl_ok(&["get", "work"]).trim());

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        let path = token_file.clone();
        std::thread::spawn(move || {
            let mut seen = HashSet::new();
            while !done.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string(&path).expect("always there");
                assert!(!text.is_empty(), "an empty token file");
                assert_eq!(text.trim(), text, "stray whitespace");
                seen.insert(text);
            }
            seen
        })
    };
    const ROTATIONS: usize = 20;
    for _ in 0..ROTATIONS {
        ws.tokenctl_ok(&["refresh", "work"]);
    }
    done.store(true, Ordering::Relaxed);
    let seen = reader.join().expect("the reader saw only whole tokens");

    // Every content read was a whole token the provider accepts.
    for token in &seen {
        assert!(provider.is_active(token), "a partial or foreign token");
    }
    assert!(seen.len() > 1, "the reader saw no rotation");
    let last = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(last, ws.tokenctl_ok(&["get", "work"]).trim());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().mode() & 0o777,
        0o600
    );
    assert_no_replay(&provider);
}

#[test]
fn tokenctl_watch_prints_every_rotation_in_order() {
    let provider = Provider::start(ACCESS_TTL);
    let (ws, _agent) = started(&provider, &[]);
    let mut watch = Command::new(binary("tokenctl"))
        .arg("--socket")
        .arg(ws.socket())
        .args(["watch", "work", "--format", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || -> Value {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("an event");
        serde_json::from_str(&line).unwrap()
    };

    let first = next();
    let generation = first["generation"].as_u64().unwrap();
    assert_eq!(
        first["token"]["access_token"],
        ws.tokenctl_ok(&["get", "work"]).trim()
    );
    for rotation in 1..=10 {
        ws.tokenctl_ok(&["refresh", "work"]);
        let event = next();
        assert_eq!(event["generation"].as_u64(), Some(generation + rotation));
        let token = event["token"]["access_token"].as_str().unwrap();
        assert_eq!(token, ws.tokenctl_ok(&["get", "work"]).trim());
        assert!(provider.is_active(token));
    }

    ws.tokenctl_ok(&["remove", "work"]);
    let last = next();
    assert_eq!(last["error"]["code"], "no_such_session");
    let status = watch.wait().unwrap();
    assert_eq!(status.code(), Some(4));
}

#[test]
fn the_library_reuses_its_connection_and_reconnects_once_after_a_restart() {
    let provider = Provider::start(ACCESS_TTL);
    let ws = Workspace::new();
    let mut agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);

    let mut client = Client::connect(&ws.socket()).unwrap();
    let first = client.get("work", Duration::from_secs(5)).unwrap();
    let again = client.get("work", Duration::ZERO).unwrap();
    assert_eq!(first.access_token, again.access_token);
    assert_eq!(client.list().unwrap().len(), 1);

    agent.kill_hard();
    let _agent = ws.start_agent(&[]);
    let after = client
        .get_with(
            "work",
            &TokenOptions::new().min_valid(Duration::from_secs(5)),
        )
        .expect("the client reconnects to the new agent");
    assert!(provider.is_active(after.access_token.expose()));
}

#[test]
fn the_async_client_gets_and_watches() {
    let provider = Provider::start(ACCESS_TTL);
    let (ws, _agent) = started(&provider, &[]);
    let socket = ws.socket();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = AsyncClient::connect(&socket).await.unwrap();
        let token = client.get("work", Duration::from_secs(5)).await.unwrap();
        assert_eq!(client.status("work").await.unwrap().name, "work");
        let missing = client.get("nobody", Duration::ZERO).await.unwrap_err();
        assert_eq!(
            missing.code(),
            Some(token_agent_client::proto::ErrorCode::NoSuchSession)
        );

        let mut watcher = client.watch("work").await.unwrap();
        let current = watcher.next().await.unwrap().unwrap();
        assert_eq!(current.token.unwrap().access_token, token.access_token);

        let refresher = tokio::task::spawn_blocking(move || {
            Client::connect(&socket).unwrap().refresh("work").unwrap();
        });
        let rotated = watcher.next().await.unwrap().unwrap();
        refresher.await.unwrap();
        assert_eq!(rotated.generation, current.generation + 1);
        assert_ne!(rotated.token.unwrap().access_token, token.access_token);
    });
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    let ws = Workspace::new();
    for (shell, mark) in [
        ("bash", "_tokenctl()"),
        ("zsh", "#compdef tokenctl"),
        ("fish", "complete -c tokenctl"),
    ] {
        let script = ws.tokenctl_ok(&["completions", shell]);
        assert!(script.contains(mark), "{shell}: {mark} missing");
        assert!(
            script.contains("git-credential"),
            "{shell}: subcommands missing"
        );
    }
    let mut man = String::new();
    Command::new(binary("tokenctl"))
        .arg("man")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut man)
        .unwrap();
    assert!(
        man.contains(".TH tokenctl"),
        "{}",
        &man[..man.len().min(200)]
    );
    assert!(man.contains("kubectl"));
}

#[test]
fn a_watch_ends_with_exit_3_when_the_agent_stops_and_says_a_removal_once() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let mut agent = ws.start_agent(&[]);
    ws.import(&provider, "gone", &[]);
    ws.import(&provider, "stays", &[]);

    let watch = |name: &str| {
        std::process::Command::new(common::binary("tokenctl"))
            .arg("--socket")
            .arg(ws.socket())
            .args(["watch", name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Removed: told once, exit 4.
    let removed = watch("gone");
    std::thread::sleep(std::time::Duration::from_millis(500));
    ws.tokenctl_ok(&["remove", "gone"]);
    let output = removed.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(4));
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(said.matches("was removed").count(), 1, "{said}");

    // The agent stops: exit 3, with words a person can act on.
    let stopped = watch("stays");
    std::thread::sleep(std::time::Duration::from_millis(500));
    agent.terminate();
    let output = stopped.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("closed the watch"));
}
