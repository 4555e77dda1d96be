//! The agent's requests: what `get`, `import`, `remove`, `list`, `status`,
//! `refresh`, `lock` and `unlock` do. The server only frames and forwards;
//! the refresher does the talking to providers.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use token_agent_proto::{
    validate_session_name, AgentInfo, ClientAuth, ErrorCode, ErrorReply, Grant, ImportSession,
    Request, Response, Secret, SessionState, TokenReply, WatchEvent, PROTOCOL_VERSION,
};
use tokio::sync::broadcast;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn};

use crate::oauth::{Endpoints, TokenAnswer};
use crate::peer::{AccessPolicy, Caller};
use crate::refresh::{
    insufficient_validity, misconfigured_error, no_such_session, reauth_error, retrying_error,
    token_or_error, watch_event, Refresher, ScopedNeed, Trigger,
};
use crate::sessions::{now_ms, ScopedKey, Session, Sessions};
use crate::store::{
    share_client, ClientConfig, OptU64, SessionRecord, StateRecord, Store, StoreError, Tokens,
};

/// How long a wrong unlock passphrase makes the caller wait, so guessing
/// is slow.
const WRONG_PASSPHRASE_DELAY: Duration = Duration::from_secs(1);

/// Facts about this agent for `info`, fixed at start.
#[derive(Debug, Clone)]
pub struct Facts {
    pub started_at: u64,
    pub socket: String,
    pub store: String,
    pub key_source: String,
}

pub struct Agent {
    pub sessions: Arc<Sessions>,
    pub refresher: Arc<Refresher>,
    facts: Facts,
    /// Replaced when the configuration is reloaded.
    policy: RwLock<Arc<AccessPolicy>>,
    /// The hash of the lock passphrase while the agent is locked.
    locked: Mutex<Option<String>>,
    /// Imports are rare and slow (discovery, a first refresh); one at a time
    /// keeps two imports of one name from interleaving.
    import_lock: tokio::sync::Mutex<()>,
}

impl Agent {
    /// Builds the in-memory view from the store and plans every session.
    pub fn load(
        store: &Store,
        refresher: Arc<Refresher>,
        policy: AccessPolicy,
        facts: Facts,
    ) -> Result<Agent, StoreError> {
        let agent = Agent {
            sessions: refresher.sessions.clone(),
            refresher,
            facts,
            policy: RwLock::new(Arc::new(policy)),
            locked: Mutex::new(None),
            import_lock: tokio::sync::Mutex::new(()),
        };

        let now = now_ms();
        store.load_each(|mut record| {
            if record.refresh_in_flight.is_some() {
                // The provider may have rotated the refresh token in an
                // answer that died with the last agent. Try the one we
                // have at once; if it is refused, the status says why.
                warn!(
                    session = %record.name,
                    "the agent stopped during this session's refresh; retrying it now"
                );
                record.interrupted = true;
                record.refresh_in_flight = None;
                record.next_refresh_at = Some(now).into();
            }
            let session = Arc::new(Session::from_store(record));
            agent.plan(&session);
            agent.sessions.insert(session);
        })?;
        agent.write_token_files();
        Ok(agent)
    }

    /// Writes every configured token file whose session holds a valid
    /// token: at start, and when the configuration is reloaded.
    pub fn write_token_files(&self) {
        let now = now_ms();
        if !self.refresher.has_token_files() {
            return;
        }
        for session in self.sessions.all() {
            let record = session.record();
            if record.tokens.access_token.is_some() && record.tokens.access_expires_at > now {
                self.refresher.write_token_file(&record);
            }
        }
    }

    /// Subscribes `caller` to the changes of session `name`: the receiver
    /// of its events, and the current state as the first event. The
    /// receiver is taken first, so no change falls between the two.
    pub fn subscribe(
        &self,
        name: &str,
        caller: &Caller,
    ) -> Result<(WatchEvent, broadcast::Receiver<WatchEvent>), ErrorReply> {
        if self.is_locked() {
            return Err(locked_error());
        }
        if let Err(why) = self.policy().may_take(name, caller) {
            warn!(session = %name, uid = caller.uid, pid = ?caller.pid, "refused a watch: {why}");
            return Err(ErrorReply::new(ErrorCode::PermissionDenied, why));
        }
        let session = self.find(name)?;
        let events = session.subscribe();
        let current = watch_event(&session.record(), now_ms());
        Ok((current, events))
    }

