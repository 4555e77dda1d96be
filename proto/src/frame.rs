//! Frame encoding: a 4-byte big-endian length, then a JSON body.
//!
//! The async side (the agent) uses tokio-util's `LengthDelimitedCodec` with
//! the same layout; these blocking helpers serve simple clients such as
//! `tokenctl`, which must start fast and need no runtime.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest request body the agent accepts, in bytes. A larger frame is
/// refused and the connection closed.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// Largest response body a client accepts, in bytes: room for listing
/// 100,000 sessions.
pub const MAX_RESPONSE_LEN: usize = 64 * 1024 * 1024;

#[derive(Debug)]
pub enum FrameError {
    /// The peer announced or sent a body over the limit.
    TooLarge(usize),
    /// The body is not the JSON message expected here.
    Malformed(serde_json::Error),
    /// The connection failed or closed mid-frame.
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(len) => write!(f, "a frame of {len} bytes is over the limit"),
            // serde_json's message names the position and the expected
            // shape, never the offending text, so it cannot echo a secret.
            FrameError::Malformed(err) => write!(f, "malformed message: {err}"),
            FrameError::Io(err) => write!(f, "connection error: {err}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(err: io::Error) -> Self {
        FrameError::Io(err)
    }
}

/// Decodes one frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Malformed)
}

/// Encodes a message as a whole frame, length prefix included, refusing a
/// body over `max_len` bytes.
pub fn encode_frame<T: Serialize>(message: &T, max_len: usize) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; 4];
    serde_json::to_writer(&mut frame, message).map_err(FrameError::Malformed)?;

    let body_len = frame.len() - 4;
    if body_len > max_len {
        return Err(FrameError::TooLarge(body_len));
    }
    frame[..4].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(frame)
}

/// Writes one message as a frame, in a single write call.
pub fn write_frame<W: Write, T: Serialize>(
    writer: &mut W,
    message: &T,
    max_len: usize,
) -> Result<(), FrameError> {
    let frame = encode_frame(message, max_len)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

/// Reads one frame of at most `max_len` bytes and decodes its body.
pub fn read_frame<R: Read, T: DeserializeOwned>(
    reader: &mut R,
    max_len: usize,
) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    reader.read_exact(&mut prefix)?;

    let body_len = u32::from_be_bytes(prefix) as usize;
    if body_len > max_len {
        return Err(FrameError::TooLarge(body_len));
    }
    let mut body = vec![0u8; body_len];
    reader.read_exact(&mut body)?;
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, Response};

    #[test]
    fn a_frame_round_trips() {
        let request = Request::Get {
            name: "work".into(),
            min_valid_secs: 10,
            scope: vec![],
            audience: None,
        };
        let frame = encode_frame(&request, MAX_REQUEST_LEN).unwrap();
        let back: Request = read_frame(&mut frame.as_slice(), MAX_REQUEST_LEN).unwrap();
        assert_eq!(back, request);
    }

    #[test]
    fn a_length_over_the_limit_is_refused_before_reading_the_body() {
        let mut frame = ((MAX_REQUEST_LEN + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        let result: Result<Response, _> = read_frame(&mut frame.as_slice(), MAX_REQUEST_LEN);
        assert!(matches!(result, Err(FrameError::TooLarge(len)) if len == MAX_REQUEST_LEN + 1));
    }

    #[test]
    fn a_message_over_the_limit_is_not_encoded() {
        let request = Request::Remove {
            name: "x".repeat(MAX_REQUEST_LEN),
        };
        assert!(matches!(
            encode_frame(&request, MAX_REQUEST_LEN),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_prefix_without_its_body_is_an_io_error() {
        let frame = 10u32.to_be_bytes();
        let result: Result<Request, _> = read_frame(&mut frame.as_slice(), MAX_REQUEST_LEN);
        assert!(matches!(result, Err(FrameError::Io(_))));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for body in [&b"\xff\xfe"[..], b"null", b"{\"op\":\"nope\"}", b"[1,2]"] {
            assert!(matches!(
                decode::<Request>(body),
                Err(FrameError::Malformed(_))
            ));
        }
    }
}
