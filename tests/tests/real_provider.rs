//! The real binaries against a real OpenID provider (oidc-provider with
//! refresh-token rotation and 5-second access tokens). The provider counts
//! every refresh token presented to it, so a replay anywhere shows up as
//! `replays > 0`; with rotation on, a replay would also revoke the grant.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Provider, Workspace};
use serde_json::Value;
use token_agent_client::proto::{ErrorCode, SessionState};
use token_agent_client::{Client, ClientError};

const ACCESS_TTL: u64 = 5;

fn generation_count(provider: &Provider) -> u64 {
    provider.stats()["refresh_requests"].as_u64().unwrap()
}

fn assert_no_replay(provider: &Provider) {
    let stats = provider.stats();
    assert_eq!(
        stats["replays"],
        Value::from(0),
        "a refresh token was presented twice: {stats}"
    );
}

#[test]
fn a_session_stays_alive_across_ten_rotations_and_every_token_is_accepted() {
    let provider = Provider::start(ACCESS_TTL);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);

    // Keep asking; every token served must be one the provider accepts.
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while generation_count(&provider) < 11 {
        assert!(Instant::now() < deadline, "fewer than 10 rotations in 60 s");
        let token = ws.tokenctl_ok(&["get", "work"]).trim().to_string();
        assert!(!token.is_empty());
        if seen.insert(token.clone()) {
            assert!(
                provider.is_active(&token),
                "the agent served a token the provider refuses"
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    assert!(
        seen.len() >= 10,
        "only {} distinct tokens served",
        seen.len()
    );
    assert_no_replay(&provider);
    let status = ws.tokenctl_ok(&["status", "work"]);
    assert!(status.contains("state:          fresh"), "{status}");
}

#[test]
fn a_killed_agent_comes_back_with_every_session_and_keeps_refreshing() {
    // 30-second tokens: the scheduler's next refresh is 15 s away, so the
    // kill lands between refreshes. (A kill inside a refresh, after the
    // provider rotated and before the store took the answer, loses that
    // rotation by nature; the agent then reports it, see crash_recovery.rs.)
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let mut agent = ws.start_agent(&[]);
    ws.import(&provider, "alpha", &[]);
    ws.import(&provider, "beta", &[]);

    // A few rotations, then a kill without warning.
    for name in ["alpha", "beta", "alpha"] {
        ws.tokenctl_ok(&["refresh", name]);
    }
    assert_eq!(generation_count(&provider), 5);
    agent.kill_hard();

    let _agent = ws.start_agent(&[]);
    let listed = ws.tokenctl_ok(&["list"]);
    assert!(
        listed.contains("alpha") && listed.contains("beta"),
        "{listed}"
    );

    // Both sessions keep rotating after the restart, and their tokens work.
    for name in ["alpha", "beta", "alpha", "beta"] {
        ws.tokenctl_ok(&["refresh", name]);
    }
    assert_eq!(generation_count(&provider), 9);
    for name in ["alpha", "beta"] {
        let token = ws.tokenctl_ok(&["get", name, "--min-valid", "1s"]);
        assert!(
            provider.is_active(token.trim()),
            "{name}'s token is refused after the restart"
        );
    }
    assert_no_replay(&provider);
}

#[test]
fn second_daemon_on_same_store_refuses_to_start() {
    let ws = Workspace::new();
    let first = ws.start_agent(&[]);

    // Same store, another socket: the store lock must stop it.
    let other_socket = ws.dir.path().join("other.sock");
    let mut second = ws.spawn_agent_on(&other_socket, &ws.store(), &[]);
    let status = second.child.wait().unwrap();
    assert!(!status.success());
    let log = second.log_text();
    assert!(
        log.contains(&format!(
            "in use by another token-agent (pid {})",
            first.pid()
        )),
        "the refusal does not name the first agent: {log}"
    );
    assert!(
        !other_socket.exists(),
        "the second agent bound a socket before refusing"
    );
}

#[test]
fn a_live_agent_keeps_its_socket_and_a_stale_socket_is_replaced() {
    let ws = Workspace::new();
    let mut first = ws.start_agent(&[]);

    // Another store, same socket: must not steal the live socket.
    let other_store = ws.dir.path().join("store2");
    let mut second = ws.spawn_agent_on(&ws.socket(), &other_store, &[]);
    assert!(!second.child.wait().unwrap().success());
    assert!(
        second.log_text().contains("already serving"),
        "{}",
        second.log_text()
    );
    ws.tokenctl_ok(&["ping"]);

    // A dead agent's socket file is left behind by SIGKILL; a new agent
    // replaces it.
    first.kill_hard();
    assert!(ws.socket().exists());
    let _third = ws.start_agent(&[]);
    ws.tokenctl_ok(&["ping"]);
}

#[test]
fn concurrent_gets_on_an_expired_token_cause_exactly_one_refresh() {
    let provider = Provider::start(ACCESS_TTL);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    // Idle sessions are not refreshed ahead, so this one's token lapses.
    ws.import(&provider, "busy", &["--idle-timeout", "1s"]);
    std::thread::sleep(Duration::from_secs(ACCESS_TTL + 1));
    provider.reset_stats();

    let socket = ws.socket();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(200));
    let handles: Vec<_> = (0..200)
        .map(|_| {
            let socket = socket.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&socket).expect("connect");
                barrier.wait();
                client
                    .get("busy", Duration::ZERO)
                    .expect("get")
                    .access_token
                    .expose()
                    .to_string()
            })
        })
        .collect();
    let tokens: HashSet<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    let stats = provider.stats();
    assert_eq!(stats["refresh_requests"], Value::from(1), "{stats}");
    assert_eq!(tokens.len(), 1, "the waiting clients got different tokens");
    assert!(provider.is_active(tokens.iter().next().unwrap()));
}

