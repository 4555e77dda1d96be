//! Requests, responses and the shapes inside them.
//!
//! Times are whole seconds since the Unix epoch (UTC); durations are whole
//! seconds. Unknown fields are ignored so that a newer peer may add optional
//! fields without a version bump.

use serde::{Deserialize, Serialize};

use crate::Secret;

/// A client's request. The `op` field names the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Must be the first frame on a connection.
    Hello {
        version: u32,
    },
    /// Answered by [`Response::Pong`].
    Ping,
    /// A current access token for the session, valid for at least
    /// `min_valid_secs` more seconds. Refreshes first if it must.
    ///
    /// With `scope` or `audience`, a down-scoped token instead: one for
    /// fewer scopes (a subset of the session's) or another audience,
    /// obtained with the session's refresh token and cached apart from the
    /// session's own token. Absent or empty: the session's own token.
    Get {
        name: String,
        #[serde(default)]
        min_valid_secs: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        scope: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audience: Option<String>,
    },
    /// Turns the connection into a subscription to the session's token:
    /// answered by [`Response::Watching`], then one [`Response::Event`]
    /// with the current state and one per change (a new token, a failure,
    /// the session's removal), until the client closes.
    Watch {
        name: String,
    },
    /// Adds a session from a refresh token obtained elsewhere. The agent
    /// refreshes at once, so a bad token or client is reported right away.
    Import(Box<ImportSession>),
    /// Forgets a session and its tokens.
    Remove {
        name: String,
    },
    /// Every session's status.
    List,
    /// One session's status.
    Status {
        name: String,
    },
    /// Refreshes now, whatever the schedule says.
    Refresh {
        name: String,
    },
    /// Signs a session out: revokes its refresh token at the provider
    /// (RFC 7009) where the provider has a revocation endpoint, then forgets
    /// the session. The answer says whether revocation happened.
    Logout {
        name: String,
    },
    /// Stops serving tokens until [`Request::Unlock`] with the same
    /// passphrase. Refreshes go on, so nothing expires while locked.
    Lock {
        passphrase: Secret,
    },
    Unlock {
        passphrase: Secret,
    },
    /// The agent's own facts: version, pid, uptime, store, sessions by state.
    Info,
    /// Counters and histograms in Prometheus text format.
    Metrics,
}

/// How the client authenticates itself at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_secret_basic`: the secret in an HTTP Basic header. The
    /// default when a secret is given, as RFC 6749 asks servers to support it.
    #[default]
    Basic,
    /// `client_secret_post`: the secret in the form body.
    Post,
    /// A public client: `client_id` in the body, no secret.
    None,
}

/// How the agent gets a session's next access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// Present the refresh token (`grant_type=refresh_token`), keeping the
    /// rotated one.
    #[default]
    RefreshToken,
    /// A service account: no refresh token exists, and the agent asks for a
    /// new access token with the client's own credentials
    /// (`grant_type=client_credentials`) before the old one expires.
    ClientCredentials,
}

impl Grant {
    pub fn is_refresh_token(&self) -> bool {
        *self == Grant::RefreshToken
    }
}

/// Who signed in, for display only: read from the ID token's payload or
/// the userinfo endpoint, never used to decide anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

impl Identity {
    /// The most readable name there is: username, then email, then `sub`.
    pub fn display_name(&self) -> Option<&str> {
        self.preferred_username
            .as_deref()
            .or(self.email.as_deref())
            .or(self.sub.as_deref())
    }

    pub fn is_empty(&self) -> bool {
        self.display_name().is_none()
    }
}

