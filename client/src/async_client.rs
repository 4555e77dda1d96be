//! The async client, on tokio (the `async` feature): the same operations
//! and errors as the blocking [`Client`](crate::Client).

use std::path::{Path, PathBuf};
use std::time::Duration;

use token_agent_proto::{
    decode, encode_frame, AgentInfo, ImportSession, Request, Response, SessionStatus, TokenReply,
    WatchEvent, MAX_REQUEST_LEN, MAX_RESPONSE_LEN, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::{
    default_socket_path, is_final, unexpected, ClientError, TokenOptions, DEFAULT_TIMEOUT,
};

/// One connection to the agent, for async programs. Requests on it are
/// answered in order; a connection the agent closed (it restarted) is
/// opened anew once, transparently.
///
/// ```no_run
/// use token_agent_client::{AsyncClient, TokenOptions};
///
/// # async fn run() -> Result<(), token_agent_client::ClientError> {
/// let mut agent = AsyncClient::connect_default().await?;
/// let token = agent
///     .get_with("work", &TokenOptions::new().min_valid(std::time::Duration::from_secs(60)))
///     .await?;
/// // Hand the token to the HTTP client; never print or log it.
/// let authorization = format!("Bearer {}", token.access_token.expose());
/// # drop(authorization);
///
/// // Swap the token whenever the agent refreshes it.
/// let mut watcher = agent.watch("work").await?;
/// while let Some(event) = watcher.next().await {
///     if let Some(token) = event?.token {
///         println!("new token, valid until {}", token.expires_at);
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct AsyncClient {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
    /// The last exchange failed midway; the next request reconnects.
    broken: bool,
}

impl AsyncClient {
    /// Connects to the default socket; see [`default_socket_path`].
    pub async fn connect_default() -> Result<AsyncClient, ClientError> {
        AsyncClient::connect(&default_socket_path()).await
    }

    /// Connects to the agent at `path` and agrees on the protocol version.
    pub async fn connect(path: &Path) -> Result<AsyncClient, ClientError> {
        let mut client = AsyncClient {
            stream: open(path).await?,
            path: path.to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
            broken: false,
        };
        client.hello().await?;
        Ok(client)
    }

    /// Limits how long each request may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    async fn hello(&mut self) -> Result<(), ClientError> {
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        match self.exchange(&hello).await? {
            Response::Hello { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sends one request and reads its answer. An error answer becomes
    /// [`ClientError::Agent`].
    pub async fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        if self.broken {
            self.reopen().await?;
        }
        let mut answer = self.exchange(request).await;
        if matches!(answer, Err(ClientError::Protocol(_))) && self.is_closed() {
            self.reopen().await?;
            answer = self.exchange(request).await;
        }
        // After a timeout or a garbled frame, the next answer on this
        // connection could be the late one: start the next request afresh.
        self.broken = matches!(answer, Err(ClientError::Protocol(_)));
        answer
    }

    async fn reopen(&mut self) -> Result<(), ClientError> {
        self.stream = open(&self.path).await?;
        self.hello().await?;
        self.broken = false;
        Ok(())
    }

    fn is_closed(&self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.try_read(&mut byte) {
            Ok(read) => read == 0,
            Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
        }
    }

    async fn exchange(&mut self, request: &Request) -> Result<Response, ClientError> {
        let frame = encode_frame(request, MAX_REQUEST_LEN)?;
        let exchange = async {
            let written = self.stream.write_all(&frame).await;
            let answer = read_response(&mut self.stream).await;
            // An agent that refuses us may close before our write lands;
            // its error frame is still worth more than the broken pipe.
            match (written, answer) {
                (_, Ok(answer)) => Ok(answer),
                (Err(err), Err(_)) => {
                    Err(ClientError::Protocol(format!("connection error: {err}")))
                }
                (Ok(()), Err(err)) => Err(err),
            }
        };
        let answer = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Protocol("the agent did not answer in time".into()))??;
        match answer {
            Response::Error(reply) => Err(ClientError::Agent(reply)),
            response => Ok(response),
        }
    }

    /// The session's token, valid for at least `min_valid` more.
    pub async fn get(
        &mut self,
        name: &str,
        min_valid: Duration,
    ) -> Result<TokenReply, ClientError> {
        self.get_with(name, &TokenOptions::new().min_valid(min_valid))
            .await
    }

    /// A token as `options` ask: the session's own, or a down-scoped one.
    pub async fn get_with(
        &mut self,
        name: &str,
        options: &TokenOptions,
    ) -> Result<TokenReply, ClientError> {
        match self.request(&options.request(name)).await? {
            Response::Token(token) => options.check(token),
            other => Err(unexpected(other)),
        }
    }

    pub async fn list(&mut self) -> Result<Vec<SessionStatus>, ClientError> {
        match self.request(&Request::List).await? {
            Response::Sessions { sessions } => Ok(sessions),
            other => Err(unexpected(other)),
        }
    }

    pub async fn status(&mut self, name: &str) -> Result<SessionStatus, ClientError> {
        match self.request(&Request::Status { name: name.into() }).await? {
            Response::Status { session } => Ok(session),
            other => Err(unexpected(other)),
        }
    }

    /// Adds a session; the agent refreshes it at once.
    pub async fn import(&mut self, session: ImportSession) -> Result<String, ClientError> {
        self.done(&Request::Import(Box::new(session))).await
    }

    pub async fn remove(&mut self, name: &str) -> Result<String, ClientError> {
        self.done(&Request::Remove { name: name.into() }).await
    }

    /// Refreshes now, whatever the schedule says.
    pub async fn refresh(&mut self, name: &str) -> Result<String, ClientError> {
        self.done(&Request::Refresh { name: name.into() }).await
    }

    /// The agent's version, pid, uptime, store and sessions by state.
    pub async fn info(&mut self) -> Result<AgentInfo, ClientError> {
        match self.request(&Request::Info).await? {
            Response::Info(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    pub async fn ping(&mut self) -> Result<(), ClientError> {
        match self.request(&Request::Ping).await? {
            Response::Pong => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Turns this connection into a subscription to session `name`; see
    /// [`Client::watch`](crate::Client::watch).
    pub async fn watch(mut self, name: &str) -> Result<AsyncWatcher, ClientError> {
        match self.request(&Request::Watch { name: name.into() }).await? {
            Response::Watching { .. } => Ok(AsyncWatcher {
                stream: self.stream,
                ended: false,
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn done(&mut self, request: &Request) -> Result<String, ClientError> {
        match self.request(request).await? {
            Response::Done { message } => Ok(message),
            other => Err(unexpected(other)),
        }
    }
}

/// A subscription to one session's changes, for async programs.
pub struct AsyncWatcher {
    stream: UnixStream,
    ended: bool,
}

impl AsyncWatcher {
    /// The next event; `None` once the subscription has ended (the
    /// session was removed, or the connection closed after an error).
    pub async fn next(&mut self) -> Option<Result<WatchEvent, ClientError>> {
        if self.ended {
            return None;
        }
        let event = match read_response(&mut self.stream).await {
            Ok(Response::Event(event)) => event,
            Ok(Response::Error(reply)) => {
                self.ended = true;
                return Some(Err(ClientError::Agent(reply)));
            }
            Ok(other) => return Some(Err(unexpected(other))),
            Err(err) => {
                self.ended = true;
                return Some(Err(err));
            }
        };
        if is_final(&event) {
            self.ended = true;
        }
        Some(Ok(event))
    }
}

async fn open(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::NoAgent {
            path: path.to_path_buf(),
            source,
        })
}

async fn read_response(stream: &mut UnixStream) -> Result<Response, ClientError> {
    let io = |err: std::io::Error| ClientError::Protocol(format!("connection error: {err}"));
    let len = stream.read_u32().await.map_err(io)? as usize;
    if len > MAX_RESPONSE_LEN {
        return Err(ClientError::Protocol(format!(
            "a frame of {len} bytes is over the limit"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(io)?;
    Ok(decode(&body)?)
}
