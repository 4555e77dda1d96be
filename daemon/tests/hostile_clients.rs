//! Hostile and broken clients against the real daemon, while a
//! well-behaved client keeps asking for a token: garbage, oversized and
//! truncated frames, a client that says nothing, one that reads nothing,
//! 5,000 connections at once, unknown sessions and names built to escape.
//! Each gets an error or a closed connection; the well-behaved client is
//! answered throughout (its latencies are printed for RELIABILITY.md).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{session, test_timing, Daemon, FakeIdp, Reply};
use token_agent_client::proto::{
    encode_frame, ErrorCode, Request, Response, MAX_REQUEST_LEN, MAX_RESPONSE_LEN,
};
use token_agent_client::Client;

/// A small deterministic generator, so a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

fn send(stream: &mut UnixStream, request: &Request) {
    stream
        .write_all(&encode_frame(request, MAX_REQUEST_LEN).unwrap())
        .unwrap();
}

/// The next reply, or `None` when the daemon closed the connection.
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

fn hello(socket: &Path) -> UnixStream {
    let mut stream = connect(socket);
    send(&mut stream, &Request::Hello { version: 1 });
    assert!(matches!(reply(&mut stream), Some(Response::Hello { .. })));
    stream
}

/// Reads until the daemon closes; every reply on the way must be an error.
fn expect_errors_then_close(stream: &mut UnixStream, what: &str) {
    while let Some(response) = reply(stream) {
        assert!(
            matches!(response, Response::Error(_)),
            "{what}: answered {response:?}"
        );
    }
}

