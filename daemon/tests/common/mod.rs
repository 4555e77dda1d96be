//! Test helpers: a scriptable fake token endpoint, and the real daemon
//! started in-process on a temporary store and socket.
//!
//! The fake speaks just enough HTTP/1.1 by hand (request head plus a
//! `Content-Length` body, one answer, `Connection: close`) to be driven from
//! a script, and records every request it reads.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use token_agent::config::Config;
use token_agent::schedule::Timing;
use token_agent::Running;
use token_agent_client::proto::{ImportSession, SessionStatus, TokenReply};
use token_agent_client::{Client, ClientError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

// ---------------------------------------------------------------------------
// The fake token endpoint
// ---------------------------------------------------------------------------

/// One scripted answer to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Waited out after the request is read and before answering.
    pub delay: Duration,
    /// Read the request, then close the connection without a word.
    pub hang_up: bool,
    /// Send the head and half the body, then stall for a minute.
    pub stall_body: bool,
}

impl Reply {
    /// Any status, content type and body.
    pub fn raw(status: u16, content_type: Option<&str>, body: &str) -> Reply {
        Reply {
            status,
            content_type: content_type.map(str::to_string),
            headers: Vec::new(),
            body: body.to_string(),
            delay: Duration::ZERO,
            hang_up: false,
            stall_body: false,
        }
    }

    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply::raw(status, Some("application/json"), &body.to_string())
    }

    /// A Bearer token answer; `refresh_token` and `expires_in` are left out
    /// when `None`.
    pub fn tokens(
        access_token: &str,
        refresh_token: Option<&str>,
        expires_in: Option<u64>,
    ) -> Reply {
        let mut body = serde_json::json!({
            "access_token": access_token,
            "token_type": "Bearer",
        });
        if let Some(refresh_token) = refresh_token {
            body["refresh_token"] = refresh_token.into();
        }
        if let Some(expires_in) = expires_in {
            body["expires_in"] = expires_in.into();
        }
        Reply::json(200, body)
    }

    /// An OAuth error body.
    pub fn oauth_error(status: u16, error: &str, description: Option<&str>) -> Reply {
        let mut body = serde_json::json!({ "error": error });
        if let Some(description) = description {
            body["error_description"] = description.into();
        }
        Reply::json(status, body)
    }

    /// Reads the request and closes the connection without answering.
    pub fn hang_up() -> Reply {
        Reply {
            hang_up: true,
            ..Reply::raw(0, None, "")
        }
    }

    /// The head and half of this body, then nothing for a minute: a
    /// provider that dies mid-answer. It rotates nothing.
    pub fn stalled(mut self) -> Reply {
        self.stall_body = true;
        self
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The refresh token this answer hands out, if it is a success.
    fn rotated_refresh_token(&self) -> Option<String> {
        if self.hang_up || self.stall_body || !(200..300).contains(&self.status) {
            return None;
        }
        let is_form = self
            .content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
        if is_form {
            return url::form_urlencoded::parse(self.body.as_bytes())
                .find(|(k, _)| k == "refresh_token")
                .map(|(_, v)| v.into_owned());
        }
        let fields: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        fields.get("access_token")?;
        fields["refresh_token"].as_str().map(str::to_string)
    }
}

enum Step {
    Reply(Reply),
    /// Stop listening for this long: connections are refused.
    Refuse(Duration),
}

/// What the fake read from one request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub refresh_token: Option<String>,
    pub authorization: Option<String>,
    pub accept: Option<String>,
    pub form: Vec<(String, String)>,
}

