//! Requests sent without waiting for the answers (PROTOCOL.md, "pipelining"),
//! as `tokenctl get` sends its `hello` and `get`, against the real daemon:
//! every request is answered, in order; a refused `hello` is answered and the
//! connection closed, the requests behind it never read.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{session, test_timing, Daemon, FakeIdp, Reply};
use token_agent_client::proto::{
    encode_frame, ErrorCode, Request, Response, MAX_REQUEST_LEN, MAX_RESPONSE_LEN, PROTOCOL_VERSION,
};
use token_agent_client::{Client, ClientError, TokenOptions};

/// Connects; the read timeout only keeps a broken daemon from hanging the
/// test, it measures nothing.
fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

/// All of `requests` in a single write.
fn send_all(stream: &mut UnixStream, requests: &[Request]) {
    let mut bytes = Vec::new();
    for request in requests {
        bytes.extend(encode_frame(request, MAX_REQUEST_LEN).unwrap());
    }
    stream.write_all(&bytes).unwrap();
}

/// The next reply, or `None` once the daemon has closed the connection.
fn reply(stream: &mut UnixStream) -> Option<Response> {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return None
        }
        Err(err) => panic!("no reply and no close: {err}"),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    assert!(len <= MAX_RESPONSE_LEN);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("a whole reply");
    Some(serde_json::from_slice(&body).expect("a reply the protocol knows"))
}

fn get(name: &str) -> Request {
    TokenOptions::new().request(name)
}

fn hello(version: u32) -> Request {
    Request::Hello { version }
}

/// A daemon serving session `work` with access token `at-work`.
async fn serving_work(dir: &Path) -> (Daemon, FakeIdp) {
    let fake = FakeIdp::start().await;
    let daemon = Daemon::start(dir, test_timing()).await;
    fake.then(Reply::tokens("at-work", Some("rt-work-1"), Some(3600)));
    daemon
        .import(session("work", &fake, "rt-work-0"))
        .await
        .unwrap();
    (daemon, fake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_in_one_write_are_all_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _fake) = serving_work(dir.path()).await;
    let socket = daemon.socket.clone();

    tokio::task::spawn_blocking(move || {
        let mut stream = connect(&socket);
        send_all(
            &mut stream,
            &[
                hello(PROTOCOL_VERSION),
                get("work"),
                get("absent"),
                get("work"),
            ],
        );
        assert!(matches!(reply(&mut stream), Some(Response::Hello { .. })));
        for expected in ["at-work", "", "at-work"] {
            match reply(&mut stream) {
                Some(Response::Token(token)) => assert_eq!(token.access_token.expose(), expected),
                Some(Response::Error(err)) => {
                    assert_eq!(expected, "", "{}", err.message);
                    assert_eq!(err.code, ErrorCode::NoSuchSession);
                }
                other => panic!("expected a token or an error, got {other:?}"),
            }
        }
        // Nothing more was asked, so nothing more comes; closing our side
        // ends the connection.
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(reply(&mut stream).is_none());
    })
    .await
    .unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_hello_is_answered_and_the_get_behind_it_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _fake) = serving_work(dir.path()).await;
    let socket = daemon.socket.clone();

    tokio::task::spawn_blocking(move || {
        for first in [hello(PROTOCOL_VERSION + 1), get("work")] {
            let mut stream = connect(&socket);
            send_all(&mut stream, &[first.clone(), get("work")]);
            match reply(&mut stream) {
                Some(Response::Error(err)) => assert!(
                    matches!(
                        err.code,
                        ErrorCode::UnsupportedVersion | ErrorCode::BadRequest
                    ),
                    "{first:?}: {err:?}"
                ),
                other => panic!("{first:?}: expected a refusal, got {other:?}"),
            }
            // The daemon closes without reading the get: no token follows.
            assert!(reply(&mut stream).is_none(), "{first:?}");
        }
    })
    .await
    .unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_once_takes_a_token_or_the_agents_error() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, fake) = serving_work(dir.path()).await;
    let socket = daemon.socket.clone();

    let (first, second, absent) = tokio::task::spawn_blocking(move || {
        let options = TokenOptions::new().min_valid(Duration::from_secs(60));
        (
            Client::get_once(&socket, "work", &options),
            Client::get_once(&socket, "work", &options),
            Client::get_once(&socket, "absent", &options),
        )
    })
    .await
    .unwrap();

    assert_eq!(first.unwrap().access_token.expose(), "at-work");
    assert_eq!(second.unwrap().access_token.expose(), "at-work");
    match absent {
        Err(ClientError::Agent(reply)) => assert_eq!(reply.code, ErrorCode::NoSuchSession),
        other => panic!("expected no such session, got {:?}", other.map(|_| ())),
    }
    // Served from the agent's record: only the import went to the provider.
    assert_eq!(fake.post_count(), 1);
    daemon.stop().await;
}

#[test]
fn get_once_without_an_agent_says_none_is_running() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    match Client::get_once(&socket, "work", &TokenOptions::new()) {
        Err(err @ ClientError::NoAgent { .. }) => {
            assert!(err.to_string().contains("no token-agent is running"))
        }
        other => panic!("expected no agent, got {:?}", other.map(|_| ())),
    }
}
