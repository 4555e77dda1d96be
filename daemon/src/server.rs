//! The Unix socket: binding it safely, the accept loop, and one handler per
//! connection that frames requests and replies and forwards the rest to the
//! [`Agent`].
//!
//! A connection that sends garbage gets an error reply; one that sends an
//! oversized frame or no hello gets an error and is closed; one that says
//! nothing for 10 s, or leaves a reply unread for 10 s, is closed. None of
//! them affects any other connection.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use token_agent_proto::{
    decode, ErrorCode, ErrorReply, Request, Response, WatchEvent, MAX_REQUEST_LEN,
    MAX_RESPONSE_LEN, PROTOCOL_VERSION,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use crate::agent::Agent;
use crate::peer::Caller;

/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a reply may wait for the client to read it. A client that
/// sends requests and never reads would otherwise hold its connection (and
/// its task and descriptor) for good.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket at `path`: its folder owner-only, the socket 0600, a
/// stale socket from a dead agent replaced, a live agent left alone.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    prepare_folder(folder)?;

    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "another token-agent is already serving on {}; stop it first or pick another --socket",
            path.display()
        ),
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(_) => {
            // Nothing answers: a socket left by an agent that died.
            let metadata = std::fs::symlink_metadata(path)
                .with_context(|| format!("cannot inspect {}", path.display()))?;
            if !std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()) {
                bail!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "replaced a stale socket left by a stopped agent");
        }
    }

    // The process umask (077, set in main) keeps the socket private from
    // the moment it exists; the chmod states it plainly.
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} owner-only", path.display()))?;
    Ok(listener)
}

/// Creates the socket's folder 0700, or checks that an existing one is
/// ours and not open to others.
fn prepare_folder(folder: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)
        .with_context(|| format!("cannot create the socket folder {}", folder.display()))?;

    let metadata = std::fs::metadata(folder)
        .with_context(|| format!("cannot inspect the socket folder {}", folder.display()))?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if metadata.uid() != uid {
        bail!(
            "the socket folder {} belongs to uid {}, not to this user ({uid}); refusing to use it",
            folder.display(),
            metadata.uid()
        );
    }
    if metadata.mode() & 0o022 != 0 {
        bail!(
            "the socket folder {} is writable by others (mode {:o}); refusing to use it",
            folder.display(),
            metadata.mode() & 0o777
        );
    }
    Ok(())
}

