//! Fault injection against a scripted token endpoint: the real daemon,
//! in-process, served over its real socket, refreshing against a fake
//! provider that answers what each test scripts. The field cases (B01...)
//! are in FIELD-CASES.md.
//!
//! The fake rotates strictly: a refresh token it has replaced gets
//! `invalid_grant` if it is ever presented again, so a lost rotation or a
//! duplicate refresh shows up as a failed test, not only as a wrong count.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{now_secs, session, test_timing, wait_until, Daemon, FakeIdp, Reply};
use serde_json::json;
use tempfile::TempDir;
use token_agent::schedule::Timing;
use token_agent::store::RefreshToken;
use token_agent_client::proto::{ClientAuth, ErrorCode, ErrorReply, ExpirySource, SessionState};
use token_agent_client::{Client, ClientError};

const SECOND: Duration = Duration::from_secs(1);

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("temporary folder")
}

/// The agent's error reply, which `result` must be.
fn agent_error<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorReply {
    match result {
        Err(ClientError::Agent(reply)) => reply,
        other => panic!("expected an error reply from the agent, got {other:?}"),
    }
}

/// Imports `name` with a token that lives one second and an idle timeout of
/// zero, so the scheduler leaves it to lapse: the next `get` after a second
/// finds it expired and has to refresh on demand.
async fn import_soon_expired(daemon: &Daemon, fake: &FakeIdp, name: &str, rt: &str, next_rt: &str) {
    fake.then(Reply::tokens(
        &format!("{name}-at-1"),
        Some(next_rt),
        Some(1),
    ));
    let mut import = session(name, fake, rt);
    import.idle_timeout_secs = Some(0);
    daemon.import(import).await.expect("import");
}

/// B01: twenty clients ask for an expired token within a few milliseconds
/// while the provider takes 200 ms and rotates strictly. Exactly one POST
/// presents the refresh token, every client gets the token from that one
/// exchange, and the rotated refresh token is the one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_on_expired_token_trigger_single_refresh() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    import_soon_expired(&daemon, &fake, "s1", "rt-0", "rt-1").await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;

    let status = daemon.status("s1").await;
    assert!(
        status.access_expires_at.unwrap() <= now_secs(),
        "not expired yet"
    );
    assert_eq!(fake.post_count(), 1, "the idle session was refreshed ahead");

    fake.then(Reply::tokens("at-2", Some("rt-2"), Some(300)).after(Duration::from_millis(200)));
    const CLIENTS: usize = 20;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let socket = daemon.socket.clone();
            let barrier = barrier.clone();
            tokio::task::spawn_blocking(move || {
                let mut client = Client::connect(&socket).expect("connect");
                barrier.wait();
                client.get("s1", Duration::ZERO)
            })
        })
        .collect();
    for client in clients {
        let token = client.await.unwrap().expect("every client gets a token");
        assert_eq!(token.access_token.expose(), "at-2");
    }

    assert_eq!(
        fake.presented(),
        ["rt-0", "rt-1"],
        "one refresh, not one per client"
    );
    // The store kept rt-2: the next refresh presents it.
    fake.then(Reply::tokens("at-3", Some("rt-3"), Some(300)));
    daemon.refresh("s1").await.expect("refresh with rt-2");
    assert_eq!(fake.presented().last().unwrap(), "rt-2");
    daemon.stop().await;
}

/// B06: GitHub's shapes. A form-encoded success is read (its refresh-token
/// lifetime kept, the token served as `Bearer`), every request asks for
/// JSON, and a dead refresh token reported inside an HTTP 200 is a failed
/// refresh that needs a new sign-in, with the dead token dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_200_with_error_body_is_treated_as_failed_refresh() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;

    fake.then(Reply::raw(
        200,
        Some("application/x-www-form-urlencoded; charset=utf-8"),
        "access_token=ghu_fake2&expires_in=28800&refresh_token=ghr_fake2\
         &refresh_token_expires_in=15811200&scope=&token_type=bearer",
    ));
    let mut import = session("gh", &fake, "ghr_fake1");
    import.client_auth = ClientAuth::Basic;
    daemon
        .import(import)
        .await
        .expect("a form-encoded answer is a success");

    let token = daemon.get("gh").await.expect("token served");
    assert_eq!(token.access_token.expose(), "ghu_fake2");
    assert_eq!(token.token_type, "Bearer");
    let status = daemon.status("gh").await;
    let now = now_secs();
    assert!((now + 28_790..=now + 28_801).contains(&status.access_expires_at.unwrap()));
    let refresh_expires = status
        .refresh_expires_at
        .expect("refresh-token deadline kept");
    assert!((now + 15_811_190..=now + 15_811_201).contains(&refresh_expires));

    fake.then(Reply::json(
        200,
        json!({
            "error": "bad_refresh_token",
            "error_description": "incorrect or expired",
            "error_uri": "https://docs.example/x",
        }),
    ));
    let reply = agent_error(daemon.refresh("gh").await);
    assert_eq!(reply.code, ErrorCode::ReauthRequired);
    assert_eq!(reply.provider_error.unwrap().error, "bad_refresh_token");

    let status = daemon.status("gh").await;
    assert_eq!(status.state, SessionState::NeedsSignIn);
    assert!(!status.has_refresh_token, "the dead refresh token is kept");

    let posts = fake.posts();
    assert_eq!(fake.presented(), ["ghr_fake1", "ghr_fake2"]);
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("cli:s")
    );
    for post in &posts {
        assert_eq!(post.accept.as_deref(), Some("application/json"));
        assert_eq!(post.authorization.as_deref(), Some(basic.as_str()));
        assert_eq!(post.form_value("grant_type"), Some("refresh_token"));
        assert_eq!(post.form_value("client_secret"), None);
    }
    daemon.stop().await;
}