impl Recorded {
    pub fn form_value(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Step>,
    requests: Vec<Recorded>,
    /// Refresh tokens the fake has rotated away from. Presented again, they
    /// get `invalid_grant` whatever the script says (strict rotation).
    spent: HashSet<String>,
}

struct Inner {
    state: Mutex<State>,
    refuse: Notify,
    /// When each stretch of refused connections began and ended.
    outages: Mutex<Vec<(Instant, Instant)>>,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A scripted token endpoint at `{url}/token`, with strict refresh-token
/// rotation: once an answer has replaced refresh token X, any later use of X
/// gets `400 invalid_grant`. Requests past the end of the script get
/// `500 server_error`.
pub struct FakeIdp {
    pub url: String,
    inner: Arc<Inner>,
}

impl FakeIdp {
    pub async fn start() -> FakeIdp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake IdP");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            refuse: Notify::new(),
            outages: Mutex::new(Vec::new()),
        });
        tokio::spawn(accept_loop(inner.clone(), listener, addr));
        FakeIdp {
            url: format!("http://{addr}"),
            inner,
        }
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.url)
    }

    /// Appends an answer to the script.
    pub fn then(&self, reply: Reply) -> &Self {
        self.inner.state().script.push_back(Step::Reply(reply));
        self
    }

    /// Drops every answer not handed out yet.
    pub fn clear_script(&self) {
        self.inner.state().script.clear();
    }

    /// Appends a stretch of refused connections to the script. It starts
    /// once every answer before it has been handed out.
    pub fn then_refuse(&self, duration: Duration) -> &Self {
        self.inner.state().script.push_back(Step::Refuse(duration));
        self
    }

    /// Every POST to the token endpoint, in order of arrival.
    pub fn posts(&self) -> Vec<Recorded> {
        self.inner
            .state()
            .requests
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/token")
            .cloned()
            .collect()
    }

    /// Every request to any path but discovery, in order of arrival.
    pub fn inner_requests(&self) -> Vec<Recorded> {
        self.inner.state().requests.clone()
    }

    pub fn post_count(&self) -> usize {
        self.posts().len()
    }

    /// The refresh tokens presented, in order.
    pub fn presented(&self) -> Vec<String> {
        self.posts()
            .into_iter()
            .map(|r| r.refresh_token.unwrap_or_default())
            .collect()
    }

    /// The stretches of refused connections so far: (start, end).
    pub fn outages(&self) -> Vec<(Instant, Instant)> {
        self.inner.outages.lock().unwrap().clone()
    }

    /// Answers not yet handed out.
    pub fn unused_script(&self) -> usize {
        self.inner.state().script.len()
    }

    /// Waits until `n` POSTs have arrived, or panics after `timeout`.
    pub async fn wait_for_posts(&self, n: usize, timeout: Duration) {
        wait_until(
            &format!("{n} POSTs at the fake IdP"),
            timeout,
            || async move { self.post_count() >= n },
        )
        .await;
    }
}

async fn accept_loop(inner: Arc<Inner>, mut listener: TcpListener, addr: SocketAddr) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(handle(inner.clone(), stream, addr));
                }
            }
            () = inner.refuse.notified() => {
                let refuse_for = match inner.state().script.front() {
                    Some(Step::Refuse(d)) => Some(*d),
                    _ => None,
                };
                let Some(refuse_for) = refuse_for else { continue };
                drop(listener);
                let began = Instant::now();
                tokio::time::sleep(refuse_for).await;
                listener = rebind(addr).await;
                inner.outages.lock().unwrap().push((began, Instant::now()));
                let mut state = inner.state();
                state.script.pop_front();
                if matches!(state.script.front(), Some(Step::Refuse(_))) {
                    inner.refuse.notify_one();
                }
            }
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..50 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fake IdP cannot listen on {addr} again");
}

struct HttpRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

async fn read_request(stream: &mut TcpStream) -> Option<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split_whitespace();
    let method = request_line.next()?.to_string();
    let path = request_line.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Some(HttpRequest {
        method,
        path,
        headers,
        body,
    })
}