/// Accepts connections until `shutdown`, each handled in its own task.
pub async fn serve(
    listener: UnixListener,
    agent: Arc<Agent>,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                next_id += 1;
                let span = info_span!("conn", id = next_id);
                connections.spawn(
                    handle_connection(stream, agent.clone(), shutdown.clone()).instrument(span),
                );
            }
            Err(err) => {
                // Out of file descriptors and the like: pause rather than
                // spin, and keep serving the connections already open.
                warn!(error = %err, "cannot accept a connection; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle_connection(stream: UnixStream, agent: Arc<Agent>, shutdown: CancellationToken) {
    // The executable and unit are read now only when a session rule will
    // want them; otherwise when first asked for (a rule added by a reload).
    let caller = match Caller::of(&stream, agent.policy().has_session_rules()) {
        Ok(caller) => caller,
        Err(err) => {
            warn!(error = %err, "cannot read the peer's credentials; closing");
            return;
        }
    };
    debug!(
        uid = caller.uid,
        pid = ?caller.pid,
        exe = ?caller.exe(),
        unit = ?caller.unit(),
        "client connected"
    );
    let (read_half, write_half) = stream.into_split();
    let mut requests = FramedRead::new(
        read_half,
        LengthDelimitedCodec::builder()
            .max_frame_length(MAX_REQUEST_LEN)
            .new_codec(),
    );
    let mut replies = FramedWrite::new(
        write_half,
        LengthDelimitedCodec::builder()
            .max_frame_length(MAX_RESPONSE_LEN)
            .new_codec(),
    );

    match tokio::time::timeout(HELLO_TIMEOUT, requests.next()).await {
        Ok(Some(Ok(frame))) => {
            // The refusal answers the hello, so the client reads it as the
            // reply to its first request rather than finding a closed pipe.
            let reply = if agent.policy().may_connect(&caller) {
                greet(&frame)
            } else {
                refuse(&caller)
            };
            let accepted = matches!(reply, Response::Hello { .. });
            // A client that sent its first request with the hello (as
            // `tokenctl get` does) gets both answers in one write, and
            // wakes once.
            let written = if accepted && request_waiting(&requests) {
                hold(&mut replies, &reply).await
            } else {
                send(&mut replies, &reply).await
            };
            if written.is_err() || !accepted {
                return;
            }
        }
        Ok(Some(Err(err))) => {
            let _ = send(&mut replies, &frame_error(&err)).await;
            return;
        }
        Ok(None) => return,
        Err(_) => {
            debug!("no hello within {HELLO_TIMEOUT:?}; closing");
            return;
        }
    }

    loop {
        let frame = tokio::select! {
            frame = requests.next() => frame,
            () = shutdown.cancelled() => return,
        };
        let reply = match frame {
            None => return,
            Some(Err(err)) => {
                // The stream cannot be resynchronised after a bad length.
                let _ = send(&mut replies, &frame_error(&err)).await;
                return;
            }
            Some(Ok(frame)) => match decode::<Request>(&frame) {
                Ok(Request::Watch { name }) => {
                    debug!(op = "watch", "request");
                    match agent.subscribe(&name, &caller) {
                        Ok((current, events)) => {
                            let mut watch = Watch {
                                agent: &agent,
                                name,
                                requests: &mut requests,
                                replies: &mut replies,
                            };
                            watch.run(current, events, &shutdown).await;
                            return;
                        }
                        Err(reply) => Response::Error(reply),
                    }
                }
                Ok(request) => {
                    debug!(op = op_name(&request), "request");
                    agent.handle(request, &caller).await
                }
                Err(err) => {
                    Response::Error(ErrorReply::new(ErrorCode::BadRequest, err.to_string()))
                }
            },
        };
        if send(&mut replies, &reply).await.is_err() {
            return;
        }
    }
}

type Requests = FramedRead<OwnedReadHalf, LengthDelimitedCodec>;
type Replies = FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>;

/// A connection that became a subscription to one session's changes.
struct Watch<'a> {
    agent: &'a Agent,
    name: String,
    requests: &'a mut Requests,
    replies: &'a mut Replies,
}

impl Watch<'_> {
    /// Acknowledges, sends the current state, then every change until the
    /// client closes, the session goes, or the agent stops. Events come
    /// from a bounded channel: a subscriber that falls behind by more
    /// than its backlog skips to the current state, and the refresher
    /// never waits for it.
    async fn run(
        &mut self,
        current: WatchEvent,
        mut events: tokio::sync::broadcast::Receiver<WatchEvent>,
        shutdown: &CancellationToken,
    ) {
        let ack = Response::Watching {
            name: self.name.clone(),
        };
        if send(self.replies, &ack).await.is_err() {
            return;
        }
        let mut last = None;
        let mut next = Some(current);
        loop {
            if let Some(event) = next.take() {
                let event = self.guard(event);
                // The first event may already show a change that is also
                // queued; each is sent once.
                if last.as_ref() != Some(&event) {
                    let is_last = event
                        .error
                        .as_ref()
                        .is_some_and(|e| e.code == ErrorCode::NoSuchSession);
                    if send(self.replies, &Response::Event(event.clone()))
                        .await
                        .is_err()
                        || is_last
                    {
                        return;
                    }
                    last = Some(event);
                }
            }
            next = tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => Some(event),
                    Err(RecvError::Lagged(skipped)) => {
                        debug!(session = %self.name, skipped, "a watcher fell behind; sending the current state");
                        Some(self.agent.current_event(&self.name).unwrap_or_else(|| removed(&self.name)))
                    }
                    Err(RecvError::Closed) => Some(removed(&self.name)),
                },
                frame = self.requests.next() => match frame {
                    // The client closed, or broke the framing.
                    None | Some(Err(_)) => return,
                    // Nothing but closing is expected on a subscription.
                    Some(Ok(_)) => None,
                },
                () = shutdown.cancelled() => return,
            };
        }
    }

    /// While the agent is locked, a watcher hears that, not the token.
    fn guard(&self, mut event: WatchEvent) -> WatchEvent {
        if event.token.is_some() && self.agent.is_locked() {
            event.token = None;
            event.error = Some(ErrorReply::new(
                ErrorCode::Locked,
                "the agent is locked; `tokenctl unlock` it to be served tokens again",
            ));
        }
        event
    }
}