/// B08: an answer without `refresh_token` keeps the one the session had;
/// the next refresh presents it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_response_without_refresh_token_keeps_previous_one() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-1", Some("rt-2"), Some(300)));
    daemon.import(session("s1", &fake, "rt-1")).await.unwrap();

    fake.then(Reply::tokens("at-2", None, Some(300)));
    daemon
        .refresh("s1")
        .await
        .expect("refresh without rotation");
    assert!(daemon.status("s1").await.has_refresh_token);
    assert_eq!(daemon.token("s1").await, "at-2");

    fake.then(Reply::tokens("at-3", Some("rt-3"), Some(300)));
    daemon
        .refresh("s1")
        .await
        .expect("refresh with the kept token");
    assert_eq!(daemon.token("s1").await, "at-3");
    assert_eq!(fake.presented(), ["rt-1", "rt-2", "rt-2"]);
    // The refresh token lives in the store only; memory holds the
    // access token.
    let held = |daemon: &Daemon| {
        let session = daemon.running().agent.sessions.get("s1").unwrap();
        let token = session.record().tokens.refresh_token.clone();
        token
    };
    assert_eq!(held(&daemon), RefreshToken::AtRest);

    // client_secret_post: the credentials travel in the form.
    let first = &fake.posts()[0];
    assert_eq!(first.form_value("client_id"), Some("cli"));
    assert_eq!(first.form_value("client_secret"), Some("s"));
    assert_eq!(first.authorization, None);

    // After a restart the rotated token is read from the store as well.
    daemon.stop().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    assert_eq!(held(&daemon), RefreshToken::AtRest);
    fake.then(Reply::tokens("at-4", None, Some(300)));
    daemon.refresh("s1").await.expect("refresh after a restart");
    assert_eq!(fake.presented(), ["rt-1", "rt-2", "rt-2", "rt-3"]);
    daemon.stop().await;
}

/// B09: an answer without `expires_in` takes the lifetime the provider gave
/// last time (600 s), says so in status, and does not make every `get`
/// refresh again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_expires_in_falls_back_to_last_known_lifetime() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-1", Some("rt-2"), Some(600)));
    daemon.import(session("s1", &fake, "rt-1")).await.unwrap();

    fake.then(Reply::tokens("at-2", Some("rt-3"), None));
    daemon.refresh("s1").await.unwrap();
    let status = daemon.status("s1").await;
    let now = now_secs();
    assert_eq!(status.expiry_source, Some(ExpirySource::PreviousLifetime));
    let expires = status.access_expires_at.unwrap();
    assert!(
        (now + 598..=now + 601).contains(&expires),
        "expires at now{:+} s, not now+600",
        expires as i64 - now as i64
    );

    let tokens = daemon
        .call(|c| {
            (0..50)
                .map(|_| c.get("s1", Duration::ZERO).map(|t| t.access_token))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .expect("50 gets");
    assert!(tokens.iter().all(|t| t.expose() == "at-2"));
    assert_eq!(
        fake.post_count(),
        2,
        "gets refreshed a token with a known lifetime"
    );
    daemon.stop().await;
}

/// An unsigned JWT with the given `iat` and `exp`.
fn jwt(iat: u64, exp: u64) -> String {
    let part = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.sig",
        part(json!({"alg": "none"})),
        part(json!({"sub": "u1", "iat": iat, "exp": exp}))
    )
}

/// B11: the provider's clock is an hour behind ours (its `Date` header and
/// the JWT's `iat`/`exp`). Deadlines count from local receipt: the token is
/// served and valid for about 300 s, whether the lifetime comes from
/// `expires_in` or from the JWT, and no refresh loop starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_ahead_of_idp_does_not_cause_refresh_loop() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;

    let idp_now = SystemTime::now() - Duration::from_secs(3600);
    let iat = idp_now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let date = httpdate::fmt_http_date(idp_now);
    let token = jwt(iat, iat + 300);
    let answer = |expires_in: Option<u64>, rt: &str| {
        let mut body = json!({"access_token": token, "token_type": "Bearer", "refresh_token": rt});
        if let Some(expires_in) = expires_in {
            body["expires_in"] = expires_in.into();
        }
        Reply::json(200, body).header("Date", &date)
    };

    fake.then(answer(Some(300), "rt-2"));
    daemon
        .import(session("stated", &fake, "rt-1"))
        .await
        .unwrap();
    fake.then(answer(None, "rt-b2"));
    daemon
        .import(session("from-jwt", &fake, "rt-b1"))
        .await
        .unwrap();

    for (name, source) in [
        ("stated", ExpirySource::Provider),
        ("from-jwt", ExpirySource::Jwt),
    ] {
        assert_eq!(daemon.token(name).await, token, "{name}: token not served");
        let status = daemon.status(name).await;
        let now = now_secs();
        assert_eq!(status.expiry_source, Some(source), "{name}");
        let expires = status.access_expires_at.unwrap();
        assert!(
            (now + 298..=now + 301).contains(&expires),
            "{name}: expires at now{:+} s, not now+300",
            expires as i64 - now as i64
        );
        assert!(
            status.next_refresh_at.unwrap() >= now + 200,
            "{name}: refresh planned too early"
        );
    }

    tokio::time::sleep(2 * SECOND).await;
    assert_eq!(daemon.token("stated").await, token);
    assert_eq!(daemon.token("from-jwt").await, token);
    assert_eq!(fake.post_count(), 2, "refreshes beyond the two imports");
    daemon.stop().await;
}

