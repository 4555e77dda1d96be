//! A client for token-agent, for Rust programs and for `tokenctl`.
//!
//! [`Client`] is blocking and small on purpose: a program that wants one
//! token should not pay for an async runtime or TLS to get it. With the
//! `async` feature, [`AsyncClient`] offers the same operations on tokio.
//! Neither needs any knowledge of the wire format.
//!
//! A client keeps its connection for any number of requests; when the agent
//! restarted in between, it reconnects once, transparently.
//!
//! ```no_run
//! use std::time::Duration;
//! use token_agent_client::Client;
//!
//! let mut agent = Client::connect_default()?;
//! let token = agent.get("work", Duration::from_secs(60))?;
//! // Hand the token to the HTTP client; never print or log it.
//! let authorization = format!("Bearer {}", token.access_token.expose());
//! # drop(authorization);
//! # Ok::<(), token_agent_client::ClientError>(())
//! ```
//!
//! Errors carry the agent's stable code, so a program can tell "sign in
//! again" from "try later":
//!
//! ```no_run
//! use std::time::Duration;
//! use token_agent_client::{Client, ClientError, proto::ErrorCode};
//!
//! let mut agent = Client::connect_default()?;
//! match agent.get("work", Duration::from_secs(30)) {
//!     Ok(token) => println!("valid until {}", token.expires_at),
//!     Err(err) if err.code() == Some(ErrorCode::ReauthRequired) => {
//!         eprintln!("sign in again: {err}");
//!     }
//!     Err(err) => return Err(err),
//! }
//! # Ok::<(), ClientError>(())
//! ```
//!
//! A down-scoped token (fewer scopes, another audience) and a subscription
//! to every new token:
//!
//! ```no_run
//! use token_agent_client::{Client, TokenOptions};
//!
//! let mut agent = Client::connect_default()?;
//! let options = TokenOptions::new()
//!     .min_valid(std::time::Duration::from_secs(30))
//!     .scope("read")
//!     .audience("https://api.example.com");
//! let narrow = agent.get_with("work", &options)?;
//! # let _ = narrow;
//!
//! for event in agent.watch("work")? {
//!     let event = event?;
//!     match (&event.token, &event.error) {
//!         (Some(token), _) => println!("new token, valid until {}", token.expires_at),
//!         (None, Some(error)) => eprintln!("no token: {}", error.message),
//!         (None, None) => {}
//!     }
//! }
//! # Ok::<(), token_agent_client::ClientError>(())
//! ```

#[cfg(feature = "async")]
mod async_client;
#[cfg(feature = "async")]
pub use async_client::{AsyncClient, AsyncWatcher};

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use token_agent_proto as proto;
use token_agent_proto::{
    encode_frame, read_frame, write_frame, AgentInfo, ErrorCode, ErrorReply, FrameError,
    ImportSession, Request, Response, Secret, SessionStatus, TokenReply, WatchEvent,
    MAX_REQUEST_LEN, MAX_RESPONSE_LEN, PROTOCOL_VERSION,
};

/// How long a request may take by default. A `get` can wait for a refresh,
/// and an import for discovery plus a refresh, so this is generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// What went wrong. [`ClientError::code`] gives the agent's stable
/// [`ErrorCode`] when the agent answered with an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("no token-agent is running on {path} ({source}); start one with `token-agent`")]
    NoAgent {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("{}", .0.message)]
    Agent(ErrorReply),
    /// The agent's answer did not fit the request, or the connection broke.
    #[error("talking to the agent failed: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The agent's error code, when the agent gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent(reply) => Some(reply.code),
            _ => None,
        }
    }

    /// Whether only a new sign-in helps (`reauth_required`).
    pub fn needs_sign_in(&self) -> bool {
        self.code() == Some(ErrorCode::ReauthRequired)
    }

    /// Whether the same request may succeed later without anyone acting
    /// (`temporarily_unavailable`, `shutting_down`).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code(),
            Some(ErrorCode::TemporarilyUnavailable | ErrorCode::ShuttingDown)
        )
    }
}