fn removed(name: &str) -> WatchEvent {
    WatchEvent {
        name: name.to_string(),
        generation: 0,
        state: token_agent_proto::SessionState::NeedsSignIn,
        token: None,
        error: Some(ErrorReply::new(
            ErrorCode::NoSuchSession,
            format!("session {name} was removed"),
        )),
    }
}

/// The answer to a peer of another user, with a log line an operator can
/// act on.
fn refuse(caller: &Caller) -> Response {
    warn!(
        uid = caller.uid,
        pid = ?caller.pid,
        exe = ?caller.exe(),
        "refused a connection from another user; allow it with [access] in the configuration"
    );
    Response::Error(ErrorReply::new(
        ErrorCode::PermissionDenied,
        format!(
            "this agent serves uid {} only; uid {} is not allowed",
            crate::peer::own_uid(),
            caller.uid
        ),
    ))
}

/// The answer to a connection's first frame.
fn greet(frame: &[u8]) -> Response {
    match decode::<Request>(frame) {
        Ok(Request::Hello { version }) if version == PROTOCOL_VERSION => Response::Hello {
            version: PROTOCOL_VERSION,
            agent: concat!("token-agent ", env!("CARGO_PKG_VERSION")).into(),
        },
        Ok(Request::Hello { version }) => Response::Error(ErrorReply::new(
            ErrorCode::UnsupportedVersion,
            format!("this agent speaks protocol version {PROTOCOL_VERSION}, not {version}; upgrade the older side"),
        )),
        Ok(_) => Response::Error(ErrorReply::new(
            ErrorCode::BadRequest,
            "the first message on a connection must be hello",
        )),
        Err(err) => Response::Error(ErrorReply::new(ErrorCode::BadRequest, err.to_string())),
    }
}

fn frame_error(err: &std::io::Error) -> Response {
    Response::Error(ErrorReply::new(
        ErrorCode::BadRequest,
        format!("unreadable frame ({err}); requests are at most {MAX_REQUEST_LEN} bytes"),
    ))
}

/// Whether a whole request frame is already read and waiting.
fn request_waiting(requests: &Requests) -> bool {
    let buffered = requests.read_buffer();
    buffered.len() >= 4
        && u32::from_be_bytes([buffered[0], buffered[1], buffered[2], buffered[3]]) as usize
            <= buffered.len() - 4
}

/// Queues a reply to go out with the next one ([`send`] writes both).
async fn hold(replies: &mut Replies, reply: &Response) -> std::io::Result<()> {
    let body = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    match tokio::time::timeout(SEND_TIMEOUT, replies.feed(Bytes::from(body))).await {
        Ok(queued) => queued,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn send(replies: &mut Replies, reply: &Response) -> std::io::Result<()> {
    let body = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    match tokio::time::timeout(SEND_TIMEOUT, replies.send(Bytes::from(body))).await {
        Ok(sent) => sent,
        Err(_) => {
            debug!("the client has not read its replies for {SEND_TIMEOUT:?}; closing");
            Err(std::io::ErrorKind::TimedOut.into())
        }
    }
}

/// The request's kind, for the debug log; never its contents.
fn op_name(request: &Request) -> &'static str {
    match request {
        Request::Hello { .. } => "hello",
        Request::Ping => "ping",
        Request::Get { .. } => "get",
        Request::Watch { .. } => "watch",
        Request::Import(_) => "import",
        Request::Remove { .. } => "remove",
        Request::Logout { .. } => "logout",
        Request::List => "list",
        Request::Status { .. } => "status",
        Request::Refresh { .. } => "refresh",
        Request::Lock { .. } => "lock",
        Request::Unlock { .. } => "unlock",
        Request::Info => "info",
        Request::Metrics => "metrics",
    }
}