/// B12: a dead refresh token (`401 invalid_token`, or Microsoft's
/// `400 invalid_grant` AADSTS700082) answers the waiting `get` at once with
/// `reauth_required` and the provider's error, drops the token, stops
/// refreshing and never asks the provider again. `invalid_client` is the
/// client's fault: `client_misconfigured`, the refresh token kept, nothing
/// retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_refresh_token_fails_fast_with_reauth_required() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;

    let variants = [
        (
            "not-found",
            Reply::oauth_error(401, "invalid_token", Some("refresh token not found")),
            ErrorCode::ReauthRequired,
            "invalid_token",
        ),
        (
            "inactive",
            Reply::json(
                400,
                json!({
                    "error": "invalid_grant",
                    "error_description": "AADSTS700082: refresh token expired due to inactivity",
                    "error_codes": [700082],
                    "suberror": "bad_token",
                }),
            ),
            ErrorCode::ReauthRequired,
            "invalid_grant",
        ),
        (
            "bad-client",
            Reply::oauth_error(401, "invalid_client", None),
            ErrorCode::ClientMisconfigured,
            "invalid_client",
        ),
    ];
    for (name, ..) in &variants {
        import_soon_expired(
            &daemon,
            &fake,
            name,
            &format!("{name}-rt-1"),
            &format!("{name}-rt-2"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1_300)).await;

    for (name, answer, code, oauth_error) in variants {
        let posts_before = fake.post_count();
        fake.then(answer);
        let started = Instant::now();
        let reply = agent_error(daemon.get(name).await);
        assert!(started.elapsed() < 3 * SECOND, "{name}: the answer hung");
        assert_eq!(reply.code, code, "{name}: {}", reply.message);
        let provider_error = reply
            .provider_error
            .expect("the provider's error is passed on");
        assert_eq!(provider_error.error, oauth_error, "{name}");
        assert_eq!(fake.post_count(), posts_before + 1, "{name}");
        assert_eq!(fake.presented().last().unwrap(), &format!("{name}-rt-2"));

        let status = daemon.status(name).await;
        assert_eq!(
            status.issuer, fake.url,
            "{name}: the session's settings are kept"
        );
        assert_eq!(status.next_refresh_at, None, "{name}: still scheduled");
        if code == ErrorCode::ReauthRequired {
            assert_eq!(status.state, SessionState::NeedsSignIn, "{name}");
            assert!(!status.has_refresh_token, "{name}: the dead token is kept");
            let reply = agent_error(daemon.refresh(name).await);
            assert_eq!(reply.code, ErrorCode::ReauthRequired, "{name}");
        } else {
            assert_eq!(status.state, SessionState::ClientMisconfigured, "{name}");
            assert!(
                status.has_refresh_token,
                "{name}: a good refresh token was dropped"
            );
        }
        for _ in 0..3 {
            let reply = agent_error(daemon.get(name).await);
            assert_eq!(reply.code, code, "{name}: a later get");
        }
        assert_eq!(
            fake.post_count(),
            posts_before + 1,
            "{name}: asked the provider again"
        );
    }

    let inactive = fake.posts()[4].clone();
    assert_eq!(inactive.refresh_token.as_deref(), Some("inactive-rt-2"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.post_count(),
        6,
        "a dead session was retried in the background"
    );
    daemon.stop().await;
}

/// B14: an outage — refused connections, a dropped connection, a 503 JSON
/// error, a proxy's HTML 502, a captive portal's HTML 200, an empty 500 —
/// is passing trouble. The valid token keeps being served, the session goes
/// `retrying` (never `needs_sign_in`), each attempt presents the same
/// refresh token, failures are counted, and the first good answer brings
/// the session back to `fresh` with its rotated token used next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idp_outage_with_html_502_keeps_session_and_recovers() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    // A 20 s token refreshed after 1 s; quick retries.
    let timing = Timing {
        refresh_at: 0.05,
        max_jitter_ms: 0,
        min_gap_ms: 100,
        backoff_base_ms: 100,
        backoff_max_ms: 400,
        ..Timing::default()
    };
    let daemon = Daemon::start(dir.path(), timing).await;

    fake.then(Reply::tokens("at-1", Some("rt-1"), Some(20)))
        .then_refuse(Duration::from_millis(1_500))
        .then(Reply::hang_up())
        .then(Reply::oauth_error(503, "temporarily_unavailable", None))
        .then(Reply::raw(
            502,
            Some("text/html"),
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        ))
        .then(Reply::raw(
            200,
            Some("text/html"),
            "<html>login to Wi-Fi</html>",
        ))
        .then(Reply::raw(500, None, ""))
        // Slow, so the failure count is still visible while it is sent.
        .then(Reply::tokens("at-2", Some("rt-new"), Some(300)).after(Duration::from_millis(300)));
    daemon.import(session("s1", &fake, "rt-0")).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(12);
    let mut saw_retrying = false;
    let mut most_failures = 0;
    loop {
        let (token, status) = daemon
            .call(|c| (c.get("s1", Duration::ZERO), c.status("s1").unwrap()))
            .await;
        assert!(
            !matches!(
                status.state,
                SessionState::NeedsSignIn | SessionState::ClientMisconfigured
            ),
            "an outage ended the session: {:?} {:?}",
            status.state,
            status.reason
        );
        saw_retrying |= status.state == SessionState::Retrying;
        most_failures = most_failures.max(status.consecutive_failures);
        let token = token.expect("the valid token is served during the outage");
        if token.access_token.expose() == "at-2" && status.state == SessionState::Fresh {
            break;
        }
        assert_eq!(token.access_token.expose(), "at-1");
        assert!(
            Instant::now() < deadline,
            "no recovery; script left: {}",
            fake.unused_script()
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    assert!(saw_retrying, "never reported retrying");
    assert!(most_failures >= 5, "failures counted: {most_failures}");
    let status = daemon.status("s1").await;
    assert_eq!(status.consecutive_failures, 0);
    assert_eq!(status.reason, None);
    // Five answered failures and the recovery, all with rt-1.
    let presented = fake.presented();
    assert_eq!(presented.len(), 7, "{presented:?}");
    assert!(
        presented[1..].iter().all(|rt| rt == "rt-1"),
        "{presented:?}"
    );

    fake.then(Reply::tokens("at-3", Some("rt-3"), Some(300)));
    daemon.refresh("s1").await.unwrap();
    assert_eq!(fake.presented().last().unwrap(), "rt-new");
    daemon.stop().await;
}

/// B17: the provider says `work`'s refresh token was claimed by another
/// client (`invalid_request`). Only `work` needs a new sign-in; `lab`, same
/// client, stays fresh, served and refreshable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn superseded_session_marked_without_touching_sibling() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    for (name, rt, at, next_rt) in [
        ("work", "rt-a0", "at-w1", "rt-a"),
        ("lab", "rt-b0", "at-l1", "rt-b"),
    ] {
        fake.then(Reply::tokens(at, Some(next_rt), Some(300)));
        let mut import = session(name, &fake, rt);
        import.client_id = "kube".into();
        daemon.import(import).await.unwrap();
    }

    fake.then(Reply::oauth_error(
        400,
        "invalid_request",
        Some("Refresh token is invalid or has already been claimed by another client."),
    ));
    let reply = agent_error(daemon.refresh("work").await);
    assert_eq!(reply.code, ErrorCode::ReauthRequired);
    assert_eq!(reply.provider_error.unwrap().error, "invalid_request");
    let work = daemon.status("work").await;
    assert_eq!(work.state, SessionState::NeedsSignIn);
    assert!(!work.has_refresh_token);
    assert!(work.reason.unwrap().contains("claimed by another client"));

    let lab = daemon.status("lab").await;
    assert_eq!(lab.state, SessionState::Fresh);
    assert!(lab.has_refresh_token);
    assert_eq!(daemon.token("lab").await, "at-l1");
    fake.then(Reply::tokens("at-l2", Some("rt-b2"), Some(300)));
    daemon
        .refresh("lab")
        .await
        .expect("the sibling still refreshes");
    assert_eq!(daemon.token("lab").await, "at-l2");
    assert_eq!(fake.presented(), ["rt-a0", "rt-b0", "rt-a", "rt-b"]);
    daemon.stop().await;
}

