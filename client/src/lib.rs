//! A client for token-agent, for Rust programs and for `tokenctl`.
//!
//! It is blocking and small on purpose: a program that wants one token should
//! not pay for an async runtime or TLS to get it.
//!
//! ```no_run
//! use std::time::Duration;
//! use token_agent_client::Client;
//!
//! let mut agent = Client::connect_default()?;
//! let token = agent.get("work", Duration::from_secs(60))?;
//! println!("Authorization: Bearer {}", token.access_token.expose());
//! # Ok::<(), token_agent_client::ClientError>(())
//! ```

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use token_agent_proto as proto;
use token_agent_proto::{
    read_frame, write_frame, AgentInfo, ErrorCode, ErrorReply, FrameError, ImportSession, Request,
    Response, Secret, SessionStatus, TokenReply, MAX_REQUEST_LEN, MAX_RESPONSE_LEN,
    PROTOCOL_VERSION,
};

/// How long a request may take by default. A `get` can wait for a refresh,
/// and an import for discovery plus a refresh, so this is generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

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
}

impl Client {
    /// Connects to the default socket; see [`default_socket_path`].
    pub fn connect_default() -> Result<Client, ClientError> {
        Client::connect(&default_socket_path())
    }

    /// Connects to the agent at `path` and agrees on the protocol version.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::NoAgent {
            path: path.to_path_buf(),
            source,
        })?;
        let mut client = Client { stream };
        client.set_timeout(DEFAULT_TIMEOUT)?;

        match client.request(&Request::Hello {
            version: PROTOCOL_VERSION,
        })? {
            Response::Hello { .. } => Ok(client),
            other => Err(unexpected(other)),
        }
    }

    /// Limits how long each request may take.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let io = |err: std::io::Error| ClientError::Protocol(err.to_string());
        self.stream.set_read_timeout(Some(timeout)).map_err(io)?;
        self.stream.set_write_timeout(Some(timeout)).map_err(io)
    }

    /// Sends one request and reads its answer. An error answer becomes
    /// [`ClientError::Agent`].
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
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

    /// A token valid for at least `min_valid` more.
    pub fn get(&mut self, name: &str, min_valid: Duration) -> Result<TokenReply, ClientError> {
        let request = Request::Get {
            name: name.into(),
            min_valid_secs: min_valid.as_secs(),
        };
        match self.request(&request)? {
            Response::Token(token) => Ok(token),
            other => Err(unexpected(other)),
        }
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

fn unexpected(response: Response) -> ClientError {
    let kind = match response {
        Response::Hello { .. } => "hello",
        Response::Pong => "pong",
        Response::Token(_) => "token",
        Response::Sessions { .. } => "sessions",
        Response::Status { .. } => "status",
        Response::Done { .. } => "done",
        Response::Info(_) => "info",
        Response::Metrics { .. } => "metrics",
        Response::Error(_) => "error",
    };
    ClientError::Protocol(format!("the agent answered with an unexpected {kind}"))
}