#[test]
fn a_revoked_grant_surfaces_as_needs_sign_in() {
    let provider = Provider::start(ACCESS_TTL);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    let answer = ws.import(&provider, "stolen", &[]);

    // Someone else presents the refresh token the agent already rotated:
    // the provider revokes the whole grant.
    let original = answer["refresh_token"].as_str().unwrap();
    let replayed = provider.refresh_directly(original);
    assert_eq!(replayed["error"], "invalid_grant");

    // The agent's next refresh is refused; `get` then says sign in again
    // and exits with its own code, without hanging.
    let output = ws.tokenctl(&["refresh", "stolen"]);
    assert_eq!(
        output.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let started = Instant::now();
    let output = ws.tokenctl(&["get", "stolen"]);
    assert_eq!(output.status.code(), Some(5));
    assert!(started.elapsed() < Duration::from_secs(5));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("needs a new sign-in") && message.contains("invalid_grant"),
        "{message}"
    );

    let mut client = Client::connect(&ws.socket()).unwrap();
    let status = client.status("stolen").unwrap();
    assert_eq!(status.state, SessionState::NeedsSignIn);
    assert!(!status.has_refresh_token);
    match client.get("stolen", Duration::ZERO) {
        Err(ClientError::Agent(reply)) => assert_eq!(reply.code, ErrorCode::ReauthRequired),
        other => panic!("expected reauth_required, got {other:?}"),
    }
}

#[test]
fn sigterm_stops_the_agent_cleanly_and_removes_its_socket() {
    let provider = Provider::start(ACCESS_TTL);
    let ws = Workspace::new();
    let mut agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);

    let status = agent.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!ws.socket().exists());

    // What was stored before the stop is what the next agent uses.
    let _agent = ws.start_agent(&[]);
    let token = ws.tokenctl_ok(&["get", "work", "--min-valid", "1s"]);
    assert!(provider.is_active(token.trim()));
    assert_no_replay(&provider);
}