/// 429 with `Retry-After: 2`: the session goes `retrying`, the next attempt
/// waits at least the two seconds, and meanwhile a `get` for the expired
/// token is answered `temporarily_unavailable` at once, without a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limited_refresh_honours_retry_after() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;

    // A one-second token: the scheduler refreshes it after half a second.
    fake.then(Reply::tokens("at-1", Some("rt-1"), Some(1)))
        .then(Reply::raw(429, Some("text/plain"), "slow down").header("Retry-After", "2"))
        .then(Reply::tokens("at-2", Some("rt-2"), Some(300)));
    daemon.import(session("s1", &fake, "rt-0")).await.unwrap();

    fake.wait_for_posts(2, 3 * SECOND).await;
    wait_until("retrying", 3 * SECOND, || async {
        daemon.status("s1").await.state == SessionState::Retrying
    })
    .await;
    let status = daemon.status("s1").await;
    assert_eq!(status.consecutive_failures, 1);
    assert!(status.reason.unwrap().contains("429"));

    // Once at-1 has expired, gets are told to come back, without a request.
    let deadline = Instant::now() + 3 * SECOND;
    let reply = loop {
        match daemon.get("s1").await {
            Ok(token) => assert_eq!(token.access_token.expose(), "at-1"),
            Err(err) => break agent_error::<()>(Err(err)),
        }
        assert!(Instant::now() < deadline, "at-1 never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        reply.code,
        ErrorCode::TemporarilyUnavailable,
        "{}",
        reply.message
    );
    assert!(reply.retry_at.is_some());
    assert_eq!(fake.post_count(), 2, "a get during the wait sent a request");

    fake.wait_for_posts(3, 5 * SECOND).await;
    let posts = fake.posts();
    let waited = posts[2].at - posts[1].at;
    assert!(
        waited >= Duration::from_millis(1_900),
        "retried after {waited:?}, despite Retry-After: 2"
    );
    assert_eq!(posts[2].refresh_token.as_deref(), Some("rt-1"));
    wait_until("fresh again", 3 * SECOND, || async {
        daemon.status("s1").await.state == SessionState::Fresh
    })
    .await;
    assert_eq!(daemon.token("s1").await, "at-2");
    daemon.stop().await;
}

/// B03: a rotated refresh token survives a restart. The new daemon on the
/// same store serves the stored token without a request, and its next
/// refresh presents the rotated token, not a spent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotated_refresh_token_survives_restart() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-1", Some("rt-2"), Some(300)))
        .then(Reply::tokens("at-2", Some("rt-3"), Some(300)));
    daemon.import(session("s1", &fake, "rt-1")).await.unwrap();
    daemon.refresh("s1").await.unwrap();
    daemon.stop().await;

    let daemon = Daemon::start(dir.path(), test_timing()).await;
    let status = daemon.status("s1").await;
    assert_eq!(status.state, SessionState::Fresh);
    assert!(status.has_refresh_token);
    assert_eq!(daemon.token("s1").await, "at-2");
    assert_eq!(fake.post_count(), 2, "the restart sent a refresh");

    fake.then(Reply::tokens("at-3", Some("rt-4"), Some(300)));
    daemon.refresh("s1").await.expect("refresh after restart");
    assert_eq!(fake.presented(), ["rt-1", "rt-2", "rt-3"]);
    daemon.stop().await;
}

