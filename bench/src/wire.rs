//! The client side of the measurements: pre-encoded frames over a Unix
//! socket, so that the same few lines of client code run against the agent
//! and against the echo servers and only the server differs.
//!
//! Also the echo servers themselves, run as a child process of this binary
//! (`token-agent-bench echo-server`), just as the agent is.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use token_agent_client::proto::{encode_frame, MAX_REQUEST_LEN, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A frame from the wire protocol's JSON (proto/PROTOCOL.md), so that
/// optional fields added to the Rust types later change nothing here.
pub fn frame(request: &serde_json::Value) -> Vec<u8> {
    encode_frame(request, MAX_REQUEST_LEN).expect("a small request encodes")
}

pub fn hello_frame() -> Vec<u8> {
    frame(&serde_json::json!({"op": "hello", "version": PROTOCOL_VERSION}))
}

pub fn get_frame(name: &str) -> Vec<u8> {
    frame(&serde_json::json!({"op": "get", "name": name, "min_valid_secs": 0}))
}

/// One blocking connection that sends whole frames and reads whole replies.
pub struct RawConn {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl RawConn {
    /// Connects and says hello.
    pub fn connect(path: &Path) -> anyhow::Result<RawConn> {
        let stream =
            UnixStream::connect(path).with_context(|| format!("connect to {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut conn = RawConn {
            stream,
            buf: vec![0; 64 * 1024],
        };
        conn.round_trip(&hello_frame())?;
        Ok(conn)
    }

    /// Sends `frame` and reads the reply; returns the reply's body.
    pub fn round_trip(&mut self, frame: &[u8]) -> io::Result<&[u8]> {
        self.stream.write_all(frame)?;
        let mut prefix = [0u8; 4];
        self.stream.read_exact(&mut prefix)?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.buf.len() {
            self.buf.resize(len, 0);
        }
        self.stream.read_exact(&mut self.buf[..len])?;
        Ok(&self.buf[..len])
    }
}

/// The async twin of [`RawConn`], for many connections on one thread.
pub struct AsyncConn {
    stream: tokio::net::UnixStream,
    buf: Vec<u8>,
}

impl AsyncConn {
    pub async fn connect(path: &Path) -> anyhow::Result<AsyncConn> {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .with_context(|| format!("connect to {}", path.display()))?;
        let mut conn = AsyncConn {
            stream,
            buf: vec![0; 64 * 1024],
        };
        conn.round_trip(&hello_frame()).await?;
        Ok(conn)
    }

    pub async fn round_trip(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.stream.write_all(frame).await?;
        let mut prefix = [0u8; 4];
        self.stream.read_exact(&mut prefix).await?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.buf.len() {
            self.buf.resize(len, 0);
        }
        self.stream.read_exact(&mut self.buf[..len]).await?;
        Ok(len)
    }

    pub fn body(&self, len: usize) -> &[u8] {
        &self.buf[..len]
    }
}

/// Whether a reply body is a token reply.
pub fn is_token(body: &[u8]) -> bool {
    body.starts_with(br#"{"kind":"token""#)
}

/// Waits until something accepts connections on `path`.
pub fn wait_for_socket(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if start.elapsed() > limit {
            anyhow::bail!("nothing listens on {} after {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum EchoMode {
    /// One blocking thread per connection: the physical floor.
    Threads,
    /// The agent's own transport stack (tokio multi-threaded runtime,
    /// tokio-util length-delimited framing, a task per connection) with
    /// no request handling: what the agent costs beyond the transport.
    Tokio,
    /// The same on a current-thread runtime: one thread, no hand-offs
    /// between worker threads.
    TokioCurrent,
}

/// Serves `reply_bytes`-byte replies to every frame, until killed.
pub fn echo_server(socket: &Path, reply_bytes: usize, mode: EchoMode) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(socket);
    let mut reply = (reply_bytes as u32).to_be_bytes().to_vec();
    reply.resize(4 + reply_bytes, b'x');
    match mode {
        EchoMode::Threads => {
            let listener = UnixListener::bind(socket)?;
            for stream in listener.incoming() {
                let mut stream = stream?;
                let reply = reply.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; MAX_REQUEST_LEN];
                    loop {
                        let mut prefix = [0u8; 4];
                        if stream.read_exact(&mut prefix).is_err() {
                            return;
                        }
                        let len = (u32::from_be_bytes(prefix) as usize).min(buf.len());
                        if stream.read_exact(&mut buf[..len]).is_err()
                            || stream.write_all(&reply).is_err()
                        {
                            return;
                        }
                    }
                });
            }
            Ok(())
        }
        EchoMode::Tokio => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(tokio_echo(socket, bytes::Bytes::from(reply[4..].to_vec()))),
        EchoMode::TokioCurrent => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(tokio_echo(socket, bytes::Bytes::from(reply[4..].to_vec()))),
    }
}

async fn tokio_echo(socket: &Path, reply: bytes::Bytes) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

    let listener = tokio::net::UnixListener::bind(socket)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let reply = reply.clone();
        tokio::spawn(async move {
            let (read_half, write_half) = stream.into_split();
            let mut requests = FramedRead::new(
                read_half,
                LengthDelimitedCodec::builder()
                    .max_frame_length(MAX_REQUEST_LEN)
                    .new_codec(),
            );
            let mut replies = FramedWrite::new(write_half, LengthDelimitedCodec::new());
            while let Some(Ok(_frame)) = requests.next().await {
                if replies.send(reply.clone()).await.is_err() {
                    return;
                }
            }
        });
    }
}
