//! A fast fake token endpoint: HTTP/1.1 with keep-alive on 127.0.0.1,
//! answering every refresh with the same JSON token answer and a fresh
//! refresh token. It notes when each request arrived and which refresh
//! token it carried, so the scheduling figure can compare arrival with the
//! session's planned time, and counts requests in flight, connections and
//! replayed refresh tokens.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::populate::now_ms;

/// One refresh request as the provider saw it.
#[derive(Clone, Debug)]
pub struct Hit {
    /// Wall-clock Unix ms when the whole request had arrived.
    pub at_ms: u64,
    /// The session number from the presented refresh token, when it is one
    /// the bench issued at fill time (`rt-N-0...`).
    pub session: Option<usize>,
}

#[derive(Default)]
pub struct Seen {
    pub hits: Vec<Hit>,
    presented: HashSet<String>,
    pub replays: u64,
}

pub struct FakeProvider {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    _thread: std::thread::JoinHandle<()>,
}

struct Shared {
    seen: Arc<Mutex<Seen>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    issued: AtomicU64,
    delay: Duration,
    access_token: String,
}

impl FakeProvider {
    /// Starts on a thread of its own (a current-thread runtime), so it
    /// takes at most one core and never waits on the bench's other work.
    /// `delay` holds each answer back, to make the agent's concurrency
    /// visible as requests in flight.
    pub fn start(delay: Duration, access_token: String) -> anyhow::Result<FakeProvider> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Arc::new(Shared {
            seen: seen.clone(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: Arc::new(AtomicUsize::new(0)),
            connections: Arc::new(AtomicUsize::new(0)),
            issued: AtomicU64::new(0),
            delay,
            access_token,
        });
        let provider = FakeProvider {
            addr,
            seen,
            in_flight: shared.in_flight.clone(),
            max_in_flight: shared.max_in_flight.clone(),
            connections: shared.connections.clone(),
            _thread: std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("provider runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("provider listener");
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        shared.connections.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(connection(stream, shared.clone()));
                    }
                });
            }),
        };
        Ok(provider)
    }

    pub fn token_endpoint(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().hits.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        // Read until one whole request is buffered.
        let (head_len, body_len) = loop {
            if let Some(parsed) = parse_head(&buf) {
                if buf.len() >= parsed.0 + parsed.1 {
                    break parsed;
                }
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let at_ms = now_ms();
        let body = &buf[head_len..head_len + body_len];
        let presented = form_value(body, b"refresh_token").unwrap_or_default();
        let session = presented
            .strip_prefix("rt-")
            .and_then(|rest| rest.split_once('-'))
            .filter(|(_, generation)| generation.starts_with("0"))
            .and_then(|(n, _)| n.parse().ok());
        {
            let mut seen = shared.seen.lock().unwrap();
            seen.hits.push(Hit { at_ms, session });
            if !seen.presented.insert(presented) {
                seen.replays += 1;
            }
        }
        buf.drain(..head_len + body_len);

        let now = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::Relaxed);
        if !shared.delay.is_zero() {
            tokio::time::sleep(shared.delay).await;
        }
        let n = shared.issued.fetch_add(1, Ordering::Relaxed);
        let json = format!(
            r#"{{"access_token":"{}","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-fresh-{n}"}}"#,
            shared.access_token
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        );
        let written = stream.write_all(response.as_bytes()).await;
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        if written.is_err() {
            return;
        }
    }
}

/// The length of the head (through the blank line) and the Content-Length.
fn parse_head(buf: &[u8]) -> Option<(usize, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut length = 0;
    for line in head.split("\r\n") {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    Some((end, length))
}

/// A form field's value; the bench's tokens need no percent-decoding.
fn form_value(body: &[u8], key: &[u8]) -> Option<String> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let (k, v) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
        (k == key).then(|| String::from_utf8_lossy(&v[1..]).into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_forms_parse() {
        let request = b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\ngrant_type=refresh_token&refresh_token=a";
        assert_eq!(parse_head(request), Some((53, 40)));
        assert_eq!(
            form_value(
                b"grant_type=refresh_token&refresh_token=rt-5-0",
                b"refresh_token"
            )
            .as_deref(),
            Some("rt-5-0")
        );
        assert_eq!(form_value(b"a=b", b"refresh_token"), None);
    }
}