/// Sends a `refresh` for `name` and hangs up after 200 ms, before the
/// provider has answered.
async fn refresh_and_hang_up(daemon: &Daemon, name: &str) {
    let name = name.to_string();
    let result = daemon
        .call(move |c| {
            c.set_timeout(Duration::from_millis(200)).unwrap();
            c.refresh(&name)
        })
        .await;
    assert!(
        matches!(result, Err(ClientError::Protocol(_))),
        "the client was answered before hanging up: {result:?}"
    );
}

/// A slow provider (1 s) and a client that hangs up while waiting: the
/// refresh is not cancelled with the connection; its rotated token is
/// stored and served, and the next refresh presents it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_hanging_up_does_not_lose_a_slow_rotation() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-1", Some("rt-2"), Some(300)))
        .then(Reply::tokens("at-2", Some("rt-3"), Some(300)).after(SECOND));
    daemon.import(session("s1", &fake, "rt-1")).await.unwrap();

    refresh_and_hang_up(&daemon, "s1").await;
    wait_until("the slow answer to be stored", 5 * SECOND, || async {
        daemon.token("s1").await == "at-2"
    })
    .await;
    assert_eq!(daemon.status("s1").await.state, SessionState::Fresh);

    fake.then(Reply::tokens("at-3", Some("rt-4"), Some(300)));
    daemon
        .refresh("s1")
        .await
        .expect("refresh with the rotated token");
    assert_eq!(fake.presented(), ["rt-1", "rt-2", "rt-3"]);
    daemon.stop().await;
}

/// B03 at shutdown: the daemon is stopped while a slow refresh is in
/// flight. Shutdown waits for the answer and stores it, so the next daemon
/// presents the rotated token and does not see an interrupted refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_waits_for_a_refresh_in_flight_and_stores_it() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-1", Some("rt-2"), Some(300)))
        .then(Reply::tokens("at-2", Some("rt-3"), Some(300)).after(SECOND));
    daemon.import(session("s1", &fake, "rt-1")).await.unwrap();

    refresh_and_hang_up(&daemon, "s1").await;
    assert_eq!(fake.post_count(), 2, "the refresh was sent");
    daemon.stop().await;

    let daemon = Daemon::start(dir.path(), test_timing()).await;
    let status = daemon.status("s1").await;
    assert_eq!(status.state, SessionState::Fresh);
    assert_eq!(daemon.token("s1").await, "at-2");
    assert_eq!(fake.post_count(), 2, "the restart sent a refresh");
    fake.then(Reply::tokens("at-3", Some("rt-4"), Some(300)));
    daemon.refresh("s1").await.expect("refresh after restart");
    assert_eq!(fake.presented(), ["rt-1", "rt-2", "rt-3"]);
    daemon.stop().await;
}

/// B12, `invalid_client` is terminal for the client: every session of that
/// client (same token endpoint and client id) is flagged
/// `client_misconfigured` with its refresh token kept, and none of them
/// asks the provider again until it is imported with a fixed client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_client_flags_every_session_of_that_client() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    for (name, rt, next_rt) in [("one", "rt-a0", "rt-a1"), ("two", "rt-b0", "rt-b1")] {
        fake.then(Reply::tokens(
            &format!("{name}-at"),
            Some(next_rt),
            Some(300),
        ));
        daemon.import(session(name, &fake, rt)).await.unwrap();
    }

    fake.then(Reply::oauth_error(401, "invalid_client", None));
    let reply = agent_error(daemon.refresh("one").await);
    assert_eq!(reply.code, ErrorCode::ClientMisconfigured);

    let two = daemon.status("two").await;
    assert_eq!(two.state, SessionState::ClientMisconfigured);
    assert!(two.has_refresh_token);
    assert_eq!(two.next_refresh_at, None);
    assert_eq!(fake.post_count(), 3);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------
// The rest of the provider's repertoire (RELIABILITY.md)
// ---------------------------------------------------------------------------

/// An import that hands over a valid access token (`at-0`, 300 s), so the
/// session exists without asking the provider; its own client id keeps an
/// `invalid_client` from flagging the other sessions.
fn adopted(name: &str, fake: &FakeIdp) -> token_agent_client::proto::ImportSession {
    let mut import = session(name, fake, &format!("{name}-rt-0"));
    import.client_id = format!("cli-{name}");
    import.access_token = Some(token_agent_client::proto::Secret::new("at-0"));
    import.expires_in = Some(300);
    import
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Retried with backoff; the valid token keeps being served.
    Retry,
    /// Stopped: the refresh token is dead.
    SignIn,
    /// Stopped: the client is refused; the refresh token is kept.
    Client,
}