    /// The state of session `name` now, for a watcher that fell behind;
    /// `None` once the session is gone.
    pub fn current_event(&self, name: &str) -> Option<WatchEvent> {
        let session = self.sessions.get(name)?;
        let event = watch_event(&session.record(), now_ms());
        Some(event)
    }

    fn plan(&self, session: &Arc<Session>) {
        let record = session.record();
        self.refresher.plan(session, &record);
    }

    /// Answers one request from `caller`.
    pub async fn handle(&self, request: Request, caller: &Caller) -> Response {
        if self.is_locked() && !is_allowed_while_locked(&request) {
            return Response::Error(locked_error());
        }
        if let Request::Get { name, .. } = &request {
            if let Err(why) = self.policy().may_take(name, caller) {
                warn!(session = %name, uid = caller.uid, pid = ?caller.pid, "refused a token: {why}");
                return Response::Error(ErrorReply::new(ErrorCode::PermissionDenied, why));
            }
        }

        let result = match request {
            Request::Hello { .. } => Ok(Response::Hello {
                version: PROTOCOL_VERSION,
                agent: concat!("token-agent ", env!("CARGO_PKG_VERSION")).into(),
            }),
            Request::Ping => Ok(Response::Pong),
            Request::Get {
                name,
                min_valid_secs,
                scope,
                audience,
            } => {
                let key = ScopedKey::new(scope, audience);
                let token = if key.is_plain() {
                    self.get(&name, min_valid_secs).await
                } else {
                    self.get_scoped(&name, key, min_valid_secs).await
                };
                self.refresher.metrics.got(token.is_ok());
                token.map(Response::Token)
            }
            // The server turns the connection into a subscription before
            // a watch gets here.
            Request::Watch { .. } => Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "watch is answered by the connection handler",
            )),
            Request::Import(import) => self.import(*import).await.map(done),
            Request::Remove { name } => self.remove(&name).await.map(done),
            Request::Logout { name } => self.logout(&name).await.map(done),
            Request::List => Ok(Response::Sessions {
                sessions: self.sessions.all().iter().map(|s| s.status()).collect(),
            }),
            Request::Status { name } => self.find(&name).map(|session| Response::Status {
                session: session.status(),
            }),
            Request::Refresh { name } => self.refresh_now(&name).await.map(done),
            Request::Lock { passphrase } => self.lock(passphrase).await.map(done),
            Request::Unlock { passphrase } => self.unlock(passphrase).await.map(done),
            Request::Info => Ok(Response::Info(self.info())),
            Request::Metrics => Ok(Response::Metrics {
                text: self.refresher.metrics.render(&self.sessions),
            }),
        };
        result.unwrap_or_else(Response::Error)
    }

    fn info(&self) -> AgentInfo {
        let sessions_by_state = crate::metrics::sessions_by_state(&self.sessions)
            .into_iter()
            .map(|(state, count)| (state.to_string(), count))
            .collect();
        AgentInfo {
            agent: concat!("token-agent ", env!("CARGO_PKG_VERSION")).into(),
            pid: std::process::id(),
            started_at: self.facts.started_at / 1000,
            socket: self.facts.socket.clone(),
            store: self.facts.store.clone(),
            key_source: self.facts.key_source.clone(),
            locked: self.is_locked(),
            sessions_by_state,
        }
    }

    /// The access rules in force.
    pub fn policy(&self) -> Arc<AccessPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_policy(&self, policy: AccessPolicy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    pub fn is_locked(&self) -> bool {
        self.locked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    async fn lock(&self, passphrase: Secret) -> Result<String, ErrorReply> {
        if passphrase.is_empty() {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "the passphrase is empty",
            ));
        }
        if self.is_locked() {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "the agent is already locked",
            ));
        }
        // Hashing is deliberately slow; keep it off the async workers.
        let hash = tokio::task::spawn_blocking(move || crate::seal::hash_passphrase(&passphrase))
            .await
            .map_err(|_| ErrorReply::new(ErrorCode::Internal, "hashing the passphrase failed"))?
            .map_err(|why| ErrorReply::new(ErrorCode::Internal, why))?;

        let mut locked = self.locked.lock().unwrap_or_else(|e| e.into_inner());
        if locked.is_some() {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "the agent is already locked",
            ));
        }
        *locked = Some(hash);
        info!("agent locked: no tokens are served until it is unlocked; refreshes go on");
        Ok("locked: no tokens are served until `tokenctl unlock`".into())
    }

    async fn unlock(&self, passphrase: Secret) -> Result<String, ErrorReply> {
        let hash = self
            .locked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(hash) = hash else {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "the agent is not locked",
            ));
        };
        let matches =
            tokio::task::spawn_blocking(move || crate::seal::verify_passphrase(&hash, &passphrase))
                .await
                .unwrap_or(false);
        if !matches {
            tokio::time::sleep(WRONG_PASSPHRASE_DELAY).await;
            warn!("unlock refused: wrong passphrase");
            return Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                "wrong passphrase; the agent stays locked",
            ));
        }
        *self.locked.lock().unwrap_or_else(|e| e.into_inner()) = None;
        info!("agent unlocked");
        Ok("unlocked".into())
    }

    fn find(&self, name: &str) -> Result<Arc<Session>, ErrorReply> {
        validate_session_name(name).map_err(|why| ErrorReply::new(ErrorCode::BadRequest, why))?;
        self.sessions.get(name).ok_or_else(|| no_such_session(name))
    }

    /// A token valid for `min_valid_secs` more, refreshing first if needed.
    pub async fn get(&self, name: &str, min_valid_secs: u64) -> Result<TokenReply, ErrorReply> {
        let session = self.find(name)?;
        let now = now_ms();
        session.touch(now);

        let min_valid_ms = min_valid_secs.saturating_mul(1000);
        if let Some(token) = session.servable(now, min_valid_ms) {
            return Ok(token);
        }
        self.check_refresh_may_help(&session, now, min_valid_ms)?;

        debug!(session = %name, "token too close to expiry; refreshing on demand");
        self.refresher
            .refresh(session.clone(), Trigger::Demand { min_valid_ms })
            .await?;
        token_or_error(&session, min_valid_ms)
    }

    /// A down-scoped token valid for `min_valid_secs` more: from the
    /// session's cache, else fetched with the session's refresh token.
    async fn get_scoped(
        &self,
        name: &str,
        key: ScopedKey,
        min_valid_secs: u64,
    ) -> Result<TokenReply, ErrorReply> {
        let session = self.find(name)?;
        let now = now_ms();
        session.touch(now);

        let min_valid_ms = min_valid_secs.saturating_mul(1000);
        if let Some(token) = session.scoped_servable(&key, now, min_valid_ms) {
            self.refresh_scoped_ahead(&session, &key, now);
            return Ok(token);
        }
        check_session_state(&session, now)?;
        // A valid token shorter than asked for, fetched a moment ago:
        // another request would bring the same lifetime.
        if let Some(cached) = session.scoped(&key) {
            let fresh = now.saturating_sub(cached.obtained_at) < self.refresher.timing().min_gap_ms;
            if cached.expires_at > now && fresh {
                return Err(ErrorReply::new(
                    ErrorCode::InsufficientValidity,
                    format!(
                        "session {name}: the provider's down-scoped tokens live {} s, less than \
                         the validity asked for",
                        cached.expires_at.saturating_sub(cached.obtained_at) / 1000
                    ),
                ));
            }
        }

        debug!(session = %name, "fetching a down-scoped token");
        self.refresher
            .refresh_scoped(
                session.clone(),
                key.clone(),
                ScopedNeed::Valid { min_valid_ms },
            )
            .await?;
        session
            .scoped_servable(&key, now_ms(), min_valid_ms)
            .ok_or_else(|| {
                ErrorReply::new(
                    ErrorCode::InsufficientValidity,
                    format!("session {name}: the down-scoped token lives shorter than asked for"),
                )
            })
    }

    /// Starts replacing a down-scoped token in the background once it is as
    /// far through its life as the session's own token is when refreshed,
    /// so callers in use keep being served from memory. Only while the
    /// session is fresh: a failing provider is left to the backoff.
    fn refresh_scoped_ahead(&self, session: &Arc<Session>, key: &ScopedKey, now: u64) {
        let Some(cached) = session.scoped(key) else {
            return;
        };
        let due =
            self.refresher
                .timing()
                .next_refresh(cached.obtained_at, cached.expires_at, None, 0.0);
        if due > now || session.record().state.state != SessionState::Fresh {
            return;
        }
        let need = ScopedNeed::Ahead {
            obtained_at: cached.obtained_at,
        };
        let refresher = self.refresher.clone();
        let (session, key) = (session.clone(), key.clone());
        self.refresher.tasks.spawn(async move {
            if let Err(err) = refresher.refresh_scoped(session, key, need).await {
                debug!(
                    code = err.code.as_str(),
                    "refreshing a down-scoped token ahead failed"
                );
            }
        });
    }

    /// Answers at once when a refresh cannot give a better token now, so a
    /// client never waits on a dead session and never drives the provider
    /// harder than the backoff allows.
    fn check_refresh_may_help(
        &self,
        session: &Session,
        now: u64,
        min_valid_ms: u64,
    ) -> Result<(), ErrorReply> {
        check_session_state(session, now)?;

        // A valid token whose whole lifetime is shorter than asked for,
        // fetched a moment ago: another refresh would bring the same
        // lifetime, and asking again and again would be a refresh loop.
        let record = session.record();
        let lifetime = record
            .tokens
            .access_expires_at
            .saturating_sub(record.tokens.obtained_at);
        let has_valid =
            record.tokens.access_token.is_some() && record.tokens.access_expires_at > now;
        let refreshed_recently = record
            .last_refresh_at
            .get()
            .is_some_and(|at| now.saturating_sub(at) < self.refresher.timing().min_gap_ms);
        if has_valid && refreshed_recently && lifetime <= min_valid_ms {
            return Err(insufficient_validity(&record, min_valid_ms));
        }
        Ok(())
    }

    async fn import(&self, mut import: ImportSession) -> Result<String, ErrorReply> {
        check_import(&import)?;
        let _one_at_a_time = self.import_lock.lock().await;

        let name = import.name.clone();
        let existing = self.sessions.get(&name);
        if existing.is_some() && !import.replace {
            return Err(ErrorReply::new(
                ErrorCode::SessionExists,
                format!("a session named {name} exists; pass --replace to replace it"),
            ));
        }

        let endpoints = match &import.token_endpoint {
            Some(endpoint) => Endpoints {
                token_endpoint: endpoint.clone(),
                revocation_endpoint: import.revocation_endpoint.clone(),
            },
            None => self
                .refresher
                .provider
                .discover(&import.issuer)
                .await
                .map_err(|why| {
                    ErrorReply::new(
                        ErrorCode::TemporarilyUnavailable,
                        format!(
                            "nothing was imported: cannot find the token endpoint ({why}); \
                             try again, or pass --token-endpoint to skip discovery"
                        ),
                    )
                })?,
        };

        // Let a refresh of the old session finish before taking its name.
        // Its refresh token is taken out of the store now, before the new
        // session's first write replaces it, so that a refused replacement
        // can put the old session back whole.
        if let Some(old) = &existing {
            let _gate = old.gate.lock().await;
            let held = old.record().clone();
            match self.refresher.token_to_present(&held) {
                Ok(token) => old.record().tokens.refresh_token = token.into(),
                Err(err) => {
                    return Err(ErrorReply::new(
                        ErrorCode::Internal,
                        format!(
                            "session {name} was not replaced: its current refresh token cannot \
                             be read from the store ({err})"
                        ),
                    ))
                }
            }
            old.mark_removed();
        }
        let issued = take_issued_tokens(&mut import);
        let session = Arc::new(Session::new(new_record(import, endpoints)));
        self.sessions.insert(session.clone());
        self.refresher.scheduler.unschedule(&name);

        let outcome = match issued {
            Some(tokens) => self.refresher.adopt(&session, tokens).await,
            None => {
                self.refresher
                    .refresh(session.clone(), Trigger::Forced)
                    .await
            }
        };
        match outcome {
            Ok(()) => {
                info!(session = %name, "session imported");
                let expires = session.status().access_expires_at.unwrap_or(0);
                Ok(format!(
                    "imported session {name}; its token is valid for {} s",
                    expires.saturating_sub(now_ms() / 1000)
                ))
            }
            Err(mut reply) if is_passing(reply.code) => {
                reply.message = format!(
                    "session {name} is saved, but its first refresh failed: {}",
                    reply.message
                );
                Err(reply)
            }
            Err(mut reply) => {
                self.forget(&session).await;
                reply.message = match existing {
                    Some(old) => {
                        self.restore(&old).await;
                        format!(
                            "session {name} was not replaced and keeps its previous tokens: {}",
                            reply.message
                        )
                    }
                    None => format!("session {name} was not imported: {}", reply.message),
                };
                Err(reply)
            }
        }
    }

    /// Puts back a session whose replacement the provider refused: its
    /// tokens were never touched, only its place in memory and the store.
    async fn restore(&self, old: &Session) {
        let record = old.record().clone();
        let restored = match self.refresher.store.save(&record).await {
            Ok(()) => Session::from_store(record),
            Err(err) => {
                warn!(session = %record.name, error = %err, "cannot store the restored session");
                Session::new(record)
            }
        };
        let restored = Arc::new(restored);
        self.plan(&restored);
        self.sessions.insert(restored);
        info!(session = %old.name, "replacement refused; the previous session is back");
    }

    async fn remove(&self, name: &str) -> Result<String, ErrorReply> {
        let session = self.find(name)?;
        self.forget(&session).await;
        info!(session = %name, "session removed");
        Ok(format!("removed session {name}"))
    }

    /// Revokes the session's refresh token at the provider (RFC 7009) when
    /// it has a revocation endpoint, then forgets the session. Revocation
    /// runs under the gate, so no refresh can rotate the token meanwhile;
    /// a failed revocation still removes the session, and the answer says so.
    async fn logout(&self, name: &str) -> Result<String, ErrorReply> {
        let session = self.find(name)?;
        let gate = session.gate.lock().await;
        let record = session.record().clone();
        let refresh_token = self.refresher.token_to_present(&record);
        let revoked = match (&refresh_token, &record.client.revocation_endpoint) {
            (Err(err), _) => {
                warn!(session = %name, error = %err, "cannot read the refresh token to revoke it");
                format!(
                    "its refresh token could not be read from the store ({err}), so it was not \
                     revoked and stays valid at the provider until it expires"
                )
            }
            (Ok(None), _) => "it held no refresh token to revoke".to_string(),
            (Ok(Some(_)), None) => "the provider has no revocation endpoint, so its refresh \
                 token was not revoked and stays valid at the provider until it expires"
                .to_string(),
            (Ok(Some(token)), Some(_)) => {
                match self.refresher.provider.revoke(&record.client, token).await {
                    Ok(()) => "its refresh token was revoked at the provider".to_string(),
                    Err(why) => {
                        warn!(session = %name, "revoking the refresh token failed: {why}");
                        format!("revoking its refresh token failed ({why}); it may stay valid at the provider")
                    }
                }
            }
        };
        self.forget_locked(&session).await;
        drop(gate);
        info!(session = %name, "signed out: {revoked}");
        Ok(format!("signed out of session {name}: {revoked}"))
    }

    /// Drops a session from memory, schedule and store, after any refresh
    /// in flight has finished.
    async fn forget(&self, session: &Arc<Session>) {
        let _gate = session.gate.lock().await;
        self.forget_locked(session).await;
    }

    /// [`Agent::forget`] for a caller that holds the session's gate.
    async fn forget_locked(&self, session: &Arc<Session>) {
        session.mark_removed();
        self.sessions.remove(session);
        self.refresher.scheduler.unschedule(&session.name);
        if let Err(err) = self.refresher.store.remove(&session.name).await {
            warn!(session = %session.name, error = %err, "cannot delete the session from the store");
        }
    }

    /// Ends a session whose lifetime is over: revokes its refresh token
    /// where the provider allows, then forgets it.
    async fn expire(&self, session: &Arc<Session>) {
        // Under the gate, so no refresh rotates the token being revoked.
        let gate = session.gate.lock().await;
        let record = session.record().clone();
        let revocable = record.client.revocation_endpoint.is_some();
        let refresh_token = match self.refresher.token_to_present(&record) {
            Ok(token) => token,
            Err(err) => {
                warn!(session = %record.name, error = %err, "lifetime over; cannot read the refresh token to revoke it");
                None
            }
        };
        if let (Some(refresh_token), true) = (&refresh_token, revocable) {
            match self
                .refresher
                .provider
                .revoke(&record.client, refresh_token)
                .await
            {
                Ok(()) => info!(session = %record.name, "lifetime over; refresh token revoked"),
                Err(why) => warn!(
                    session = %record.name,
                    "lifetime over; revoking the refresh token failed ({why}); removing the session anyway"
                ),
            }
        }
        self.forget_locked(session).await;
        drop(gate);
        info!(session = %record.name, "session removed at the end of its lifetime");
    }

    async fn refresh_now(&self, name: &str) -> Result<String, ErrorReply> {
        let session = self.find(name)?;
        if session.record().state.state == SessionState::NeedsSignIn {
            return Err(reauth_error(&session.record()));
        }
        self.refresher
            .refresh(session.clone(), Trigger::Forced)
            .await?;
        let expires = session.status().access_expires_at.unwrap_or(0);
        Ok(format!(
            "refreshed session {name}; its token is valid for {} s",
            expires.saturating_sub(now_ms() / 1000)
        ))
    }

    /// Starts the scheduled refresh of `name`; the permit bounds how many
    /// run at once and is dropped when this one ends.
    pub fn start_scheduled(self: &Arc<Self>, name: Arc<str>, permit: OwnedSemaphorePermit) {
        let Some(session) = self.sessions.get(&name) else {
            return;
        };

        let remove_at = session.record().remove_at.get();
        if remove_at.is_some_and(|at| at <= now_ms()) {
            let agent = self.clone();
            self.refresher.tasks.spawn(async move {
                agent.expire(&session).await;
                drop(permit);
            });
            return;
        }

        let idle_limit = session.record().idle_timeout_secs.get();
        if let Some(idle_secs) = idle_limit {
            let idle_ms = now_ms().saturating_sub(session.last_used());
            if idle_ms > idle_secs.saturating_mul(1000) {
                debug!(session = %name, "unused for longer than its idle time; left to lapse");
                return;
            }
        }

        let refresher = self.refresher.clone();
        self.refresher.tasks.spawn(async move {
            let _ = refresher.refresh(session, Trigger::Scheduled).await;
            drop(permit);
        });
    }
}