fn expect_code(response: Option<Response>, code: ErrorCode, what: &str) {
    match response {
        Some(Response::Error(reply)) => assert_eq!(reply.code, code, "{what}: {}", reply.message),
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

/// Asks for a token every 20 ms until told to stop; the latencies.
fn well_behaved(socket: PathBuf, stop: Arc<AtomicBool>) -> thread::JoinHandle<Vec<Duration>> {
    thread::spawn(move || {
        let mut client = Client::connect(&socket).expect("the good client connects");
        let mut latencies = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let token = client.get("good", Duration::ZERO);
            latencies.push(started.elapsed());
            assert_eq!(
                token
                    .expect("the good client is served")
                    .access_token
                    .expose(),
                "at-good"
            );
            thread::sleep(Duration::from_millis(20));
        }
        latencies
    })
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid rlimit on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_get_errors_while_a_good_client_is_served() {
    raise_fd_limit();
    let fake = FakeIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    fake.then(Reply::tokens("at-good", Some("rt-good-1"), Some(3600)));
    daemon
        .import(session("good", &fake, "rt-good-0"))
        .await
        .unwrap();
    let socket = daemon.socket.clone();

    let tried = tokio::task::spawn_blocking(move || hostile_inputs(&socket))
        .await
        .expect("the hostile clients' thread");
    println!("hostile inputs tried: {tried}");
    assert_eq!(fake.post_count(), 1, "a hostile input reached the provider");
    daemon.stop().await;
}

fn hostile_inputs(socket: &Path) -> usize {
    let tried = AtomicUsize::new(0);
    let stop = Arc::new(AtomicBool::new(false));
    let good = well_behaved(socket.to_path_buf(), stop.clone());

    // Slow cases first, in the background: a client that says nothing is
    // closed after the 10 s hello timeout...
    let silent = {
        let socket = socket.to_path_buf();
        thread::spawn(move || {
            let mut stream = connect(&socket);
            let started = Instant::now();
            assert!(reply(&mut stream).is_none(), "a silent client got a reply");
            started.elapsed()
        })
    };
    // ...and one that sends requests but reads nothing is closed once its
    // replies have waited 10 s, without holding up anyone else.
    let deaf = {
        let socket = socket.to_path_buf();
        thread::spawn(move || {
            let mut stream = hello(&socket);
            stream
                .set_write_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let list = encode_frame(&Request::List, MAX_REQUEST_LEN).unwrap();
            let started = Instant::now();
            let mut sent = 0usize;
            loop {
                match stream.write_all(&list) {
                    Ok(()) => sent += 1,
                    Err(err)
                        if matches!(
                            err.kind(),
                            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                        ) =>
                    {
                        return (sent, started.elapsed());
                    }
                    Err(_) => {} // buffers full: keep pushing
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "a client that reads nothing was never disconnected"
                );
            }
        })
    };

    // Garbage on a fresh connection, then the end of what it sends.
    let mut rng = XorShift(0x7ea5_ed5e_ed00_0001);
    for i in 0..200 {
        let len = 1 + (rng.next() % 2048) as usize;
        let garbage = rng.bytes(len);
        let mut stream = connect(socket);
        let _ = stream.write_all(&garbage);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        expect_errors_then_close(&mut stream, &format!("garbage #{i}"));
        tried.fetch_add(1, Ordering::Relaxed);
    }
    // Garbage after a proper hello.
    for i in 0..200 {
        let mut stream = hello(socket);
        let len = 1 + (rng.next() % 2048) as usize;
        let garbage = rng.bytes(len);
        let _ = stream.write_all(&garbage);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        expect_errors_then_close(&mut stream, &format!("garbage after hello #{i}"));
        tried.fetch_add(1, Ordering::Relaxed);
    }
    // Well-framed JSON that is not a request: an error, and the connection
    // stays usable.
    {
        let mut stream = hello(socket);
        for body in [
            &b"null"[..],
            b"[]",
            b"{}",
            b"{\"op\":\"get\"}",
            b"{\"op\":\"get\",\"name\":7}",
            b"{\"op\":\"launch\"}",
            b"\xff\xfe\xfd",
            b"{\"op\":\"get\",\"name\":\"good\",\"min_valid_secs\":-1}",
        ] {
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(body);
            stream.write_all(&frame).unwrap();
            expect_code(reply(&mut stream), ErrorCode::BadRequest, "bad JSON");
            tried.fetch_add(1, Ordering::Relaxed);
        }
        send(&mut stream, &Request::Ping);
        assert!(matches!(reply(&mut stream), Some(Response::Pong)));
    }
    // Frames over the limit, before and after hello.
    for (prefix, after_hello) in [
        (MAX_REQUEST_LEN as u32 + 1, false),
        (MAX_REQUEST_LEN as u32 + 1, true),
        (u32::MAX, false),
        (u32::MAX, true),
    ] {
        let mut stream = if after_hello {
            hello(socket)
        } else {
            connect(socket)
        };
        let mut frame = prefix.to_be_bytes().to_vec();
        frame.extend_from_slice(&[b'x'; 1024]);
        let _ = stream.write_all(&frame);
        expect_code(reply(&mut stream), ErrorCode::BadRequest, "oversized frame");
        assert!(
            reply(&mut stream).is_none(),
            "kept open after an oversized frame"
        );
        tried.fetch_add(1, Ordering::Relaxed);
    }
    // A length prefix and no body.
    for after_hello in [false, true] {
        let mut stream = if after_hello {
            hello(socket)
        } else {
            connect(socket)
        };
        stream.write_all(&100u32.to_be_bytes()).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        expect_errors_then_close(&mut stream, "prefix without body");
        tried.fetch_add(1, Ordering::Relaxed);
    }
    // The wrong first message, and the wrong version.
    {
        let mut stream = connect(socket);
        send(&mut stream, &Request::List);
        expect_code(reply(&mut stream), ErrorCode::BadRequest, "no hello");
        assert!(reply(&mut stream).is_none());
        let mut stream = connect(socket);
        send(&mut stream, &Request::Hello { version: 99 });
        expect_code(
            reply(&mut stream),
            ErrorCode::UnsupportedVersion,
            "version 99",
        );
        assert!(reply(&mut stream).is_none());
        tried.fetch_add(2, Ordering::Relaxed);
    }
    // Sessions that do not exist, and names built to escape.
    {
        let mut stream = hello(socket);
        let names = [
            ("nope".to_string(), ErrorCode::NoSuchSession),
            ("../../etc/passwd".to_string(), ErrorCode::BadRequest),
            ("a/b".to_string(), ErrorCode::BadRequest),
            ("/abs".to_string(), ErrorCode::BadRequest),
            ("nul\0byte".to_string(), ErrorCode::BadRequest),
            ("good\0".to_string(), ErrorCode::BadRequest),
            ("x".repeat(10 * 1024), ErrorCode::BadRequest),
            (String::new(), ErrorCode::BadRequest),
            ("-rf".to_string(), ErrorCode::BadRequest),
            ("new\nline".to_string(), ErrorCode::BadRequest),
            ("\u{202e}good".to_string(), ErrorCode::BadRequest),
        ];
        for (name, code) in names {
            for request in [
                Request::Get {
                    name: name.clone(),
                    min_valid_secs: 0,
                    scope: vec![],
                    audience: None,
                },
                Request::Status { name: name.clone() },
                Request::Refresh { name: name.clone() },
                Request::Remove { name: name.clone() },
            ] {
                send(&mut stream, &request);
                expect_code(reply(&mut stream), code, "a bad name");
                tried.fetch_add(1, Ordering::Relaxed);
            }
            let import: token_agent_client::proto::ImportSession =
                serde_json::from_value(serde_json::json!({
                    "name": name, "issuer": "http://127.0.0.1:9", "client_id": "c",
                    "token_endpoint": "http://127.0.0.1:9/token", "refresh_token": "r",
                }))
                .unwrap();
            send(&mut stream, &Request::Import(Box::new(import)));
            if code == ErrorCode::BadRequest {
                expect_code(reply(&mut stream), ErrorCode::BadRequest, "import bad name");
            } else {
                // "nope" is a good name: the import is refused for the
                // endpoint (nothing listens on port 9), and not kept.
                let _ = reply(&mut stream);
                send(&mut stream, &Request::Remove { name: name.clone() });
                let _ = reply(&mut stream);
            }
            tried.fetch_add(1, Ordering::Relaxed);
        }
    }

    // 5,000 connections at once, half of them past hello.
    let started = Instant::now();
    let mut crowd = Vec::with_capacity(5_000);
    for i in 0..5_000 {
        let mut stream = UnixStream::connect(socket).expect("connection in the crowd");
        if i % 2 == 0 {
            send(&mut stream, &Request::Hello { version: 1 });
        }
        crowd.push(stream);
    }
    // A newcomer is still served while the crowd is there.
    let mut newcomer = Client::connect(socket).expect("a newcomer connects");
    newcomer
        .set_timeout(Duration::from_secs(5))
        .expect("timeout");
    newcomer
        .ping()
        .expect("the newcomer is served amid 5,000 connections");
    println!(
        "5,000 connections opened and a newcomer served in {:?}",
        started.elapsed()
    );
    drop(crowd);
    tried.fetch_add(5_000, Ordering::Relaxed);

    let silent_for = silent.join().expect("silent client");
    println!("a silent client was closed after {silent_for:?}");
    assert!(silent_for < Duration::from_secs(13));
    let (sent, deaf_for) = deaf.join().expect("deaf client");
    println!("a client that reads nothing sent {sent} requests and was closed after {deaf_for:?}");
    tried.fetch_add(2, Ordering::Relaxed);

    stop.store(true, Ordering::Relaxed);
    let mut latencies = good.join().expect("the good client");
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "well-behaved client: {} gets, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        pick(0.5),
        pick(0.99),
        latencies.last().unwrap()
    );
    assert!(
        *latencies.last().unwrap() < Duration::from_secs(2),
        "the good client waited {:?}",
        latencies.last().unwrap()
    );
    tried.into_inner()
}
