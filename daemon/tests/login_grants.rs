//! What `tokenctl login` hands the agent, against a scripted provider:
//! service accounts renewed with `grant_type=client_credentials`, logout
//! revoking at the provider, and the provider quirks the agent itself
//! meets after a sign-in (Entra, Keycloak). The sign-in side of the quirks
//! (RFC 8628 polling answers, GitHub's form answers, Google's missing
//! refresh token) is tested in `client/src/login`.

mod common;

use common::{now_secs, session, test_timing, Daemon, FakeIdp, Reply};
use serde_json::json;
use token_agent_client::proto::{ErrorCode, Grant, Identity, SessionState};
use token_agent_client::ClientError;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary folder")
}

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Agent(reply)) => reply.code,
        other => panic!("expected an error reply from the agent, got {other:?}"),
    }
}

/// A service account as `tokenctl login --flow client-credentials` imports
/// it: the access token it got, no refresh token.
fn service_account(name: &str, fake: &FakeIdp) -> token_agent_client::proto::ImportSession {
    let mut import = session(name, fake, "");
    import.grant = Grant::ClientCredentials;
    import.scopes = vec!["api.read".into()];
    import.access_token = Some(token_agent_client::proto::Secret::new("svc-at-1"));
    import.expires_in = Some(300);
    import
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_account_is_renewed_with_its_client_credentials() {
    let dir = tempdir();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;

    daemon
        .import(service_account("svc", &fake))
        .await
        .expect("import");
    assert_eq!(daemon.token("svc").await, "svc-at-1");
    assert_eq!(fake.post_count(), 0, "the token handed over is used as is");

    fake.then(Reply::tokens("svc-at-2", None, Some(300)));
    fake.then(Reply::tokens("svc-at-3", None, Some(300)));
    for expected in ["svc-at-2", "svc-at-3"] {
        daemon.refresh("svc").await.expect("renewal");
        assert_eq!(daemon.token("svc").await, expected);
    }

    for post in fake.posts() {
        assert_eq!(post.form_value("grant_type"), Some("client_credentials"));
        assert_eq!(post.form_value("scope"), Some("api.read"));
        assert_eq!(post.form_value("client_secret"), Some("s"));
        assert!(post.refresh_token.is_none());
    }
    let status = daemon.status("svc").await;
    assert_eq!(status.grant, Grant::ClientCredentials);
    assert_eq!(status.state, SessionState::Fresh);
    assert!(!status.has_refresh_token);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_service_account_is_a_client_problem_not_a_dead_token() {
    let dir = tempdir();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    daemon
        .import(service_account("svc", &fake))
        .await
        .expect("import");

    fake.then(Reply::oauth_error(401, "invalid_client", None));
    assert_eq!(
        code(daemon.refresh("svc").await),
        ErrorCode::ClientMisconfigured
    );
    let status = daemon.status("svc").await;
    assert_eq!(status.state, SessionState::ClientMisconfigured);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_account_without_a_secret_is_refused_at_import() {
    let dir = tempdir();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    let mut import = service_account("svc", &fake);
    import.client_secret = None;
    import.client_auth = token_agent_client::proto::ClientAuth::None;
    assert_eq!(code(daemon.import(import).await), ErrorCode::BadRequest);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logout_revokes_the_current_refresh_token_then_removes_the_session() {
    let dir = tempdir();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;

    let mut import = session("work", &fake, "rt-1");
    import.revocation_endpoint = Some(format!("{}/revoke", fake.url));
    import.identity = Some(Identity {
        sub: Some("u-1".into()),
        preferred_username: Some("alice".into()),
        email: None,
    });
    fake.then(Reply::tokens("at-2", Some("rt-2"), Some(300)));
    daemon.import(import).await.expect("import");
    let status = daemon.status("work").await;
    assert_eq!(
        status.identity.as_ref().and_then(|i| i.display_name()),
        Some("alice")
    );

    fake.then(Reply::raw(200, None, ""));
    let message = daemon.call(|c| c.logout("work")).await.expect("logout");
    assert!(message.contains("revoked"), "{message}");

    let revoked = fake
        .inner_requests()
        .into_iter()
        .find(|r| r.path == "/revoke")
        .expect("a revocation request");
    assert_eq!(revoked.form_value("token"), Some("rt-2"));
    assert_eq!(revoked.form_value("token_type_hint"), Some("refresh_token"));
    assert_eq!(code(daemon.get("work").await), ErrorCode::NoSuchSession);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logout_without_a_revocation_endpoint_says_the_token_stays_valid() {
    let dir = tempdir();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-2", Some("rt-2"), Some(300)));
    daemon
        .import(session("work", &fake, "rt-1"))
        .await
        .expect("import");

    let message = daemon.call(|c| c.logout("work")).await.expect("logout");
    assert!(message.contains("not revoked"), "{message}");
    assert_eq!(fake.post_count(), 1, "only the import's refresh");
    daemon.stop().await;
}

/// Microsoft Entra: `scope` is required on every refresh, and the v1
/// endpoints send `expires_in` as a string.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entra_gets_the_scope_on_refresh_and_a_string_expires_in_is_read() {
    let dir = tempdir();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;

    let mut import = session("entra", &fake, "rt-1");
    import.scopes = vec![
        "https://graph.microsoft.com/.default".into(),
        "offline_access".into(),
    ];
    fake.then(Reply::json(
        200,
        json!({"access_token": "at-2", "token_type": "Bearer", "expires_in": "3599",
               "ext_expires_in": "3599", "refresh_token": "rt-2"}),
    ));
    daemon.import(import).await.expect("import");

    let post = &fake.posts()[0];
    assert_eq!(
        post.form_value("scope"),
        Some("https://graph.microsoft.com/.default offline_access")
    );
    let status = daemon.status("entra").await;
    let left = status.access_expires_at.unwrap() - now_secs();
    assert!((3590..=3600).contains(&left), "{left}");
    daemon.stop().await;
}

/// Keycloak: `refresh_expires_in` is the refresh token's own deadline (the
/// SSO session's idle limit), shown so the user can sign in again before
/// it; an SSO session that ends early anyway answers `invalid_grant`
/// ("Session not active"), which needs a new sign-in at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keycloak_refresh_deadline_is_kept_and_an_ended_sso_session_needs_sign_in() {
    let dir = tempdir();
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir.path(), test_timing()).await;

    fake.then(Reply::json(
        200,
        json!({"access_token": "at-2", "token_type": "Bearer", "expires_in": 300,
               "refresh_expires_in": 1800, "refresh_token": "rt-2"}),
    ));
    daemon
        .import(session("kc", &fake, "rt-1"))
        .await
        .expect("import");
    let status = daemon.status("kc").await;
    let left = status.refresh_expires_at.unwrap() - now_secs();
    assert!((1790..=1800).contains(&left), "{left}");

    fake.then(Reply::oauth_error(
        400,
        "invalid_grant",
        Some("Session not active"),
    ));
    let refused = daemon.refresh("kc").await;
    assert_eq!(code(refused), ErrorCode::ReauthRequired);
    let status = daemon.status("kc").await;
    assert_eq!(status.state, SessionState::NeedsSignIn);
    assert!(!status.has_refresh_token);

    // An offline token (refresh_expires_in 0) has no deadline.
    fake.then(Reply::json(
        200,
        json!({"access_token": "at-9", "token_type": "Bearer", "expires_in": 300,
               "refresh_expires_in": 0, "refresh_token": "rt-9"}),
    ));
    let mut offline = session("kc", &fake, "rt-8");
    offline.replace = true;
    daemon.import(offline).await.expect("import");
    assert_eq!(daemon.status("kc").await.refresh_expires_at, None);
    daemon.stop().await;
}