/// Requests that reveal and change nothing secret, answered while locked.
fn is_allowed_while_locked(request: &Request) -> bool {
    matches!(
        request,
        Request::Hello { .. }
            | Request::Ping
            | Request::List
            | Request::Status { .. }
            | Request::Info
            | Request::Metrics
            | Request::Refresh { .. }
            | Request::Lock { .. }
            | Request::Unlock { .. }
    )
}

/// Refuses at once when the session's state says a refresh cannot help
/// now: it needs a person, or the provider is failing and the next attempt
/// is planned.
fn check_session_state(session: &Session, now: u64) -> Result<(), ErrorReply> {
    let record = session.record();
    match record.state.state {
        SessionState::NeedsSignIn => return Err(reauth_error(&record)),
        SessionState::ClientMisconfigured => return Err(misconfigured_error(&record)),
        SessionState::Retrying => {
            if record.next_refresh_at.get().is_some_and(|at| at > now) {
                return Err(retrying_error(&record, now));
            }
        }
        SessionState::Fresh | SessionState::Refreshing => {}
    }
    Ok(())
}

fn locked_error() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Locked,
        "the agent is locked; `tokenctl unlock` it to be served tokens again",
    )
}

fn done(message: String) -> Response {
    Response::Done { message }
}

fn is_passing(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::TemporarilyUnavailable | ErrorCode::StoreFailed
    )
}