/// Every failing answer on the list gets its outcome: a retry with the
/// valid token still served and the same refresh token presented next, or
/// a stop with a clear reason and no further request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_failing_answer_gets_its_outcome() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    let html = |status: u16, title: &str| {
        Reply::raw(
            status,
            Some("text/html; charset=utf-8"),
            &format!("<!DOCTYPE html><html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"),
        )
    };
    let cases = [
        (
            "html-500",
            html(500, "500 Internal Server Error"),
            Outcome::Retry,
        ),
        ("html-502", html(502, "502 Bad Gateway"), Outcome::Retry),
        (
            "html-503",
            html(503, "503 Service Unavailable"),
            Outcome::Retry,
        ),
        (
            "not-json",
            Reply::raw(200, Some("application/json"), "<<<not json>>>"),
            Outcome::Retry,
        ),
        (
            "no-access-token",
            Reply::json(
                200,
                json!({"token_type": "Bearer", "refresh_token": "x-rt", "expires_in": 300}),
            ),
            Outcome::Retry,
        ),
        (
            "invalid-grant",
            Reply::oauth_error(400, "invalid_grant", Some("Token is not active")),
            Outcome::SignIn,
        ),
        (
            "extra-fields",
            Reply::json(
                400,
                json!({
                    "error": "invalid_grant",
                    "error_description": "Stale token",
                    "error_uri": "https://idp.example/errors/stale",
                    "trace_id": "4a1c0e", "correlation_id": "8f2d", "timestamp": "2026-01-01 00:00:00Z",
                    "error_codes": [70008], "details": {"nested": [1, 2, 3]},
                }),
            ),
            Outcome::SignIn,
        ),
        (
            "invalid-client",
            Reply::oauth_error(401, "invalid_client", Some("bad secret")),
            Outcome::Client,
        ),
        (
            "unauthorized-client",
            Reply::oauth_error(400, "unauthorized_client", None),
            Outcome::Client,
        ),
        (
            "client-extra-fields",
            Reply::json(
                401,
                json!({"error": "invalid_client", "error_description": "x", "foo": {"bar": null}}),
            ),
            Outcome::Client,
        ),
    ];
    for (name, ..) in &cases {
        daemon.import(adopted(name, &fake)).await.expect("adopt");
    }

    for (name, answer, expected) in cases {
        fake.then(answer);
        let reply = agent_error(daemon.refresh(name).await);
        let status = daemon.status(name).await;
        let posts = fake.post_count();
        match expected {
            Outcome::Retry => {
                assert_eq!(
                    reply.code,
                    ErrorCode::TemporarilyUnavailable,
                    "{name}: {}",
                    reply.message
                );
                assert!(reply.retry_at.is_some(), "{name}: no retry time");
                assert_eq!(status.state, SessionState::Retrying, "{name}");
                assert!(status.next_refresh_at.is_some(), "{name}: not retried");
                assert_eq!(
                    daemon.token(name).await,
                    "at-0",
                    "{name}: valid token not served"
                );
                // The retry presents the same refresh token.
                fake.then(Reply::tokens(
                    "at-1",
                    Some(&format!("{name}-rt-1")),
                    Some(300),
                ));
                daemon.refresh(name).await.expect("the retry succeeds");
                assert_eq!(
                    fake.presented().last().unwrap(),
                    &format!("{name}-rt-0"),
                    "{name}"
                );
                assert_eq!(
                    daemon.status(name).await.state,
                    SessionState::Fresh,
                    "{name}"
                );
            }
            Outcome::SignIn => {
                assert_eq!(
                    reply.code,
                    ErrorCode::ReauthRequired,
                    "{name}: {}",
                    reply.message
                );
                assert_eq!(
                    reply.provider_error.unwrap().error,
                    "invalid_grant",
                    "{name}"
                );
                assert_eq!(status.state, SessionState::NeedsSignIn, "{name}");
                assert!(status.reason.is_some(), "{name}: no reason");
                assert!(!status.has_refresh_token, "{name}");
                assert_eq!(
                    agent_error(daemon.get(name).await).code,
                    ErrorCode::ReauthRequired
                );
                assert_eq!(fake.post_count(), posts, "{name}: asked again");
            }
            Outcome::Client => {
                assert_eq!(
                    reply.code,
                    ErrorCode::ClientMisconfigured,
                    "{name}: {}",
                    reply.message
                );
                assert_eq!(status.state, SessionState::ClientMisconfigured, "{name}");
                assert!(
                    status.reason.unwrap().contains(&format!("cli-{name}")),
                    "{name}"
                );
                assert!(
                    status.has_refresh_token,
                    "{name}: a good refresh token was dropped"
                );
                assert_eq!(status.next_refresh_at, None, "{name}");
                assert_eq!(fake.post_count(), posts, "{name}: asked again");
            }
        }
    }
    daemon.stop().await;
}