#[test]
fn tokenctl_exit_codes_tell_the_cases_apart() {
    let ws = Workspace::new();
    // No agent yet.
    assert_eq!(ws.tokenctl(&["get", "work"]).status.code(), Some(3));

    let _agent = ws.start_agent(&[]);
    let output = ws.tokenctl(&["get", "nothing-here"]);
    assert_eq!(output.status.code(), Some(4));
    assert!(
        output.stdout.is_empty(),
        "an error must not print a token-like line"
    );
    assert_eq!(
        ws.tokenctl(&["get", "../etc/passwd"]).status.code(),
        Some(1)
    );
}

#[test]
fn a_get_asking_more_than_the_token_has_left_refreshes_when_a_new_token_would_do() {
    let provider = Provider::start(ACCESS_TTL);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    // Idle, so nothing refreshes ahead: the 5 s token has ~1.5 s left.
    ws.import(&provider, "work", &["--idle-timeout", "1s"]);
    std::thread::sleep(Duration::from_millis(3500));

    // A fresh token lives 5 s, so 3 s is a fair ask: refresh and serve.
    let token = ws.tokenctl_ok(&["get", "work", "--min-valid", "3s"]);
    assert!(provider.is_active(token.trim()));
    assert_eq!(provider.stats()["refresh_requests"], Value::from(2));

    // 10 s is more than any token of this provider lives: say so, without
    // another refresh.
    let output = ws.tokenctl(&["get", "work", "--min-valid", "10s"]);
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("live 5 s") && message.contains("10 s"),
        "{message}"
    );
    assert_eq!(provider.stats()["refresh_requests"], Value::from(2));
}

#[test]
fn an_import_with_a_wrong_client_secret_fails_alone() {
    let provider = Provider::start(ACCESS_TTL);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);

    // The same client, a mistyped secret: only this import fails.
    let answer = provider.sign_in("agent-basic", Some("basic-secret"), "typo");
    let rt = ws.secret_file("typo.rt", answer["refresh_token"].as_str().unwrap());
    let wrong = ws.secret_file("wrong.secret", "not-the-secret");
    let output = ws.tokenctl(&[
        "import",
        "typo",
        "--issuer",
        &provider.issuer,
        "--client-id",
        "agent-basic",
        "--client-secret-file",
        wrong.to_str().unwrap(),
        "--refresh-token-file",
        rt.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(7));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("was not imported"), "{message}");
    assert!(
        !message.contains("is kept"),
        "a failed import claims to keep something: {message}"
    );

    // The working session is untouched and keeps rotating.
    let status = ws.tokenctl_ok(&["status", "work"]);
    assert!(status.contains("state:          fresh"), "{status}");
    std::thread::sleep(Duration::from_secs(ACCESS_TTL + 1));
    let token = ws.tokenctl_ok(&["get", "work"]);
    assert!(provider.is_active(token.trim()));
}

#[test]
fn a_replace_that_the_provider_refuses_keeps_the_previous_session() {
    let provider = Provider::start(ACCESS_TTL);
    let ws = Workspace::new();
    let _agent = ws.start_agent(&[]);
    ws.import(&provider, "keep", &[]);

    // A replacement with a garbage refresh token is refused by the provider.
    let garbage = ws.secret_file("garbage.rt", "not-a-refresh-token");
    let secret = ws.secret_file("client.secret", "basic-secret");
    let output = ws.tokenctl(&[
        "import",
        "keep",
        "--replace",
        "--issuer",
        &provider.issuer,
        "--client-id",
        "agent-basic",
        "--client-secret-file",
        secret.to_str().unwrap(),
        "--refresh-token-file",
        garbage.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(5));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("keeps its previous tokens"), "{message}");

    // The session that was there still refreshes and serves.
    std::thread::sleep(Duration::from_secs(ACCESS_TTL + 1));
    let token = ws.tokenctl_ok(&["get", "keep"]);
    assert!(provider.is_active(token.trim()));
    assert_no_replay(&provider);
}