/// What a token must satisfy: a minimum validity, and for a down-scoped
/// token the scopes (a subset of the session's) and the audience.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenOptions {
    pub min_valid: Duration,
    pub scope: Vec<String>,
    pub audience: Option<String>,
}

impl TokenOptions {
    pub fn new() -> TokenOptions {
        TokenOptions::default()
    }

    /// The token must stay valid at least this long.
    pub fn min_valid(mut self, min_valid: Duration) -> TokenOptions {
        self.min_valid = min_valid;
        self
    }

    /// Adds a scope; with any, the token is down-scoped to exactly these.
    pub fn scope(mut self, scope: impl Into<String>) -> TokenOptions {
        self.scope.push(scope.into());
        self
    }

    /// The audience (an RFC 8707 resource URI, or an audience name).
    pub fn audience(mut self, audience: impl Into<String>) -> TokenOptions {
        self.audience = Some(audience.into());
        self
    }

    /// Refuses a token that is not the one asked for: an agent that does
    /// not know down-scoped tokens ignores the scopes and would hand out
    /// the session's own, broader token.
    pub fn check(&self, token: TokenReply) -> Result<TokenReply, ClientError> {
        let mut scope = self.scope.clone();
        scope.retain(|s| !s.is_empty());
        scope.sort();
        scope.dedup();
        let audience = self.audience.clone().filter(|a| !a.is_empty());
        if token.scope != scope || token.audience != audience {
            return Err(ClientError::Protocol(
                "the agent answered with a token for other scopes or another audience \
                 than asked for; it may predate down-scoped tokens: upgrade it"
                    .into(),
            ));
        }
        Ok(token)
    }