/// Successful answers in every odd shape: `expires_in` as a string, zero,
/// negative or missing (then the documented default, 300 s or
/// `--default-lifetime`, and status says `default`), `token_type` in any
/// case. Each is served as `Bearer` with a sane expiry, and none starts a
/// refresh loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn odd_success_shapes_are_served_with_a_sane_expiry() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    let body = |expires_in: serde_json::Value, token_type: &str, rt: &str| {
        let mut body = json!({"access_token": format!("at-{rt}"), "token_type": token_type, "refresh_token": rt});
        if !expires_in.is_null() {
            body["expires_in"] = expires_in;
        }
        Reply::json(200, body)
    };
    let cases = [
        (
            "string",
            body(json!("600"), "Bearer", "r1"),
            600,
            ExpirySource::Provider,
        ),
        (
            "float",
            body(json!(600.0), "Bearer", "r2"),
            600,
            ExpirySource::Provider,
        ),
        (
            "zero",
            body(json!(0), "Bearer", "r3"),
            300,
            ExpirySource::Default,
        ),
        (
            "negative",
            body(json!(-30), "Bearer", "r4"),
            300,
            ExpirySource::Default,
        ),
        (
            "missing",
            body(serde_json::Value::Null, "Bearer", "r5"),
            300,
            ExpirySource::Default,
        ),
        (
            "lower",
            body(json!(600), "bearer", "r6"),
            600,
            ExpirySource::Provider,
        ),
        (
            "upper",
            body(json!(600), "BEARER", "r7"),
            600,
            ExpirySource::Provider,
        ),
        (
            "mixed",
            body(json!(600), "BeArEr", "r8"),
            600,
            ExpirySource::Provider,
        ),
    ];
    for (name, answer, lifetime, source) in cases {
        fake.then(answer);
        daemon
            .import(session(name, &fake, &format!("{name}-rt-0")))
            .await
            .expect(name);
        let token = daemon.get(name).await.expect(name);
        assert_eq!(token.token_type, "Bearer", "{name}");
        let status = daemon.status(name).await;
        assert_eq!(status.expiry_source, Some(source), "{name}");
        let now = now_secs();
        let expires = status.access_expires_at.unwrap();
        assert!(
            (now + lifetime - 3..=now + lifetime + 1).contains(&expires),
            "{name}: expires at now{:+} s, not now+{lifetime}",
            expires as i64 - now as i64
        );
        assert!(
            status.next_refresh_at.unwrap() > now + lifetime / 2,
            "{name}: refresh planned too early"
        );
    }
    let posts = fake.post_count();
    tokio::time::sleep(SECOND).await;
    for name in ["zero", "negative", "missing"] {
        daemon.token(name).await;
    }
    assert_eq!(fake.post_count(), posts, "a refresh loop started");
    daemon.stop().await;
}

/// A token endpoint that cannot be reached: a host name that does not
/// resolve (`.invalid` never does), and TLS spoken to a plain-HTTP
/// listener. Both are passing trouble: the session is kept, `retrying`
/// with the reason, retried with backoff, never `needs_sign_in`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unresolvable_host_and_tls_failure_are_retried() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    // Plain HTTP where TLS is expected: the handshake fails at once.
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = plain.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = plain.accept().await {
            let mut hello = [0u8; 512];
            let _ = stream.read(&mut hello).await;
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    for (name, endpoint) in [
        ("dns", "http://token.invalid/token".to_string()),
        ("tls", format!("https://127.0.0.1:{port}/token")),
    ] {
        let mut import = session(name, &fake, "rt-0");
        import.token_endpoint = Some(endpoint);
        let started = Instant::now();
        let reply = agent_error(daemon.import(import).await);
        assert!(started.elapsed() < 8 * SECOND, "{name}: the import hung");
        assert_eq!(
            reply.code,
            ErrorCode::TemporarilyUnavailable,
            "{name}: {}",
            reply.message
        );
        let status = daemon.status(name).await;
        assert!(
            matches!(
                status.state,
                SessionState::Retrying | SessionState::Refreshing
            ),
            "{name}: {:?}",
            status.state
        );
        assert!(status.has_refresh_token, "{name}");
        println!("{name}: {}", status.reason.clone().unwrap_or_default());
        // Retried in the background with backoff, and still not given up.
        wait_until(&format!("{name} retried"), 5 * SECOND, || async {
            daemon.status(name).await.consecutive_failures >= 2
        })
        .await;
        let status = daemon.status(name).await;
        assert_ne!(status.state, SessionState::NeedsSignIn, "{name}");
        assert!(status.reason.is_some(), "{name}: no reason in status");
    }
    assert_eq!(fake.post_count(), 0, "TLS reached the fake's HTTP handler");
    daemon.stop().await;
}

/// The provider sends its head and half a body, then stalls. With a short
/// provider timeout the refresh fails as passing trouble within that time,
/// the valid token is served meanwhile, and the next attempt presents the
/// same refresh token and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_stalls_times_out_and_is_retried() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let mut config = common::config(dir.path(), test_timing());
    config.provider_timeout = SECOND;
    let daemon = Daemon::start_with(config).await;
    daemon.import(adopted("s1", &fake)).await.unwrap();

    fake.then(Reply::tokens("at-x", Some("rt-x"), Some(300)).stalled());
    let started = Instant::now();
    let reply = agent_error(daemon.refresh("s1").await);
    let took = started.elapsed();
    assert!(
        took < 3 * SECOND,
        "the stalled answer held the refresh {took:?}"
    );
    assert_eq!(
        reply.code,
        ErrorCode::TemporarilyUnavailable,
        "{}",
        reply.message
    );
    let status = daemon.status("s1").await;
    assert_eq!(status.state, SessionState::Retrying);
    println!("stalled body: {}", status.reason.clone().unwrap());
    assert_eq!(daemon.token("s1").await, "at-0");

    fake.then(Reply::tokens("at-1", Some("s1-rt-1"), Some(300)));
    daemon.refresh("s1").await.expect("the retry succeeds");
    assert_eq!(fake.presented(), ["s1-rt-0", "s1-rt-0"]);
    assert_eq!(daemon.token("s1").await, "at-1");
    daemon.stop().await;
}