/// Everything needed to add a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSession {
    pub name: String,
    pub issuer: String,
    /// When absent, the agent reads it from the issuer's discovery document.
    #[serde(default)]
    pub token_endpoint: Option<String>,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<Secret>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Empty (or absent) only with [`Grant::ClientCredentials`].
    #[serde(default = "Secret::empty")]
    pub refresh_token: Secret,
    /// How the agent renews the session; `refresh_token` by default.
    #[serde(default, skip_serializing_if = "Grant::is_refresh_token")]
    pub grant: Grant,
    /// The provider's RFC 7009 revocation endpoint, when the caller read it
    /// from discovery itself (with `token_endpoint` set, the agent does not
    /// look it up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_endpoint: Option<String>,
    /// Who signed in, for `status` to show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// The access token issued together with `refresh_token`, when the
    /// caller has one (a web app right after sign-in). With it the agent
    /// stores the tokens as they are instead of refreshing at once.
    #[serde(default)]
    pub access_token: Option<Secret>,
    /// The provider's `expires_in` for `access_token`, in seconds.
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// The provider's `refresh_expires_in`, in seconds, when it gave one.
    #[serde(default)]
    pub refresh_expires_in: Option<u64>,
    /// Refresh ahead of expiry only while the session was asked for within
    /// this many seconds; an idle session lapses and is refreshed on its next
    /// `get`. Absent: always keep it fresh.
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
    /// Remove the session this many seconds after the import, revoking its
    /// refresh token where the provider offers revocation.
    #[serde(default)]
    pub lifetime_secs: Option<u64>,
    /// Replace a session of the same name instead of failing.
    #[serde(default)]
    pub replace: bool,
}

/// The agent's answer to one request. The `kind` field names the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        agent: String,
    },
    Pong,
    Token(TokenReply),
    Sessions {
        sessions: Vec<SessionStatus>,
    },
    Status {
        session: SessionStatus,
    },
    /// The request was carried out; the message says what happened.
    Done {
        message: String,
    },
    Info(AgentInfo),
    Metrics {
        text: String,
    },
    /// The acknowledgement of [`Request::Watch`]; events follow.
    Watching {
        name: String,
    },
    /// A change pushed to a subscriber; see [`WatchEvent`].
    Event(WatchEvent),
    Error(ErrorReply),
}

/// What a subscriber is told about its session: a new token, or why there
/// is none. The first event after [`Response::Watching`] is the current
/// state; each later one is a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub name: String,
    /// Counts the session's successful refreshes; grows with every token.
    pub generation: u64,
    pub state: SessionState,
    /// The current token, when the session has a valid one.
    #[serde(default)]
    pub token: Option<TokenReply>,
    /// Why the session serves no token (`reauth_required`,
    /// `client_misconfigured`, `temporarily_unavailable`), or that it was
    /// removed (`no_such_session`, the last event of the subscription).
    #[serde(default)]
    pub error: Option<ErrorReply>,
}

/// An access token ready to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenReply {
    pub access_token: Secret,
    /// Always the canonical `Bearer`; other token types are never served.
    pub token_type: String,
    /// When the token stops being valid, by the agent's clock.
    pub expires_at: u64,
    /// For a down-scoped token, the scopes it was asked for (sorted,
    /// without repeats); empty for the session's own token. A client that
    /// asked for scopes and finds none here talks to an agent that does not
    /// know down-scoped tokens, and must not use the token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scope: Vec<String>,
    /// For a down-scoped token, the audience it was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Holds a valid token; the next refresh is scheduled.
    Fresh,
    /// A refresh is in flight.
    Refreshing,
    /// The last refresh failed for a passing reason (network, 5xx, 429);
    /// another attempt is scheduled. The token is served while valid.
    Retrying,
    /// The provider refused the refresh token; only a new sign-in helps.
    NeedsSignIn,
    /// The provider refused the client (`invalid_client` and kin); nothing
    /// is retried until the session is imported again with a fixed client.
    ClientMisconfigured,
}

/// Where a session's access-token expiry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpirySource {
    /// The provider's `expires_in`.
    Provider,
    /// Absent from the answer: the lifetime the provider gave last time.
    PreviousLifetime,
    /// Absent from the answer: `exp - iat` of the JWT access token.
    Jwt,
    /// Absent everywhere: the agent's configured default lifetime.
    Default,
}

