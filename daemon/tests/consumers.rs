//! Down-scoped tokens, watch subscriptions and token files against the
//! scripted fake provider: what goes out to the provider, which refresh
//! token is presented, and what reaches the subscribers and the file.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{session, test_timing, wait_until, Daemon, FakeIdp, Reply};
use token_agent::config::{Config, FileConfig, SessionRules};
use token_agent_client::proto::{ErrorCode, SessionState, WatchEvent};
use token_agent_client::{Client, TokenOptions};

const WAIT: Duration = Duration::from_secs(10);

async fn get_with(daemon: &Daemon, options: TokenOptions) -> Result<String, ErrorCode> {
    daemon
        .call(move |c| c.get_with("s", &options))
        .await
        .map(|t| t.access_token.expose().to_string())
        .map_err(|e| e.code().unwrap_or(ErrorCode::Internal))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_scoped_token_presents_the_session_refresh_token_once_and_is_cached_apart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-1", Some("rt-2"), Some(300)));
    daemon.import(session("s", &fake, "rt-1")).await.unwrap();

    // Narrower scope and a resource URI: sent with the rotated token.
    fake.then(Reply::tokens("at-narrow", Some("rt-3"), Some(120)));
    let narrow = TokenOptions::new()
        .scope("read")
        .audience("https://api.example");
    assert_eq!(
        get_with(&daemon, narrow.clone()).await.unwrap(),
        "at-narrow"
    );
    let post = &fake.posts()[1];
    assert_eq!(post.refresh_token.as_deref(), Some("rt-2"));
    assert_eq!(post.form_value("scope"), Some("read"));
    assert_eq!(post.form_value("resource"), Some("https://api.example"));

    // Cached: no second request, and the same scope set in another order
    // is the same entry.
    let reordered = TokenOptions::new()
        .scope("read")
        .scope("read")
        .audience("https://api.example");
    assert_eq!(get_with(&daemon, reordered).await.unwrap(), "at-narrow");
    assert_eq!(fake.post_count(), 2);

    // The session's own token is not the down-scoped one, and vice versa.
    assert_eq!(daemon.token("s").await, "at-1");

    // The next ordinary refresh presents the token the down-scoped answer
    // rotated to.
    fake.then(Reply::tokens("at-2", Some("rt-4"), Some(300)));
    daemon.refresh("s").await.unwrap();
    assert_eq!(fake.posts()[2].refresh_token.as_deref(), Some("rt-3"));
    assert_eq!(get_with(&daemon, narrow).await.unwrap(), "at-narrow");

    // An audience name goes out as `audience`; no rotation here.
    fake.then(Reply::tokens("at-billing", None, Some(60)));
    let billing = TokenOptions::new().audience("billing");
    assert_eq!(get_with(&daemon, billing).await.unwrap(), "at-billing");
    let post = &fake.posts()[3];
    assert_eq!(post.refresh_token.as_deref(), Some("rt-4"));
    assert_eq!(post.form_value("audience"), Some("billing"));
    assert_eq!(post.form_value("scope"), None);

    // A refused scope leaves the session as it was.
    fake.then(Reply::oauth_error(400, "invalid_scope", None));
    let admin = TokenOptions::new().scope("admin");
    assert_eq!(
        get_with(&daemon, admin).await.unwrap_err(),
        ErrorCode::ProviderRejected
    );
    let status = daemon.status("s").await;
    assert_eq!(status.state, SessionState::Fresh);
    assert!(status.has_refresh_token);

    // The rotated refresh token is durable: a restarted agent presents it.
    daemon.stop().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-3", Some("rt-5"), Some(300)));
    daemon.refresh("s").await.unwrap();
    assert_eq!(
        fake.presented(),
        ["rt-1", "rt-2", "rt-3", "rt-4", "rt-4", "rt-4"]
    );
    // invalid_scope consumed nothing: rt-4 was presented for it and again
    // after the restart, which a provider accepts because it refused the
    // narrower request before using the token.
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_scoped_request_refused_for_the_grant_needs_sign_in() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-1", Some("rt-2"), Some(300)));
    daemon.import(session("s", &fake, "rt-1")).await.unwrap();

    fake.then(Reply::oauth_error(400, "invalid_grant", None));
    let narrow = TokenOptions::new().scope("read");
    assert_eq!(
        get_with(&daemon, narrow).await.unwrap_err(),
        ErrorCode::ReauthRequired
    );
    assert_eq!(daemon.status("s").await.state, SessionState::NeedsSignIn);
    daemon.stop().await;
}