async fn handle(inner: Arc<Inner>, mut stream: TcpStream, addr: SocketAddr) {
    let Ok(Some(request)) =
        tokio::time::timeout(Duration::from_secs(5), read_request(&mut stream)).await
    else {
        return;
    };
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&request.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let refresh_token = form
        .iter()
        .find(|(k, _)| k == "refresh_token")
        .map(|(_, v)| v.clone());

    let reply = if request.path == "/.well-known/openid-configuration" {
        Reply::json(
            200,
            serde_json::json!({
                "issuer": format!("http://{addr}"),
                "token_endpoint": format!("http://{addr}/token"),
            }),
        )
    } else {
        let mut state = inner.state();
        state.requests.push(Recorded {
            at: Instant::now(),
            method: request.method.clone(),
            path: request.path.clone(),
            refresh_token: refresh_token.clone(),
            authorization: request.header("authorization"),
            accept: request.header("accept"),
            form,
        });
        let reply = if refresh_token
            .as_ref()
            .is_some_and(|rt| state.spent.contains(rt))
        {
            Reply::oauth_error(400, "invalid_grant", Some("refresh token already used"))
        } else {
            match state.script.front() {
                Some(Step::Reply(_)) => match state.script.pop_front() {
                    Some(Step::Reply(reply)) => reply,
                    _ => unreachable!(),
                },
                // A connection that slipped in as the listener closes.
                Some(Step::Refuse(_)) => Reply::hang_up(),
                None => Reply::oauth_error(
                    500,
                    "server_error",
                    Some("fake IdP: nothing scripted for this request"),
                ),
            }
        };
        if let (Some(old), Some(new)) = (&refresh_token, reply.rotated_refresh_token()) {
            if *old != new {
                state.spent.insert(old.clone());
            }
        }
        if matches!(state.script.front(), Some(Step::Refuse(_))) {
            inner.refuse.notify_one();
        }
        reply
    };

    tokio::time::sleep(reply.delay).await;
    if reply.hang_up {
        return;
    }
    let mut head = format!(
        "HTTP/1.1 {} Fake\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    if let Some(content_type) = &reply.content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    if reply.stall_body {
        let half = &reply.body.as_bytes()[..reply.body.len() / 2];
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(half).await;
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        return;
    }
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(reply.body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

/// Short timings for tests: no jitter, a small minimum gap, quick backoff.
/// Scheduled refreshes of a 300 s token still come only after 240 s.
pub fn test_timing() -> Timing {
    Timing {
        max_jitter_ms: 0,
        min_gap_ms: 100,
        backoff_base_ms: 200,
        backoff_max_ms: 1_000,
        ..Timing::default()
    }
}

/// The configuration [`Daemon::start`] uses: `dir/agent.sock`,
/// `dir/store`, a 5 s provider timeout.
pub fn config(dir: &Path, timing: Timing) -> Config {
    Config {
        socket: dir.join("agent.sock"),
        store_dir: dir.join("store"),
        file: Default::default(),
        timing,
        max_concurrent_refreshes: 16,
        provider_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
    }
}

/// The real daemon, in-process, on `dir/agent.sock` and `dir/store`.
pub struct Daemon {
    running: Running,
    pub socket: PathBuf,
}

impl Daemon {
    pub async fn start(dir: &Path, timing: Timing) -> Daemon {
        Daemon::start_with(config(dir, timing)).await
    }

    /// Starts on a configuration of the test's own, such as [`config`]
    /// with a shorter provider timeout.
    pub async fn start_with(config: Config) -> Daemon {
        init_logging();
        let socket = config.socket.clone();
        let running = token_agent::start(config).await.expect("the daemon starts");
        Daemon { running, socket }
    }

    /// The daemon's in-memory state, for checks no request shows.
    pub fn running(&self) -> &Running {
        &self.running
    }

    pub async fn stop(self) {
        self.running.shutdown.cancel();
        self.running
            .stopped()
            .await
            .expect("the daemon stops cleanly");
    }

    /// Runs `f` on a fresh blocking client connection.
    pub async fn call<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&mut Client) -> T + Send + 'static,
    {
        let socket = self.socket.clone();
        tokio::task::spawn_blocking(move || {
            let mut client = Client::connect(&socket).expect("connect to the daemon");
            f(&mut client)
        })
        .await
        .expect("client thread")
    }

    pub async fn import(&self, session: ImportSession) -> Result<String, ClientError> {
        self.call(move |c| c.import(session)).await
    }

    pub async fn get(&self, name: &str) -> Result<TokenReply, ClientError> {
        let name = name.to_string();
        self.call(move |c| c.get(&name, Duration::ZERO)).await
    }

    /// The access token, which must be served.
    pub async fn token(&self, name: &str) -> String {
        match self.get(name).await {
            Ok(token) => token.access_token.expose().to_string(),
            Err(err) => panic!("get {name} failed: {err} ({:?})", err.code()),
        }
    }

    pub async fn refresh(&self, name: &str) -> Result<String, ClientError> {
        let name = name.to_string();
        self.call(move |c| c.refresh(&name)).await
    }

    pub async fn status(&self, name: &str) -> SessionStatus {
        let name = name.to_string();
        self.call(move |c| c.status(&name))
            .await
            .expect("status of a session that exists")
    }
}

/// An import of `name` against `fake` with `client_secret_post`. Built
/// from the wire form, so optional fields the protocol gains later take
/// their defaults here too.
pub fn session(name: &str, fake: &FakeIdp, refresh_token: &str) -> ImportSession {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "issuer": fake.url,
        "token_endpoint": fake.token_endpoint(),
        "client_id": "cli",
        "client_secret": "s",
        "client_auth": "post",
        "refresh_token": refresh_token,
    }))
    .expect("a valid import")
}

/// `RUST_LOG=token_agent=debug cargo test ... -- --nocapture` shows the
/// daemon's log.
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Polls `condition` every 20 ms until it holds, or panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