/// A session as `list` and `status` show it. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub name: String,
    pub issuer: String,
    pub client_id: String,
    pub token_endpoint: String,
    pub scopes: Vec<String>,
    pub state: SessionState,
    /// When the session entered its state.
    pub state_since: u64,
    /// Why, for every state but `fresh`.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub access_expires_at: Option<u64>,
    #[serde(default)]
    pub expiry_source: Option<ExpirySource>,
    /// The refresh token's own deadline, when the provider gives one.
    #[serde(default)]
    pub refresh_expires_at: Option<u64>,
    #[serde(default)]
    pub last_refresh_at: Option<u64>,
    pub consecutive_failures: u32,
    /// When the agent will refresh next; absent when nothing is scheduled.
    #[serde(default)]
    pub next_refresh_at: Option<u64>,
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
    /// When the session will be removed, if it was imported with a lifetime.
    #[serde(default)]
    pub remove_at: Option<u64>,
    pub has_refresh_token: bool,
    /// How the session is renewed.
    #[serde(default, skip_serializing_if = "Grant::is_refresh_token")]
    pub grant: Grant,
    /// Who signed in, when known (display only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
}

/// What `info` tells about the agent itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// "token-agent 0.1.0".
    pub agent: String,
    pub pid: u32,
    pub started_at: u64,
    pub socket: String,
    pub store: String,
    /// Where the store's key comes from, in words.
    pub key_source: String,
    pub locked: bool,
    /// Every state with its count, zeros included.
    pub sessions_by_state: std::collections::BTreeMap<String, u64>,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    /// A sentence for a person: what went wrong and what to do.
    pub message: String,
    /// The provider's own error, when the provider caused this.
    #[serde(default)]
    pub provider_error: Option<ProviderError>,
    /// When a retry may succeed, for `temporarily_unavailable`.
    #[serde(default)]
    pub retry_at: Option<u64>,
}

/// The OAuth error a provider answered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderError {
    /// The OAuth `error` code, e.g. `invalid_grant`.
    pub error: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Provider-specific codes beside the OAuth code, such as Microsoft's
    /// `error_codes` (`700082`) and `suberror` (`bad_token`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<String>,
}

