//! The wire protocol between token-agent and its clients.
//!
//! A connection carries frames in both directions. A frame is a 4-byte
//! big-endian length followed by that many bytes of UTF-8 JSON. A request
//! over [`MAX_REQUEST_LEN`] is refused and its connection closed; responses
//! may be up to [`MAX_RESPONSE_LEN`].
//!
//! The client speaks first: its first frame is [`Request::Hello`] with the
//! [`PROTOCOL_VERSION`] it speaks, and the agent answers [`Response::Hello`]
//! or an [`ErrorCode::UnsupportedVersion`] error. After that, each request
//! gets exactly one response, in order.
//!
//! `PROTOCOL.md` beside this crate describes every message with examples, for
//! clients written in other languages.
//!
//! ```
//! use token_agent_proto::{decode, encode_frame, Request, MAX_REQUEST_LEN};
//!
//! let get = Request::Get {
//!     name: "work".into(),
//!     min_valid_secs: 30,
//!     scope: vec![],
//!     audience: None,
//! };
//! let frame = encode_frame(&get, MAX_REQUEST_LEN).unwrap();
//! let body = &frame[4..];
//! let request: Request = decode(body).unwrap();
//! assert!(matches!(request, Request::Get { min_valid_secs: 30, .. }));
//! ```

pub mod answer;
mod frame;
mod messages;
mod secret;

pub use frame::{
    decode, encode_frame, read_frame, write_frame, FrameError, MAX_REQUEST_LEN, MAX_RESPONSE_LEN,
};
pub use messages::*;
pub use secret::Secret;

/// The protocol version this crate speaks. A change that an older peer would
/// misread bumps it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Where the agent listens and clients connect when nothing else is said:
/// `$TOKEN_AGENT_SOCK`, else `$XDG_RUNTIME_DIR/token-agent/agent.sock`, else
/// `/tmp/token-agent-$UID/agent.sock` (for hosts without a runtime folder;
/// the agent refuses that folder if another user made it first).
pub fn default_socket_path() -> std::path::PathBuf {
    use std::path::PathBuf;

    let from_env = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(path) = from_env("TOKEN_AGENT_SOCK") {
        return PathBuf::from(path);
    }
    if let Some(runtime) = from_env("XDG_RUNTIME_DIR") {
        return PathBuf::from(runtime).join("token-agent/agent.sock");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("token-agent-{uid}/agent.sock"))
}

/// Longest session name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a session name: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters,
/// digits and `. _ - @ + :`, not starting with `.` or `-`.
///
/// Names end up in file names, log lines and shell commands, so anything that
/// could be read as a path, an option or a control character is refused.
pub fn validate_session_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a session name cannot be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "a session name is at most {MAX_NAME_LEN} bytes long"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("a session name cannot start with '.' or '-'".into());
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-@+:".contains(c);
    if let Some(bad) = name.chars().find(|&c| !allowed(c)) {
        return Err(format!(
            "a session name may hold only letters, digits and . _ - @ + : (found {:?})",
            bad.escape_default().to_string()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_that_could_be_paths_or_options_are_refused() {
        assert!(validate_session_name("work").is_ok());
        assert!(validate_session_name("alice@example.org").is_ok());
        assert!(validate_session_name("").is_err());
        assert!(validate_session_name("../etc").is_err());
        assert!(validate_session_name("a/b").is_err());
        assert!(validate_session_name("-rf").is_err());
        assert!(validate_session_name("nul\0byte").is_err());
        assert!(validate_session_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }
}
