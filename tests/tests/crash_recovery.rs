//! What happens when the agent dies between sending a refresh and storing
//! its answer. The crash is staged exactly: the agent is killed, the store
//! is given the in-flight marker a refresh leaves while its request is out,
//! and, for the lost-answer case, the provider is made to consume the
//! refresh token as the lost request would have.

mod common;

use std::time::Duration;

use common::{Provider, Workspace};
use token_agent::store::{InFlight, Store};
use token_agent_client::proto::SessionState;
use token_agent_client::Client;

/// Marks `name` as having a refresh in flight and returns its refresh token.
fn stage_refresh_in_flight(ws: &Workspace, name: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = Store::open(&ws.store(), None).expect("open the dead agent's store");
    let mut record = store
        .load_all()
        .unwrap()
        .into_iter()
        .find(|r| &*r.name == name)
        .expect("the session is stored");
    record.refresh_in_flight = Some(Box::new(InFlight {
        generation: record.generation,
        started_at: 0,
    }));
    runtime.block_on(store.save(&record)).unwrap();
    store
        .refresh_token(name)
        .unwrap()
        .expect("the session has a refresh token")
        .expose()
        .to_string()
}

#[test]
fn an_interrupted_refresh_is_retried_at_once_after_restart() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let mut agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);
    agent.kill_hard();

    // The request never reached the provider: the stored token still works.
    stage_refresh_in_flight(&ws, "work");
    provider.reset_stats();
    let agent = ws.start_agent(&[]);

    common::wait_until(
        Duration::from_secs(10),
        "the retry reaches the provider",
        || provider.stats()["refresh_requests"] == 1,
    );
    let mut client = Client::connect(&ws.socket()).unwrap();
    common::wait_until(
        Duration::from_secs(10),
        "the session is fresh again",
        || client.status("work").unwrap().state == SessionState::Fresh,
    );
    let token = client.get("work", Duration::from_secs(20)).unwrap();
    assert!(provider.is_active(token.access_token.expose()));
    assert!(agent
        .log_text()
        .contains("stopped during this session's refresh"));
}

#[test]
fn a_refresh_answer_lost_with_the_agent_is_reported_as_such() {
    let provider = Provider::start(30);
    let ws = Workspace::new();
    let mut agent = ws.start_agent(&[]);
    ws.import(&provider, "work", &[]);
    agent.kill_hard();

    // The request did reach the provider, which rotated the token; the
    // answer died with the agent.
    let refresh_token = stage_refresh_in_flight(&ws, "work");
    let consumed = provider.refresh_directly(&refresh_token);
    assert!(consumed["refresh_token"].is_string(), "{consumed}");

    let _agent = ws.start_agent(&[]);
    let mut client = Client::connect(&ws.socket()).unwrap();
    common::wait_until(Duration::from_secs(10), "the session is marked", || {
        client.status("work").unwrap().state == SessionState::NeedsSignIn
    });
    let status = client.status("work").unwrap();
    let reason = status.reason.unwrap();
    assert!(
        reason.contains("stopped in the middle of a refresh"),
        "{reason}"
    );
    assert!(!status.has_refresh_token);
}