fn check_import(import: &ImportSession) -> Result<(), ErrorReply> {
    let bad = |why: String| Err(ErrorReply::new(ErrorCode::BadRequest, why));
    validate_session_name(&import.name)
        .map_err(|why| ErrorReply::new(ErrorCode::BadRequest, why))?;
    match import.grant {
        Grant::RefreshToken if import.refresh_token.is_empty() => {
            return bad("the refresh token is empty".into());
        }
        Grant::ClientCredentials if !import.refresh_token.is_empty() => {
            return bad("a client credentials session has no refresh token".into());
        }
        Grant::ClientCredentials if import.client_secret.is_none() => {
            return bad("a client credentials session needs a client secret".into());
        }
        _ => {}
    }
    if import.client_id.is_empty() {
        return bad("the client id is empty".into());
    }
    for (what, url) in [
        ("issuer", Some(&import.issuer)),
        ("token endpoint", import.token_endpoint.as_ref()),
        ("revocation endpoint", import.revocation_endpoint.as_ref()),
    ] {
        let Some(url) = url else { continue };
        match url::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "https" | "http") => {}
            _ => return bad(format!("the {what} {url:?} is not an http(s) URL")),
        }
    }
    match (import.client_auth, &import.client_secret) {
        (ClientAuth::None, Some(_)) => {
            bad("a client secret was given for a public client (client auth none)".into())
        }
        (ClientAuth::Basic | ClientAuth::Post, None) => {
            bad("this client authentication needs a client secret".into())
        }
        _ => Ok(()),
    }
}

