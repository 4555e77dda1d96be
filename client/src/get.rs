//! `tokenctl get`, shared by both binaries: the fast `tokenctl`, which
//! answers it without clap, and `tokenctl-full`, which answers everything.
//! Also the exit codes both give for the agent's errors.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use token_agent_client::proto::{ErrorCode, TokenReply};
use token_agent_client::{Client, ClientError, TokenOptions};

/// How `get` prints the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The token alone.
    Raw,
    /// {"access_token", "token_type", "expires_at", "expires_in"}.
    Json,
    /// `Authorization: Bearer ...`.
    Header,
}

/// An error to print after `tokenctl: `, and the exit code.
pub struct Failure {
    pub message: String,
    pub exit_code: u8,
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        let exit_code = match &err {
            ClientError::NoAgent { .. } => 3,
            ClientError::Agent(reply) => match reply.code {
                ErrorCode::NoSuchSession => 4,
                ErrorCode::ReauthRequired => 5,
                ErrorCode::TemporarilyUnavailable => 6,
                ErrorCode::ClientMisconfigured => 7,
                ErrorCode::Locked => 8,
                ErrorCode::PermissionDenied => 9,
                _ => 1,
            },
            ClientError::Protocol(_) => 1,
        };
        let mut message = err.to_string();
        if let ClientError::Agent(reply) = &err {
            if let Some(provider) = &reply.provider_error {
                message.push_str(&format!("\n  provider error: {}", provider.error));
                if let Some(description) = &provider.description {
                    message.push_str(&format!(" ({description})"));
                }
                if !provider.codes.is_empty() {
                    message.push_str(&format!(" [{}]", provider.codes.join(", ")));
                }
            }
        }
        Failure { message, exit_code }
    }
}

/// A failure with exit code 1.
pub fn failure(message: String) -> Failure {
    Failure {
        message,
        exit_code: 1,
    }
}

/// `tokenctl get`: one token from the agent at `socket`, printed on
/// standard output. Connecting, the version handshake and the request take
/// one round trip ([`Client::get_once`]).
pub fn get(
    socket: &Path,
    name: &str,
    options: &TokenOptions,
    format: Format,
) -> Result<(), Failure> {
    let token = Client::get_once(socket, name, options)?;
    let mut out = std::io::stdout().lock();
    print_token(&mut out, &token, format)
        .map_err(|err| failure(format!("cannot write the output: {err}")))
}

pub fn print_token(
    out: &mut impl Write,
    token: &TokenReply,
    format: Format,
) -> std::io::Result<()> {
    let secret = token.access_token.expose();
    match format {
        Format::Raw => writeln!(out, "{secret}"),
        Format::Header => writeln!(out, "Authorization: Bearer {secret}"),
        Format::Json => {
            let json = serde_json::json!({
                "access_token": secret,
                "token_type": token.token_type,
                "expires_at": token.expires_at,
                "expires_in": token.expires_at.saturating_sub(now()),
            });
            serde_json::to_writer(&mut *out, &json)?;
            writeln!(out)
        }
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