/// 429 with `Retry-After` as an HTTP date three seconds ahead: the next
/// attempt waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limited_refresh_honours_retry_after_as_a_date() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    daemon.import(adopted("s1", &fake)).await.unwrap();

    let date = httpdate::fmt_http_date(SystemTime::now() + 3 * SECOND);
    fake.then(
        Reply::raw(429, Some("text/plain"), "Too Many Requests").header("Retry-After", &date),
    )
    .then(Reply::tokens("at-1", Some("s1-rt-1"), Some(300)));
    let reply = agent_error(daemon.refresh("s1").await);
    assert_eq!(reply.code, ErrorCode::TemporarilyUnavailable);
    let retry_at = reply.retry_at.expect("retry time");
    assert!(
        retry_at > now_secs(),
        "retry at now{:+}",
        retry_at as i64 - now_secs() as i64
    );
    assert_eq!(daemon.token("s1").await, "at-0");

    fake.wait_for_posts(2, 6 * SECOND).await;
    let posts = fake.posts();
    let waited = posts[1].at - posts[0].at;
    assert!(
        waited >= Duration::from_millis(1_900),
        "retried after {waited:?}, despite Retry-After"
    );
    assert_eq!(posts[1].refresh_token.as_deref(), Some("s1-rt-0"));
    wait_until("fresh again", 3 * SECOND, || async {
        daemon.status("s1").await.state == SessionState::Fresh
    })
    .await;
    daemon.stop().await;
}

/// A ten-minute outage, compressed: twenty sessions whose tokens come due
/// while the provider refuses every connection for six seconds, with the
/// backoff capped at 500 ms (ten minutes at a 50 s cap, scaled). No
/// session is marked as needing sign-in, and every one is refreshed
/// within one backoff step of the provider's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_outage_ends_with_every_session_refreshed_within_one_backoff_step() {
    const SESSIONS: usize = 20;
    const OUTAGE: Duration = Duration::from_secs(6);
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let timing = Timing {
        max_jitter_ms: 0,
        min_gap_ms: 100,
        backoff_base_ms: 100,
        backoff_max_ms: 500,
        ..Timing::default()
    };
    let daemon = Daemon::start(dir.path(), timing).await;
    for i in 0..SESSIONS {
        // Two-second tokens: each comes due a second after its import.
        fake.then(Reply::tokens(
            &format!("at-{i}-1"),
            Some(&format!("rt-{i}-1")),
            Some(2),
        ));
    }
    fake.then_refuse(OUTAGE);
    for i in 0..SESSIONS {
        fake.then(Reply::tokens(
            &format!("at-{i}-2"),
            Some(&format!("rt-{i}-2")),
            Some(300),
        ));
    }
    for i in 0..SESSIONS {
        daemon
            .import(session(&format!("s{i}"), &fake, &format!("rt-{i}-0")))
            .await
            .unwrap();
    }

    // Through the outage: never needs sign-in.
    let mut most_failures = 0;
    while fake.outages().is_empty() {
        for i in (0..SESSIONS).step_by(5) {
            let status = daemon.status(&format!("s{i}")).await;
            assert!(
                !matches!(
                    status.state,
                    SessionState::NeedsSignIn | SessionState::ClientMisconfigured
                ),
                "s{i} ended by an outage: {:?}",
                status.reason
            );
            most_failures = most_failures.max(status.consecutive_failures);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, back) = fake.outages()[0];
    wait_until("every session fresh", 5 * SECOND, || async {
        let statuses = daemon.call(|c| c.list().unwrap()).await;
        statuses.iter().all(|s| s.state == SessionState::Fresh)
    })
    .await;

    // Each session's first good refresh after the outage came within one
    // backoff step (500 ms) of the provider's return, plus scheduling slack.
    let posts = fake.posts();
    let mut worst = Duration::ZERO;
    for i in 0..SESSIONS {
        let rt = format!("rt-{i}-1");
        let recovered = posts
            .iter()
            .find(|p| p.at >= back && p.refresh_token.as_deref() == Some(&rt))
            .unwrap_or_else(|| panic!("s{i} was not refreshed after the outage"));
        worst = worst.max(recovered.at - back);
        let token = daemon.token(&format!("s{i}")).await;
        assert!(
            token.ends_with("-2"),
            "s{i} serves {token}, not a token from after the outage"
        );
    }
    println!(
        "outage of {OUTAGE:?}: {SESSIONS} sessions, most consecutive failures {most_failures}, \
         last session refreshed {worst:?} after recovery (one backoff step: 500 ms)"
    );
    assert!(
        worst <= Duration::from_millis(800),
        "a session waited {worst:?} after recovery"
    );
    assert!(
        most_failures >= 5,
        "the outage was not felt: {most_failures} failures"
    );
    for status in daemon.call(|c| c.list().unwrap()).await {
        assert_eq!(status.consecutive_failures, 0, "{}", status.name);
        assert!(status.has_refresh_token, "{}", status.name);
    }
    daemon.stop().await;
}

/// A token that lapses while the provider fails: no `get` after its
/// wall-clock expiry is served it, however the timers stand.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_never_serves_a_token_past_its_wall_clock_expiry() {
    let fake = FakeIdp::start().await;
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    let mut import = adopted("s1", &fake);
    import.expires_in = Some(1);
    import.idle_timeout_secs = Some(0);
    daemon.import(import).await.unwrap();
    let imported = Instant::now();
    for _ in 0..50 {
        fake.then(Reply::oauth_error(503, "temporarily_unavailable", None));
    }

    let mut served = 0;
    let mut refused = 0;
    while imported.elapsed() < Duration::from_millis(2_500) {
        let asked = Instant::now();
        match daemon.get("s1").await {
            Ok(token) => {
                assert!(
                    asked < imported + SECOND,
                    "served a token {:?} after its expiry",
                    asked - (imported + SECOND)
                );
                assert_eq!(token.access_token.expose(), "at-0");
                served += 1;
            }
            Err(err) => {
                assert_eq!(
                    agent_error::<()>(Err(err)).code,
                    ErrorCode::TemporarilyUnavailable
                );
                refused += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        served > 0 && refused > 0,
        "served {served}, refused {refused}"
    );
    daemon.stop().await;
}