/// Collects a subscription's events on a thread of its own.
fn watch(daemon: &Daemon) -> Arc<Mutex<Vec<WatchEvent>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let socket = daemon.socket.clone();
    std::thread::spawn(move || {
        let watcher = Client::connect(&socket).unwrap().watch("s").unwrap();
        for event in watcher {
            sink.lock().unwrap().push(event.unwrap());
        }
    });
    events
}

async fn wait_for_events(events: &Arc<Mutex<Vec<WatchEvent>>>, n: usize) {
    wait_until(&format!("{n} events"), WAIT, || async {
        events.lock().unwrap().len() >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_hears_every_rotation_in_order_then_the_failure_and_the_removal() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-0", Some("rt-1"), Some(300)));
    daemon.import(session("s", &fake, "rt-0")).await.unwrap();

    let events = watch(&daemon);
    wait_for_events(&events, 1).await;

    const ROTATIONS: usize = 25;
    for i in 1..=ROTATIONS {
        let rotated = format!("rt-{}", i + 1);
        fake.then(Reply::tokens(&format!("at-{i}"), Some(&rotated), Some(300)));
        daemon.refresh("s").await.unwrap();
    }
    wait_for_events(&events, ROTATIONS + 1).await;

    fake.then(Reply::oauth_error(400, "invalid_grant", None));
    let _ = daemon.refresh("s").await;
    wait_for_events(&events, ROTATIONS + 2).await;

    daemon
        .call(|c| c.remove("s"))
        .await
        .expect("remove the session");
    wait_for_events(&events, ROTATIONS + 3).await;

    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), ROTATIONS + 3, "one event per change");
    for (i, event) in events[..=ROTATIONS].iter().enumerate() {
        let token = event.token.as_ref().expect("a token event");
        assert_eq!(token.access_token.expose(), format!("at-{i}"));
        assert_eq!(event.generation, events[0].generation + i as u64);
    }
    let failure = &events[ROTATIONS + 1];
    assert!(failure.token.is_none());
    assert_eq!(failure.state, SessionState::NeedsSignIn);
    assert_eq!(
        failure.error.as_ref().map(|e| e.code),
        Some(ErrorCode::ReauthRequired)
    );
    let removal = &events[ROTATIONS + 2];
    assert_eq!(
        removal.error.as_ref().map(|e| e.code),
        Some(ErrorCode::NoSuchSession)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watching_a_missing_session_is_an_error_and_the_connection_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    let socket = daemon.socket.clone();
    let code = tokio::task::spawn_blocking(move || {
        let client = Client::connect(&socket).unwrap();
        client.watch("nobody").err().and_then(|e| e.code())
    })
    .await
    .unwrap();
    assert_eq!(code, Some(ErrorCode::NoSuchSession));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_file_always_holds_a_whole_current_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("bt_u1000");
    let mut sessions = BTreeMap::new();
    sessions.insert(
        "s".to_string(),
        SessionRules {
            token_file: Some(token_path.clone()),
            token_file_mode: Some(0o640),
            ..SessionRules::default()
        },
    );
    let socket = dir.path().join("agent.sock");
    let running = token_agent::start(Config {
        socket: socket.clone(),
        store_dir: dir.path().join("store"),
        file: FileConfig {
            sessions,
            ..FileConfig::default()
        },
        timing: test_timing(),
        max_concurrent_refreshes: 4,
        provider_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
    })
    .await
    .unwrap();
    let fake = FakeIdp::start().await;
    fake.then(Reply::tokens(&"a".repeat(2000), Some("rt-1"), Some(300)));
    let import = session("s", &fake, "rt-0");
    let s2 = socket.clone();
    tokio::task::spawn_blocking(move || Client::connect(&s2).unwrap().import(import))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&token_path).unwrap(),
        "a".repeat(2000)
    );
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().mode() & 0o777,
        0o640
    );

    // A reader loop during many rotations: always one whole token.
    const ROTATIONS: usize = 40;
    let letters: Vec<char> = "bcdefghijklmnopqrstuvwxyzBCDEFGHIJKLMNOPQ"
        .chars()
        .collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        let path = token_path.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let text = std::fs::read_to_string(&path).unwrap();
                let first = text.chars().next().expect("never empty");
                assert!(
                    text.len() == 2000 && text.chars().all(|c| c == first),
                    "a partial token file"
                );
                reads += 1;
            }
            reads
        })
    };
    for (i, letter) in letters.iter().take(ROTATIONS).enumerate() {
        let token = letter.to_string().repeat(2000);
        fake.then(Reply::tokens(
            &token,
            Some(&format!("rt-{}", i + 2)),
            Some(300),
        ));
        let s2 = socket.clone();
        tokio::task::spawn_blocking(move || Client::connect(&s2).unwrap().refresh("s"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(std::fs::read_to_string(&token_path).unwrap(), token);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw only whole tokens");
    assert!(reads > 0);

    running.shutdown.cancel();
    running.stopped().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_hears_once_that_the_token_ran_out_while_the_provider_fails() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    // A 2-second token; every later request gets 500 (the end of the script).
    fake.then(Reply::tokens("at-0", Some("rt-1"), Some(2)));
    daemon.import(session("s", &fake, "rt-0")).await.unwrap();

    let events = watch(&daemon);
    wait_for_events(&events, 2).await;
    // Retries go on; the failure is told once.
    fake.wait_for_posts(6, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events[0].token.as_ref().unwrap().access_token.expose(),
        "at-0"
    );
    assert!(events[1].token.is_none());
    assert_eq!(events[1].state, SessionState::Retrying);
    assert_eq!(
        events[1].error.as_ref().map(|e| e.code),
        Some(ErrorCode::TemporarilyUnavailable)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_scoped_token_in_use_is_replaced_ahead_of_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-1", Some("rt-2"), Some(300)));
    daemon.import(session("s", &fake, "rt-1")).await.unwrap();

    // A 3-second down-scoped token is due for replacement after 1.5 s.
    fake.then(Reply::tokens("at-narrow-1", Some("rt-3"), Some(3)));
    let narrow = TokenOptions::new().scope("read");
    assert_eq!(
        get_with(&daemon, narrow.clone()).await.unwrap(),
        "at-narrow-1"
    );
    tokio::time::sleep(Duration::from_millis(1_700)).await;

    // Served from memory at once, and replaced in the background.
    fake.then(Reply::tokens("at-narrow-2", Some("rt-4"), Some(3)));
    assert_eq!(
        get_with(&daemon, narrow.clone()).await.unwrap(),
        "at-narrow-1"
    );
    fake.wait_for_posts(3, WAIT).await;
    wait_until("the replaced token is served", WAIT, || {
        let narrow = narrow.clone();
        let daemon = &daemon;
        async move { get_with(daemon, narrow).await.as_deref() == Ok("at-narrow-2") }
    })
    .await;
    assert_eq!(fake.presented(), ["rt-1", "rt-2", "rt-3"]);
    assert_eq!(daemon.token("s").await, "at-1");
    daemon.stop().await;
}