/// The tokens a caller brought from its own sign-in, as if a refresh had
/// just answered with them.
fn take_issued_tokens(import: &mut ImportSession) -> Option<TokenAnswer> {
    let access_token = import.access_token.take()?;
    Some(TokenAnswer {
        access_token,
        token_type: "bearer".into(),
        expires_in: import.expires_in.map(|s| s.min(i64::MAX as u64) as i64),
        refresh_token: None,
        refresh_expires_in: import
            .refresh_expires_in
            .map(|s| s.min(i64::MAX as u64) as i64),
    })
}

fn new_record(import: ImportSession, endpoints: Endpoints) -> SessionRecord {
    let now = now_ms();
    SessionRecord {
        name: Arc::from(import.name),
        client: share_client(ClientConfig {
            issuer: import.issuer,
            token_endpoint: endpoints.token_endpoint,
            revocation_endpoint: endpoints.revocation_endpoint,
            client_id: import.client_id,
            client_secret: import.client_secret,
            client_auth: import.client_auth,
            scopes: import.scopes,
            grant: import.grant,
        }),
        tokens: Tokens {
            refresh_token: (!import.refresh_token.is_empty())
                .then_some(import.refresh_token)
                .into(),
            ..Tokens::default()
        },
        generation: 0,
        refresh_in_flight: None,
        interrupted: false,
        state: StateRecord {
            state: SessionState::Refreshing,
            since: now,
            reason: None,
            provider_error: None,
        },
        last_refresh_at: OptU64::NONE,
        consecutive_failures: 0,
        next_refresh_at: OptU64::NONE,
        idle_timeout_secs: import.idle_timeout_secs.into(),
        remove_at: import
            .lifetime_secs
            .map(|secs| now.saturating_add(secs.saturating_mul(1000)))
            .into(),
        created_at: now,
        identity: import
            .identity
            .filter(|identity| !identity.is_empty())
            .map(Box::new),
    }
}