    /// The `get` request for session `name`.
    pub fn request(&self, name: &str) -> Request {
        Request::Get {
            name: name.into(),
            min_valid_secs: self.min_valid.as_secs(),
            scope: self.scope.clone(),
            audience: self.audience.clone(),
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(err: FrameError) -> Self {
        match err {
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                ClientError::Protocol("the agent did not answer in time".into())
            }
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// The socket path a client uses when none is given; see
/// [`token_agent_proto::default_socket_path`].
pub fn default_socket_path() -> PathBuf {
    token_agent_proto::default_socket_path()
}

/// One connection to the agent. Requests on it are answered in order.
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
    /// The last exchange failed midway; the next request reconnects.
    broken: bool,
}

impl Client {
    /// Connects to the default socket; see [`default_socket_path`].
    pub fn connect_default() -> Result<Client, ClientError> {
        Client::connect(&default_socket_path())
    }

    /// Connects to the agent at `path` and agrees on the protocol version.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let mut client = Client {
            stream: open(path)?,
            path: path.to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
            broken: false,
        };
        client.set_timeout(DEFAULT_TIMEOUT)?;
        client.hello()?;
        Ok(client)
    }

    fn hello(&mut self) -> Result<(), ClientError> {
        match self.exchange(&Request::Hello {
            version: PROTOCOL_VERSION,
        })? {
            Response::Hello { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Limits how long each request may take.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let io = |err: std::io::Error| ClientError::Protocol(err.to_string());
        self.timeout = timeout;
        self.stream.set_read_timeout(Some(timeout)).map_err(io)?;
        self.stream.set_write_timeout(Some(timeout)).map_err(io)
    }

    /// Sends one request and reads its answer. An error answer becomes
    /// [`ClientError::Agent`]. A connection the agent closed since the last
    /// request (it restarted) is opened anew and the request sent again,
    /// once.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        if self.broken {
            self.reopen()?;
        }
        let mut answer = self.exchange(request);
        if matches!(answer, Err(ClientError::Protocol(_))) && self.is_closed() {
            self.reopen()?;
            answer = self.exchange(request);
        }
        // After a timeout or a garbled frame, the next answer on this
        // connection could be the late one: start the next request afresh.
        self.broken = matches!(answer, Err(ClientError::Protocol(_)));
        answer
    }

    fn reopen(&mut self) -> Result<(), ClientError> {
        self.stream = open(&self.path)?;
        let timeout = self.timeout;
        self.set_timeout(timeout)?;
        self.hello()?;
        self.broken = false;
        Ok(())
    }

    /// Whether the agent has closed this connection. Asked only after a
    /// failed exchange, when nothing worth keeping is left to read.
    fn is_closed(&self) -> bool {
        use std::io::Read;

        let mut byte = [0u8; 1];
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let closed = match (&self.stream).read(&mut byte) {
            Ok(read) => read == 0,
            Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
        };
        let _ = self.stream.set_nonblocking(false);
        closed
    }

    fn exchange(&mut self, request: &Request) -> Result<Response, ClientError> {
        let written = write_frame(&mut self.stream, request, MAX_REQUEST_LEN);
        let answer = read_frame(&mut self.stream, MAX_RESPONSE_LEN);
        // An agent that refuses us may close before our write lands; its
        // error frame is still worth more than the broken pipe.
        let answer = match (written, answer) {
            (_, Ok(answer)) => answer,
            (Err(err), Err(_)) | (Ok(()), Err(err)) => return Err(err.into()),
        };
        match answer {
            Response::Error(reply) => Err(ClientError::Agent(reply)),
            response => Ok(response),
        }
    }

    /// Connects, agrees on the protocol version and gets one token, in one
    /// round trip: the `hello` and the `get` go out in a single write and
    /// their answers come back in order. For one-shot callers such as
    /// `tokenctl get`; the connection is closed afterwards. An agent that
    /// refuses the connection answers the `hello` with the error, which is
    /// returned, and ignores the `get`.
    pub fn get_once(
        path: &Path,
        name: &str,
        options: &TokenOptions,
    ) -> Result<TokenReply, ClientError> {
        use std::io::Write;

        let mut client = Client {
            stream: open(path)?,
            path: path.to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
            broken: false,
        };
        client.set_timeout(DEFAULT_TIMEOUT)?;
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        let mut frames = encode_frame(&hello, MAX_REQUEST_LEN)?;
        frames.extend(encode_frame(&options.request(name), MAX_REQUEST_LEN)?);
        let written = (&client.stream).write_all(&frames);
        // Both answers are small: read them in as few calls as may be.
        let mut answers = std::io::BufReader::with_capacity(8192, &client.stream);
        // An agent that refuses us may close before our write lands; its
        // error frame is still worth more than the broken pipe.
        match (written, read_frame(&mut answers, MAX_RESPONSE_LEN)) {
            (_, Ok(Response::Hello { .. })) => {}
            (_, Ok(Response::Error(reply))) => return Err(ClientError::Agent(reply)),
            (_, Ok(other)) => return Err(unexpected(other)),
            (Err(err), Err(_)) => return Err(FrameError::Io(err).into()),
            (Ok(()), Err(err)) => return Err(err.into()),
        }
        let answer = read_frame(&mut answers, MAX_RESPONSE_LEN);
        drop(answers);
        match answer {
            Ok(Response::Token(token)) => options.check(token),
            Ok(Response::Error(reply)) => Err(ClientError::Agent(reply)),
            Ok(other) => Err(unexpected(other)),
            // As in `request`: an agent that restarted in between closed
            // the connection; ask once more on a new one.
            Err(_) if client.is_closed() => {
                client.reopen()?;
                match client.exchange(&options.request(name))? {
                    Response::Token(token) => options.check(token),
                    other => Err(unexpected(other)),
                }
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The session's token, valid for at least `min_valid` more.
    pub fn get(&mut self, name: &str, min_valid: Duration) -> Result<TokenReply, ClientError> {
        self.get_with(name, &TokenOptions::new().min_valid(min_valid))
    }

    /// A token as `options` ask: the session's own, or a down-scoped one.
    pub fn get_with(
        &mut self,
        name: &str,
        options: &TokenOptions,
    ) -> Result<TokenReply, ClientError> {
        match self.request(&options.request(name))? {
            Response::Token(token) => options.check(token),
            other => Err(unexpected(other)),
        }
    }

    /// Turns this connection into a subscription to session `name`: the
    /// [`Watcher`] yields the current state, then every new token or
    /// failure as it happens, and ends after the session's removal.
    pub fn watch(mut self, name: &str) -> Result<Watcher, ClientError> {
        match self.request(&Request::Watch { name: name.into() })? {
            Response::Watching { .. } => {}
            other => return Err(unexpected(other)),
        }
        // Events come when they come.
        self.stream
            .set_read_timeout(None)
            .map_err(|err| ClientError::Protocol(err.to_string()))?;
        Ok(Watcher {
            stream: self.stream,
            ended: false,
        })
    }

    /// Adds a session; the agent refreshes it at once.
    pub fn import(&mut self, session: ImportSession) -> Result<String, ClientError> {
        self.done(&Request::Import(Box::new(session)))
    }

    pub fn remove(&mut self, name: &str) -> Result<String, ClientError> {
        self.done(&Request::Remove { name: name.into() })
    }

    /// Revokes the session's refresh token at the provider where it can,
    /// then forgets the session. The message says whether it was revoked.
    pub fn logout(&mut self, name: &str) -> Result<String, ClientError> {
        self.done(&Request::Logout { name: name.into() })
    }

    /// Refreshes now, whatever the schedule says.
    pub fn refresh(&mut self, name: &str) -> Result<String, ClientError> {
        self.done(&Request::Refresh { name: name.into() })
    }

    pub fn list(&mut self) -> Result<Vec<SessionStatus>, ClientError> {
        match self.request(&Request::List)? {
            Response::Sessions { sessions } => Ok(sessions),
            other => Err(unexpected(other)),
        }
    }

    pub fn status(&mut self, name: &str) -> Result<SessionStatus, ClientError> {
        match self.request(&Request::Status { name: name.into() })? {
            Response::Status { session } => Ok(session),
            other => Err(unexpected(other)),
        }
    }

    /// Locks the agent: no tokens are served until [`Client::unlock`].
    pub fn lock(&mut self, passphrase: Secret) -> Result<String, ClientError> {
        self.done(&Request::Lock { passphrase })
    }

    pub fn unlock(&mut self, passphrase: Secret) -> Result<String, ClientError> {
        self.done(&Request::Unlock { passphrase })
    }

    /// The agent's version, pid, uptime, store and sessions by state.
    pub fn info(&mut self) -> Result<AgentInfo, ClientError> {
        match self.request(&Request::Info)? {
            Response::Info(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// Counters and histograms in Prometheus text format.
    pub fn metrics(&mut self) -> Result<String, ClientError> {
        match self.request(&Request::Metrics)? {
            Response::Metrics { text } => Ok(text),
            other => Err(unexpected(other)),
        }
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        match self.request(&Request::Ping)? {
            Response::Pong => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn done(&mut self, request: &Request) -> Result<String, ClientError> {
        match self.request(request)? {
            Response::Done { message } => Ok(message),
            other => Err(unexpected(other)),
        }
    }
}

/// A subscription to one session's changes; see [`Client::watch`]. Each
/// item is one event, in the order the agent saw them. A reader that falls
/// far behind (64 events) is sent the current state instead of the events
/// it missed.
pub struct Watcher {
    stream: UnixStream,
    ended: bool,
}

impl Watcher {
    /// Waits for the next event. After the session's removal (an event
    /// with `no_such_session`) the agent closes the subscription.
    pub fn next_event(&mut self) -> Result<WatchEvent, ClientError> {
        if self.ended {
            return Err(ClientError::Protocol("the subscription has ended".into()));
        }
        let response = read_frame(&mut self.stream, MAX_RESPONSE_LEN);
        let event = match response {
            Ok(Response::Event(event)) => event,
            Ok(Response::Error(reply)) => {
                self.ended = true;
                return Err(ClientError::Agent(reply));
            }
            Ok(other) => return Err(unexpected(other)),
            Err(err) => {
                self.ended = true;
                return Err(err.into());
            }
        };
        if is_final(&event) {
            self.ended = true;
        }
        Ok(event)
    }
}

impl Iterator for Watcher {
    type Item = Result<WatchEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        Some(self.next_event())
    }
}

/// Whether an event is the last of its subscription.
pub(crate) fn is_final(event: &WatchEvent) -> bool {
    event
        .error
        .as_ref()
        .is_some_and(|e| e.code == ErrorCode::NoSuchSession)
}

fn open(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| ClientError::NoAgent {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn unexpected(response: Response) -> ClientError {
    let kind = match response {
        Response::Hello { .. } => "hello",
        Response::Pong => "pong",
        Response::Token(_) => "token",
        Response::Sessions { .. } => "sessions",
        Response::Status { .. } => "status",
        Response::Done { .. } => "done",
        Response::Info(_) => "info",
        Response::Metrics { .. } => "metrics",
        Response::Watching { .. } => "watching",
        Response::Event(_) => "event",
        Response::Error(_) => "error",
    };
    ClientError::Protocol(format!("the agent answered with an unexpected {kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(scope: &[&str], audience: Option<&str>) -> TokenReply {
        TokenReply {
            access_token: Secret::new("t"),
            token_type: "Bearer".into(),
            expires_at: 1,
            scope: scope.iter().map(|s| s.to_string()).collect(),
            audience: audience.map(str::to_string),
        }
    }

    /// Serves one connection: hello, then `answers` in turn, each after
    /// its delay.
    fn serve(mut stream: UnixStream, answers: Vec<(Duration, Response)>) {
        let _: Request = read_frame(&mut stream, MAX_REQUEST_LEN).unwrap();
        let hello = Response::Hello {
            version: PROTOCOL_VERSION,
            agent: "fake".into(),
        };
        write_frame(&mut stream, &hello, MAX_RESPONSE_LEN).unwrap();
        for (delay, answer) in answers {
            let _: Request = read_frame(&mut stream, MAX_REQUEST_LEN).unwrap();
            std::thread::sleep(delay);
            let _ = write_frame(&mut stream, &answer, MAX_RESPONSE_LEN);
        }
    }

    #[test]
    fn a_late_answer_is_never_taken_for_the_next_one() {
        let dir = tempfile_dir();
        let path = dir.join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let late = Response::Sessions { sessions: vec![] };
            let first = listener.accept().unwrap().0;
            let slow = std::thread::spawn(move || {
                serve(first, vec![(Duration::from_millis(400), late)]);
            });
            let second = listener.accept().unwrap().0;
            serve(second, vec![(Duration::ZERO, Response::Pong)]);
            slow.join().unwrap();
        });

        let mut client = Client::connect(&path).unwrap();
        client.set_timeout(Duration::from_millis(100)).unwrap();
        assert!(matches!(client.list(), Err(ClientError::Protocol(_))));
        client.ping().expect("a fresh connection answers the ping");
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "token-agent-client-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_token_for_other_scopes_than_asked_is_refused() {
        let plain = TokenOptions::new();
        assert!(plain.check(token(&[], None)).is_ok());

        let narrow = TokenOptions::new().scope("b").scope("a").scope("a");
        assert!(narrow.check(token(&["a", "b"], None)).is_ok());
        // An older agent ignores the scopes and serves the session's token.
        assert!(narrow.check(token(&[], None)).is_err());

        let audience = TokenOptions::new().audience("https://api");
        assert!(audience.check(token(&[], Some("https://api"))).is_ok());
        assert!(audience.check(token(&[], None)).is_err());
    }
}