/// Stable, machine-readable error codes. New codes may be added; a client
/// treats an unknown code like `internal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be read or makes no sense.
    BadRequest,
    /// The client speaks a protocol version the agent does not.
    UnsupportedVersion,
    /// No session has that name.
    NoSuchSession,
    /// A session of that name exists and `replace` was not set.
    SessionExists,
    /// The refresh token was refused or is gone: sign in again.
    ReauthRequired,
    /// The provider refused the client's credentials or configuration.
    ClientMisconfigured,
    /// The provider refused the request for another stated reason.
    ProviderRejected,
    /// The provider cannot be reached or answered garbage; the agent retries.
    TemporarilyUnavailable,
    /// The token's lifetime is shorter than the validity asked for.
    InsufficientValidity,
    /// The agent could not read or write its store.
    StoreFailed,
    /// The agent is stopping.
    ShuttingDown,
    /// The caller may not connect, or may not take this session's token.
    PermissionDenied,
    /// The agent is locked; `unlock` it first.
    Locked,
    #[serde(other)]
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::NoSuchSession => "no_such_session",
            ErrorCode::SessionExists => "session_exists",
            ErrorCode::ReauthRequired => "reauth_required",
            ErrorCode::ClientMisconfigured => "client_misconfigured",
            ErrorCode::ProviderRejected => "provider_rejected",
            ErrorCode::TemporarilyUnavailable => "temporarily_unavailable",
            ErrorCode::InsufficientValidity => "insufficient_validity",
            ErrorCode::StoreFailed => "store_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Locked => "locked",
            ErrorCode::Internal => "internal",
        }
    }
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
            provider_error: None,
            retry_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_json_shape() {
        let json = serde_json::to_value(Request::Get {
            name: "work".into(),
            min_valid_secs: 60,
            scope: vec![],
            audience: None,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "get", "name": "work", "min_valid_secs": 60})
        );

        let minimal: Request = serde_json::from_str(r#"{"op":"get","name":"w"}"#).unwrap();
        assert_eq!(
            minimal,
            Request::Get {
                name: "w".into(),
                min_valid_secs: 0,
                scope: vec![],
                audience: None,
            }
        );

        let scoped = serde_json::to_value(Request::Get {
            name: "w".into(),
            min_valid_secs: 0,
            scope: vec!["read".into()],
            audience: Some("https://api.example".into()),
        })
        .unwrap();
        assert_eq!(
            scoped,
            serde_json::json!({"op": "get", "name": "w", "min_valid_secs": 0,
                "scope": ["read"], "audience": "https://api.example"})
        );
    }

    #[test]
    fn watch_events_have_the_documented_json_shape() {
        let event = Response::Event(WatchEvent {
            name: "work".into(),
            generation: 7,
            state: SessionState::Fresh,
            token: Some(TokenReply {
                access_token: Secret::new("at"),
                token_type: "Bearer".into(),
                expires_at: 100,
                scope: vec![],
                audience: None,
            }),
            error: None,
        });
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], "event");
        assert_eq!(json["generation"], 7);
        assert_eq!(json["token"]["access_token"], "at");
        let back: Response = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn errors_carry_a_stable_code() {
        let reply = Response::Error(ErrorReply::new(ErrorCode::ReauthRequired, "sign in"));
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(json["kind"], "error");
        assert_eq!(json["code"], ErrorCode::ReauthRequired.as_str());
    }

    #[test]
    fn an_unknown_error_code_reads_as_internal() {
        let reply: ErrorReply =
            serde_json::from_str(r#"{"code":"from_the_future","message":"m"}"#).unwrap();
        assert_eq!(reply.code, ErrorCode::Internal);
    }

    #[test]
    fn an_import_from_an_older_client_is_a_refresh_token_session() {
        let import: ImportSession = serde_json::from_str(
            r#"{"name":"w","issuer":"https://id.example","client_id":"c","refresh_token":"rt"}"#,
        )
        .unwrap();
        assert_eq!(import.grant, Grant::RefreshToken);
        assert!(import.identity.is_none() && import.revocation_endpoint.is_none());
        let json = serde_json::to_value(&import).unwrap();
        assert!(
            json.get("grant").is_none(),
            "the default is left out: {json}"
        );

        let service: ImportSession = serde_json::from_str(
            r#"{"name":"s","issuer":"https://id.example","client_id":"c","grant":"client_credentials"}"#,
        )
        .unwrap();
        assert_eq!(service.grant, Grant::ClientCredentials);
        assert!(service.refresh_token.is_empty());

        let logout = serde_json::to_value(Request::Logout { name: "w".into() }).unwrap();
        assert_eq!(logout, serde_json::json!({"op": "logout", "name": "w"}));
    }

    #[test]
    fn import_debug_output_hides_the_secrets() {
        let import = ImportSession {
            name: "work".into(),
            issuer: "https://id.example".into(),
            token_endpoint: None,
            client_id: "cli".into(),
            client_secret: Some(Secret::new("client-secret-value")),
            client_auth: ClientAuth::Basic,
            scopes: vec![],
            refresh_token: Secret::new("refresh-token-value"),
            grant: Grant::RefreshToken,
            revocation_endpoint: None,
            identity: None,
            access_token: None,
            expires_in: None,
            refresh_expires_in: None,
            idle_timeout_secs: None,
            lifetime_secs: None,
            replace: false,
        };
        let debug = format!("{:?}", Request::Import(Box::new(import)));
        assert!(!debug.contains("client-secret-value"));
        assert!(!debug.contains("refresh-token-value"));
    }
}
