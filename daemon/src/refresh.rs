//! One refresh, through its steps, keeping the invariants:
//!
//! 1. One refresh per session in flight: everything below runs under the
//!    session's gate, and a caller that waited at the gate while another
//!    attempt ran takes that attempt's outcome instead of starting its own.
//! 2. The in-flight marker is flushed before the request is sent, so a crash
//!    mid-refresh is known at the next start.
//! 3. A rotated refresh token is flushed before anything from its answer is
//!    served or acted on. If the write fails, the answer is held in memory,
//!    never served, and written by the next attempt instead of presenting
//!    the old refresh token again.
//!
//! Each refresh runs in its own task: a client that hangs up must not cancel
//! a request already sent, or its rotated answer would be thrown away.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use token_agent_proto::{
    ErrorCode, ErrorReply, ExpirySource, Grant, ProviderError, Secret, SessionState, TokenReply,
    WatchEvent,
};
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use crate::metrics::{Metrics, RefreshOutcome};
use crate::oauth::{Answer, Answered, Provider, TokenAnswer, Transient};
use crate::packed_token::PackedToken;
use crate::schedule::Timing;
use crate::scheduler::Scheduler;
use crate::sessions::{now_ms, to_ms, Outcome, ScopedKey, ScopedToken, Session, Sessions};
use crate::store::{
    ClientConfig, InFlight, OptU64, RefreshToken, SessionRecord, StateRecord, Store, StoreError,
};
use crate::token_file::TokenFile;

/// Why a refresh was asked for; decides whether it is still needed once
/// the gate is ours.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// The scheduler found the session due.
    Scheduled,
    /// A `get` found the token too close to expiry.
    Demand { min_valid_ms: u64 },
    /// A person asked (`tokenctl refresh`), or a session was just imported.
    Forced,
}

/// What a down-scoped refresh is for; decides whether it is still needed
/// once the gate is ours.
#[derive(Debug, Clone, Copy)]
pub enum ScopedNeed {
    /// A caller needs a token valid this much longer.
    Valid { min_valid_ms: u64 },
    /// The token obtained at this time is due to be replaced ahead of its
    /// expiry, as the session's own token is.
    Ahead { obtained_at: u64 },
}

/// Clock difference to the provider above which a warning is logged.
const SKEW_WARNING: Duration = Duration::from_secs(60);

pub struct Refresher {
    pub store: Arc<Store>,
    pub provider: Provider,
    pub scheduler: Arc<Scheduler>,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    /// Replaced when the configuration is reloaded.
    pub timing: RwLock<Timing>,
    pub tasks: TaskTracker,
    /// Token files by session name; replaced when the configuration is
    /// reloaded.
    pub token_files: RwLock<HashMap<String, TokenFile>>,
}

impl Refresher {
    /// The timing policy in force.
    pub fn timing(&self) -> Timing {
        *self.timing.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Refreshes `session` unless the trigger turns out to be moot, and
    /// returns the outcome of the attempt made or joined.
    pub async fn refresh(self: &Arc<Self>, session: Arc<Session>, trigger: Trigger) -> Outcome {
        let this = self.clone();
        let span = info_span!("refresh", session = %session.name);
        let task = self
            .tasks
            .spawn(async move { this.refresh_in_task(&session, trigger).await }.instrument(span));
        task.await.unwrap_or_else(|_| {
            Err(ErrorReply::new(
                ErrorCode::Internal,
                "the refresh task failed; see the agent's log",
            ))
        })
    }

    async fn refresh_in_task(&self, session: &Session, trigger: Trigger) -> Outcome {
        let attempts_seen = session.attempts();
        let _gate = session.gate.lock().await;

        if session.is_removed() {
            return Err(no_such_session(&session.name));
        }
        if session.attempts() != attempts_seen {
            // Another attempt finished while we waited: its answer is ours.
            return session.last_outcome();
        }
        if !still_needed(session, trigger) {
            return Ok(());
        }

        let started = std::time::Instant::now();
        let outcome = self.attempt(session).await;
        self.metrics
            .refreshed(outcome_label(&outcome), started.elapsed());
        session.finish_attempt(outcome.clone());
        outcome
    }

    /// One attempt; the caller holds the gate.
    async fn attempt(&self, session: &Session) -> Outcome {
        if let Some(pending) = session.unsaved() {
            return self.write_pending(session, pending).await;
        }

        let mut record = session.record().clone();
        // A service account renews with its client credentials; any other
        // session needs its refresh token.
        let refresh_token = match record.client.grant {
            Grant::ClientCredentials => None,
            Grant::RefreshToken => match self.token_to_present(&record) {
                Ok(Some(token)) => Some(token),
                Ok(None) => return Err(reauth_error(&record)),
                Err(err) => {
                    error!(error = %err, "cannot read the refresh token from the store; not refreshing");
                    self.scheduler
                        .schedule(&session.name, now_ms() + self.timing().backoff_max_ms);
                    return Err(store_error(&err));
                }
            },
        };

        // The marker goes to disk before the refresh token leaves.
        let now = now_ms();
        record.refresh_in_flight = Some(Box::new(InFlight {
            generation: record.generation,
            started_at: now,
        }));
        // The reason of an earlier failure stays, so status can tell
        // "refreshing again after: ..." and the next failure can tell
        // whether it is new trouble.
        record.state.state = SessionState::Refreshing;
        if let Err(err) = self.store.save(&record).await {
            error!(error = %err, "cannot record the refresh as started; not sending it");
            self.scheduler
                .schedule(&session.name, now + self.timing().backoff_max_ms);
            return Err(store_error(&err));
        }
        session.set_record(record.clone());

        let answered = match &refresh_token {
            Some(token) => self.provider.refresh(&record.client, token).await,
            None => self.provider.client_credentials(&record.client).await,
        };
        self.warn_on_skew(&answered);
        let Answered {
            answer,
            received_at,
            took,
            ..
        } = answered;
        match answer {
            Answer::Tokens(tokens) => {
                self.succeed(session, record, tokens, received_at, took)
                    .await
            }
            Answer::Transient(transient) => self.retry_later(session, record, transient).await,
            Answer::NeedsSignIn(provider_error) => {
                self.needs_sign_in(session, record, provider_error).await
            }
            Answer::ClientRejected(provider_error) => {
                self.client_rejected(session, record, provider_error).await
            }
        }
    }

    async fn succeed(
        &self,
        session: &Session,
        mut record: SessionRecord,
        answer: TokenAnswer,
        received_at: SystemTime,
        took: Duration,
    ) -> Outcome {
        let received = to_ms(received_at);
        apply_answer(&mut record, answer, received, &self.timing());
        record.generation += 1;
        record.refresh_in_flight = None;
        record.interrupted = false;
        record.last_refresh_at = Some(received).into();
        record.consecutive_failures = 0;
        record.next_refresh_at = Some(self.next_refresh(&record)).into();

        if record.tokens.access_token.is_none() {
            // An unsupported token type: the refresh token is kept, the
            // access token is not served.
            return self.finish_without_token(session, record).await;
        }
        set_state(&mut record, SessionState::Fresh, received, None, None);

        if let Err(err) = self.store.save(&record).await {
            error!(
                error = %err,
                "the provider rotated the tokens but the store refused them; \
                 holding them in memory, serving nothing from them, and retrying the write"
            );
            session.set_unsaved(Some(record));
            self.scheduler
                .schedule(&session.name, now_ms() + self.timing().backoff_base_ms);
            return Err(store_error(&err));
        }

        info!(
            generation = record.generation,
            expires_in_s = record.tokens.access_expires_at.saturating_sub(received) / 1000,
            expiry_source = ?record.tokens.expiry_source,
            took_ms = took.as_millis() as u64,
            "refreshed"
        );
        self.install(session, record);
        Ok(())
    }

    /// Stores tokens the importer obtained itself (at sign-in) as the
    /// session's first generation, without asking the provider.
    pub async fn adopt(&self, session: &Session, tokens: TokenAnswer) -> Outcome {
        let _gate = session.gate.lock().await;
        let mut record = session.record().clone();
        let now = now_ms();
        apply_answer(&mut record, tokens, now, &self.timing());
        record.last_refresh_at = Some(now).into();
        record.next_refresh_at = Some(self.next_refresh(&record)).into();
        set_state(&mut record, SessionState::Fresh, now, None, None);

        self.store
            .save(&record)
            .await
            .map_err(|err| store_error(&err))?;
        self.install(session, record);
        Ok(())
    }

    /// Writes an answer a failed write left in memory.
    async fn write_pending(&self, session: &Session, record: SessionRecord) -> Outcome {
        if let Err(err) = self.store.save(&record).await {
            error!(error = %err, "the store still refuses the rotated tokens; retrying the write");
            self.scheduler
                .schedule(&session.name, now_ms() + self.timing().backoff_max_ms);
            return Err(store_error(&err));
        }
        info!("rotated tokens written after an earlier store failure");
        session.set_unsaved(None);
        self.install(session, record);
        Ok(())
    }

    async fn finish_without_token(&self, session: &Session, mut record: SessionRecord) -> Outcome {
        let now = now_ms();
        let reason =
            "the provider issued a token type other than Bearer, which the agent does not serve";
        set_state(
            &mut record,
            SessionState::ClientMisconfigured,
            now,
            Some(reason.into()),
            None,
        );
        record.next_refresh_at = OptU64::NONE;
        self.save_or_log(&record).await;
        error!("{reason}");
        self.install(session, record);
        Err(ErrorReply::new(ErrorCode::ClientMisconfigured, reason))
    }

    async fn retry_later(
        &self,
        session: &Session,
        mut record: SessionRecord,
        transient: Transient,
    ) -> Outcome {
        let now = now_ms();
        record.refresh_in_flight = None;
        record.consecutive_failures += 1;
        let retry_after = transient.retry_after.map(|d| d.as_millis() as u64);
        let delay =
            self.timing()
                .backoff_ms(record.consecutive_failures, retry_after, rand::random());
        let retry_at = now + delay;
        record.next_refresh_at = Some(retry_at).into();

        // Once per change of state, not on every attempt.
        let is_new_trouble = record.consecutive_failures == 1
            || record.state.reason.as_deref() != Some(transient.reason.as_str());
        if is_new_trouble {
            warn!(reason = %transient.reason, retry_in_s = delay.div_ceil(1000), "refresh failed; will retry");
            set_state(
                &mut record,
                SessionState::Retrying,
                now,
                Some(transient.reason.clone()),
                None,
            );
        } else {
            record.state.state = SessionState::Retrying;
        }
        self.save_or_log(&record).await;
        self.install(session, record.clone());

        Err(retrying_error(&record, now))
    }

    async fn needs_sign_in(
        &self,
        session: &Session,
        mut record: SessionRecord,
        provider_error: ProviderError,
    ) -> Outcome {
        let now = now_ms();
        let reason = if record.interrupted {
            format!(
                "the agent stopped in the middle of a refresh, and the provider has since \
                 refused the refresh token ({}): the rotated token was lost with the agent",
                provider_error.error
            )
        } else if record.client.grant == Grant::ClientCredentials {
            format!(
                "the provider refused the client credentials grant ({})",
                describe(&provider_error)
            )
        } else {
            format!(
                "the provider refused the refresh token ({})",
                describe(&provider_error)
            )
        };
        error!(
            provider_error = %provider_error.error,
            "session needs a new sign-in: {reason}"
        );

        // A refused refresh token is dead; keeping it would only tempt a
        // replay. The session's settings stay for the next import.
        record.tokens.refresh_token = RefreshToken::None;
        record.tokens.access_token = None;
        record.refresh_in_flight = None;
        record.interrupted = false;
        record.consecutive_failures += 1;
        record.next_refresh_at = OptU64::NONE;
        set_state(
            &mut record,
            SessionState::NeedsSignIn,
            now,
            Some(reason),
            Some(provider_error),
        );
        self.save_or_log(&record).await;
        let reply = reauth_error(&record);
        self.install(session, record);
        Err(reply)
    }

    async fn client_rejected(
        &self,
        session: &Session,
        mut record: SessionRecord,
        provider_error: ProviderError,
    ) -> Outcome {
        let now = now_ms();
        let refused = format!(
            "the provider refused client {} ({})",
            record.client.client_id,
            describe(&provider_error)
        );
        let reason = format!(
            "{refused}; the refresh token is kept, and nothing is retried until the session \
             is imported again with a working client"
        );
        error!(provider_error = %provider_error.error, "{reason}");
        // A session that never refreshed is an import being tried: its
        // client settings are suspect, not the client every sibling uses.
        let was_working = record.generation > 0;

        record.refresh_in_flight = None;
        record.consecutive_failures += 1;
        record.next_refresh_at = OptU64::NONE;
        set_state(
            &mut record,
            SessionState::ClientMisconfigured,
            now,
            Some(reason.clone()),
            Some(provider_error.clone()),
        );
        self.save_or_log(&record).await;
        if was_working {
            self.flag_siblings(session, &record.client, &reason, &provider_error)
                .await;
        }
        self.install(session, record);

        let message = if was_working { reason } else { refused };
        let mut reply = ErrorReply::new(ErrorCode::ClientMisconfigured, message);
        reply.provider_error = Some(provider_error);
        Err(reply)
    }

    /// The provider refused the client, not the token: every other session
    /// of that client at that token endpoint would be refused too, so each
    /// is marked now instead of spending a request to learn it.
    async fn flag_siblings(
        &self,
        session: &Session,
        client: &ClientConfig,
        reason: &str,
        provider_error: &ProviderError,
    ) {
        let now = now_ms();
        for sibling in self.sessions.all() {
            if sibling.name == session.name {
                continue;
            }
            // Same endpoint, id and credentials: a sibling with another
            // secret may well be the one that works.
            let is_same_client = {
                let other = sibling.record();
                other.client.token_endpoint == client.token_endpoint
                    && other.client.client_id == client.client_id
                    && other.client.client_auth == client.client_auth
                    && other.client.client_secret == client.client_secret
                    && other.state.state != SessionState::NeedsSignIn
            };
            if !is_same_client {
                continue;
            }
            // A sibling whose own refresh is in flight hears the same
            // answer itself; waiting for its gate here could deadlock.
            let Ok(_gate) = sibling.gate.try_lock() else {
                continue;
            };
            let mut record = sibling.record().clone();
            record.next_refresh_at = OptU64::NONE;
            set_state(
                &mut record,
                SessionState::ClientMisconfigured,
                now,
                Some(reason.to_string()),
                Some(provider_error.clone()),
            );
            self.save_or_log(&record).await;
            warn!(sibling = %sibling.name, "marked too: same client, same provider");
            self.install(&sibling, record);
        }
    }

    /// The refresh token to present for `record`: the one it holds, or
    /// else the one the store holds (see [`RefreshToken`]). Callers hold the
    /// session's gate, so no refresh rotates it meanwhile.
    pub fn token_to_present(&self, record: &SessionRecord) -> Result<Option<Secret>, StoreError> {
        match &record.tokens.refresh_token {
            RefreshToken::None => Ok(None),
            RefreshToken::Held(token) => Ok(Some(token.clone())),
            RefreshToken::AtRest => self.store.refresh_token(&record.name),
        }
    }

    /// Saves a record whose loss would cost no token: a failure state, or
    /// a cleared marker. A failed write is logged; the next start sees the
    /// marker and retries, which is the safe side.
    async fn save_or_log(&self, record: &SessionRecord) {
        if let Err(err) = self.store.save(record).await {
            error!(error = %err, "cannot store the session's new state");
        }
    }

    /// Makes `record` the session's current view and plans its next
    /// refresh; then writes the token file and tells the watchers about a
    /// new token or a failure. Callers have stored `record` first.
    fn install(&self, session: &Session, record: SessionRecord) {
        self.plan(session, &record);
        let old_token = session.record().tokens.access_token.clone();
        let token_changed =
            record.tokens.access_token.is_some() && record.tokens.access_token != old_token;
        let now = now_ms();
        if matches!(
            record.state.state,
            SessionState::NeedsSignIn | SessionState::ClientMisconfigured
        ) {
            session.clear_scoped();
        }
        if token_changed {
            self.write_token_file(&record);
        }
        let event = watch_event(&record, now);
        session.set_record(record);
        // A failure is news once: when it starts (the token ran out while
        // the provider fails, or the session needs a person) or changes.
        session.publish_change(event, token_changed);
    }

    /// Whether any session has a token file configured.
    pub fn has_token_files(&self) -> bool {
        !self
            .token_files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Writes the session's token to its configured file, if it has one.
    pub fn write_token_file(&self, record: &SessionRecord) {
        let Some(token) = &record.tokens.access_token else {
            return;
        };
        let file = self
            .token_files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&*record.name)
            .cloned();
        let Some(file) = file else { return };
        match file.write(token.to_secret().expose()) {
            Ok(()) => {
                tracing::debug!(session = %record.name, file = %file.path.display(), "token file written")
            }
            Err(err) => error!(
                session = %record.name,
                file = %file.path.display(),
                error = %err,
                "cannot write the token file; it keeps the previous token"
            ),
        }
    }

    /// Fetches a down-scoped token for `session` (fewer scopes or another
    /// audience) with the session's refresh token, into its cache under
    /// `key`. Runs under the session's gate like any refresh, and a rotated
    /// refresh token is stored and flushed before the new access token is
    /// cached.
    pub async fn refresh_scoped(
        self: &Arc<Self>,
        session: Arc<Session>,
        key: ScopedKey,
        need: ScopedNeed,
    ) -> Outcome {
        let this = self.clone();
        let span = info_span!("refresh_scoped", session = %session.name);
        let task = self
            .tasks
            .spawn(async move { this.scoped_in_task(&session, &key, need).await }.instrument(span));
        task.await.unwrap_or_else(|_| {
            Err(ErrorReply::new(
                ErrorCode::Internal,
                "the refresh task failed; see the agent's log",
            ))
        })
    }

    async fn scoped_in_task(
        &self,
        session: &Session,
        key: &ScopedKey,
        need: ScopedNeed,
    ) -> Outcome {
        let _gate = session.gate.lock().await;
        if session.is_removed() {
            return Err(no_such_session(&session.name));
        }
        // Another caller may have fetched it while we waited.
        let is_moot = match need {
            ScopedNeed::Valid { min_valid_ms } => session
                .scoped_servable(key, now_ms(), min_valid_ms)
                .is_some(),
            ScopedNeed::Ahead { obtained_at } => session
                .scoped(key)
                .is_some_and(|token| token.obtained_at != obtained_at),
        };
        if is_moot {
            return Ok(());
        }
        if let Some(pending) = session.unsaved() {
            // The held answer's refresh token is the live one; write it
            // before presenting it.
            self.write_pending(session, pending).await?;
        }

        let mut record = session.record().clone();
        match record.state.state {
            SessionState::NeedsSignIn => return Err(reauth_error(&record)),
            SessionState::ClientMisconfigured => return Err(misconfigured_error(&record)),
            _ => {}
        }
        let refresh_token = match self.token_to_present(&record) {
            Ok(Some(token)) => token,
            Ok(None) => return Err(reauth_error(&record)),
            Err(err) => {
                error!(error = %err, "cannot read the refresh token from the store; not refreshing");
                return Err(store_error(&err));
            }
        };

        // The marker goes to disk before the refresh token leaves, as for
        // any refresh; the session's state and main token stay as they are.
        let now = now_ms();
        record.refresh_in_flight = Some(Box::new(InFlight {
            generation: record.generation,
            started_at: now,
        }));
        if let Err(err) = self.store.save(&record).await {
            error!(error = %err, "cannot record the refresh as started; not sending it");
            return Err(store_error(&err));
        }
        session.set_record(record.clone());

        let started = std::time::Instant::now();
        let answered = self
            .provider
            .refresh_narrowed(
                &record.client,
                &refresh_token,
                &key.scope,
                key.audience.as_deref(),
            )
            .await;
        let received = to_ms(answered.received_at);
        let outcome: Outcome = match answered.answer {
            Answer::Tokens(answer) => {
                self.succeed_scoped(session, record, key, answer, received)
                    .await
            }
            Answer::Transient(transient) => {
                record.refresh_in_flight = None;
                self.save_or_log(&record).await;
                self.install(session, record.clone());
                let mut reply = ErrorReply::new(
                    ErrorCode::TemporarilyUnavailable,
                    format!(
                        "session {}: the provider could not issue the down-scoped token ({})",
                        record.name, transient.reason
                    ),
                );
                reply.retry_at = transient
                    .retry_after
                    .map(|d| (now_ms() + d.as_millis() as u64).div_ceil(1000));
                Err(reply)
            }
            // The request was refused as asked, before the refresh token
            // was used: the session itself is fine.
            Answer::NeedsSignIn(provider_error)
                if matches!(
                    provider_error.error.as_str(),
                    "invalid_scope" | "invalid_target"
                ) =>
            {
                record.refresh_in_flight = None;
                self.save_or_log(&record).await;
                self.install(session, record.clone());
                let mut reply = ErrorReply::new(
                    ErrorCode::ProviderRejected,
                    format!(
                        "session {}: the provider refused the down-scoped token ({})",
                        record.name,
                        describe(&provider_error)
                    ),
                );
                reply.provider_error = Some(provider_error);
                Err(reply)
            }
            Answer::NeedsSignIn(provider_error) => {
                self.needs_sign_in(session, record, provider_error).await
            }
            Answer::ClientRejected(provider_error) => {
                self.client_rejected(session, record, provider_error).await
            }
        };
        self.metrics
            .refreshed(outcome_label(&outcome), started.elapsed());
        outcome
    }

    async fn succeed_scoped(
        &self,
        session: &Session,
        mut record: SessionRecord,
        key: &ScopedKey,
        answer: TokenAnswer,
        received: u64,
    ) -> Outcome {
        record.refresh_in_flight = None;
        record.interrupted = false;
        if let Some(refresh_token) = answer.refresh_token {
            // Rotated: the session's record takes the new refresh token
            // exactly as after an ordinary refresh.
            record.tokens.refresh_token = RefreshToken::Held(refresh_token);
            record.tokens.refresh_expires_at = match answer.refresh_expires_in {
                Some(secs) if secs > 0 => Some(received.saturating_add(seconds_to_ms(secs))),
                _ => None,
            }
            .into();
            record.generation += 1;
            if let Err(err) = self.store.save(&record).await {
                error!(
                    error = %err,
                    "the provider rotated the refresh token but the store refused it; \
                     holding it in memory and serving nothing from the answer"
                );
                session.set_unsaved(Some(record));
                self.scheduler
                    .schedule(&session.name, now_ms() + self.timing().backoff_base_ms);
                return Err(store_error(&err));
            }
        } else {
            self.save_or_log(&record).await;
        }
        self.install(session, record.clone());

        if answer.token_type != "bearer" {
            return Err(ErrorReply::new(
                ErrorCode::ProviderRejected,
                "the provider issued a down-scoped token of a type other than Bearer",
            ));
        }
        let lifetime = answer
            .expires_in
            .filter(|&s| s > 0)
            .map(seconds_to_ms)
            .or_else(|| jwt_lifetime_ms(answer.access_token.expose()))
            .unwrap_or(self.timing().default_lifetime_ms)
            .min(MAX_ACCESS_LIFETIME_MS);
        info!(
            scopes = key.scope.len(),
            audience = key.audience.is_some(),
            expires_in_s = lifetime / 1000,
            "down-scoped token issued"
        );
        let token = ScopedToken {
            access_token: answer.access_token,
            obtained_at: received,
            expires_at: received.saturating_add(lifetime),
        };
        session.cache_scoped(key.clone(), token);
        Ok(())
    }

    /// Puts the session in the scheduler for its next refresh, or the end
    /// of its lifetime, whichever comes first; a session that needs a
    /// person is planned only for its end.
    pub fn plan(&self, session: &Session, record: &SessionRecord) {
        let is_stuck = matches!(
            record.state.state,
            SessionState::NeedsSignIn | SessionState::ClientMisconfigured
        );
        let refresh_at = record.next_refresh_at.get().filter(|_| !is_stuck);
        let due = match (refresh_at, record.remove_at.get()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match due {
            Some(at) => self.scheduler.schedule(&session.name, at),
            None => self.scheduler.unschedule(&session.name),
        }
    }

    fn next_refresh(&self, record: &SessionRecord) -> u64 {
        self.timing().next_refresh(
            record.tokens.obtained_at,
            record.tokens.access_expires_at,
            record.tokens.refresh_expires_at.get(),
            rand::random(),
        )
    }

    fn warn_on_skew(&self, answered: &Answered) {
        let Some(server_date) = answered.server_date else {
            return;
        };
        let skew = match answered.received_at.duration_since(server_date) {
            Ok(ahead) => ahead,
            Err(behind) => behind.duration(),
        };
        if skew > SKEW_WARNING {
            warn!(
                skew_s = skew.as_secs(),
                "this machine's clock and the provider's differ; expiries are counted \
                 from local receipt time, so tokens stay usable, but check the clock"
            );
        }
    }
}

fn outcome_label(outcome: &Outcome) -> RefreshOutcome {
    match outcome {
        Ok(()) => RefreshOutcome::Success,
        Err(reply) => match reply.code {
            ErrorCode::ReauthRequired => RefreshOutcome::NeedsSignIn,
            ErrorCode::ClientMisconfigured => RefreshOutcome::ClientRejected,
            ErrorCode::StoreFailed => RefreshOutcome::StoreFailed,
            _ => RefreshOutcome::Transient,
        },
    }
}

/// Whether a refresh is still wanted now that the gate is ours.
fn still_needed(session: &Session, trigger: Trigger) -> bool {
    let now = now_ms();
    match trigger {
        Trigger::Forced => true,
        Trigger::Demand { min_valid_ms } => session.servable(now, min_valid_ms).is_none(),
        // A refresh on demand may have moved the plan since this entry was
        // taken from the queue. An answer the store refused is written
        // whatever the plan says.
        Trigger::Scheduled => session.has_unsaved() || (!session.is_stuck() && session.is_due(now)),
    }
}

/// Fills in tokens and deadlines from a successful answer received at
/// `received` (local clock, Unix ms). Deadlines are durations from receipt,
/// so a provider whose clock is off cannot make tokens look expired or
/// eternal.
pub fn apply_answer(
    record: &mut SessionRecord,
    answer: TokenAnswer,
    received: u64,
    timing: &Timing,
) {
    let tokens = &mut record.tokens;
    let stated = answer.expires_in.filter(|&s| s > 0).map(seconds_to_ms);
    let remembered = tokens
        .provider_lifetime_ms
        .get()
        .map(|ms| ms.min(MAX_ACCESS_LIFETIME_MS));
    let (lifetime, source) = match (stated, remembered) {
        (Some(ms), _) => (ms, ExpirySource::Provider),
        (None, Some(previous)) => (previous, ExpirySource::PreviousLifetime),
        (None, None) => match jwt_lifetime_ms(answer.access_token.expose()) {
            Some(ms) => (ms, ExpirySource::Jwt),
            None => (timing.default_lifetime_ms, ExpirySource::Default),
        },
    };
    if stated.is_some() {
        tokens.provider_lifetime_ms = stated.into();
    }

    tokens.access_token =
        (answer.token_type == "bearer").then(|| PackedToken::new(&answer.access_token));
    tokens.obtained_at = received;
    let lifetime = lifetime.min(MAX_ACCESS_LIFETIME_MS);
    tokens.access_expires_at = received.saturating_add(lifetime);
    tokens.expiry_source = Some(source);

    let rotated = answer.refresh_token.is_some();
    if let Some(refresh_token) = answer.refresh_token {
        tokens.refresh_token = RefreshToken::Held(refresh_token);
    }
    // Zero means the refresh token does not expire. A rotated token without
    // a stated lifetime has none we know; an unrotated one keeps its own.
    match answer.refresh_expires_in {
        Some(secs) if secs > 0 => {
            tokens.refresh_expires_at = Some(received.saturating_add(seconds_to_ms(secs))).into()
        }
        Some(_) => tokens.refresh_expires_at = OptU64::NONE,
        None if rotated => tokens.refresh_expires_at = OptU64::NONE,
        None => {}
    }
}

/// `exp - iat` of a JWT access token, as a duration: comparing `exp` with
/// the local clock would bring the provider's clock skew in.
fn jwt_lifetime_ms(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_i64()?;
    let iat = claims.get("iat")?.as_i64()?;
    let lifetime = i128::from(exp) - i128::from(iat);
    (lifetime > 0).then(|| seconds_to_ms(lifetime.try_into().unwrap_or(i64::MAX)))
}

/// The longest an access token is taken to live, whatever the provider
/// says: a year. No provider we know issues longer ones, and a bogus
/// lifetime (`expires_in: 9223372036854775807`, which is then remembered
/// for answers without one) would otherwise stop refreshes for good and
/// have a token served long after its own `exp`.
const MAX_ACCESS_LIFETIME_MS: u64 = 365 * 24 * 3600 * 1000;

/// The longest any lifetime is counted, a hundred years: deadlines stay
/// within what every consumer reads (a four-digit RFC 3339 year, an exact
/// JSON number), never wrapped round into the past.
const MAX_LIFETIME_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// A provider's lifetime in seconds, in milliseconds, at most
/// [`MAX_LIFETIME_MS`]. Callers pass positive values.
fn seconds_to_ms(seconds: i64) -> u64 {
    u64::try_from(seconds)
        .unwrap_or(0)
        .saturating_mul(1000)
        .min(MAX_LIFETIME_MS)
}

fn set_state(
    record: &mut SessionRecord,
    state: SessionState,
    now: u64,
    reason: Option<String>,
    provider_error: Option<ProviderError>,
) {
    record.state = StateRecord {
        state,
        since: now,
        reason,
        provider_error: provider_error.map(Box::new),
    };
}

fn describe(error: &ProviderError) -> String {
    match &error.description {
        Some(description) => format!("{}: {}", error.error, description),
        None => error.error.clone(),
    }
}

/// Why a session whose provider is failing has no token, and when the
/// agent tries again (`retry_at`), if that is planned: told to a `get`, to
/// the caller of the failed attempt and to watchers alike.
pub fn retrying_error(record: &SessionRecord, now: u64) -> ErrorReply {
    let retry_at = record.next_refresh_at.get().filter(|&at| at > now);
    let when = retry_at.map_or(String::new(), |at| {
        format!(" in {} s", (at - now).div_ceil(1000))
    });
    let mut reply = ErrorReply::new(
        ErrorCode::TemporarilyUnavailable,
        format!(
            "session {}: the provider is failing ({}); the agent retries{when}",
            record.name,
            record.state.reason.as_deref().unwrap_or("unknown error"),
        ),
    );
    reply.retry_at = retry_at.map(|at| at.div_ceil(1000));
    reply
}

pub fn reauth_error(record: &SessionRecord) -> ErrorReply {
    let why = record
        .state
        .reason
        .clone()
        .unwrap_or_else(|| "the session has no refresh token".into());
    let mut reply = ErrorReply::new(
        ErrorCode::ReauthRequired,
        format!(
            "session {name} needs a new sign-in: {why}. Sign in again with `tokenctl login {name} \
             --replace --issuer {issuer} --client-id {client}` (or with its profile), or import \
             a new refresh token with `tokenctl import {name} --replace ...`",
            name = record.name,
            issuer = record.client.issuer,
            client = record.client.client_id,
        ),
    );
    reply.provider_error = record.state.provider_error.as_deref().cloned();
    reply
}

pub fn misconfigured_error(record: &SessionRecord) -> ErrorReply {
    let mut reply = ErrorReply::new(
        ErrorCode::ClientMisconfigured,
        format!(
            "session {}: {}",
            record.name,
            record
                .state
                .reason
                .as_deref()
                .unwrap_or("the client is misconfigured")
        ),
    );
    reply.provider_error = record.state.provider_error.as_deref().cloned();
    reply
}

pub fn no_such_session(name: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::NoSuchSession,
        format!("no session named {name}; `tokenctl list` shows the sessions there are"),
    )
}

fn store_error(err: &crate::store::StoreError) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::StoreFailed,
        format!("the agent cannot write its store ({err}); see the agent's log"),
    )
}

pub fn insufficient_validity(record: &SessionRecord, min_valid_ms: u64) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::InsufficientValidity,
        format!(
            "session {}: the provider's tokens live {} s, less than the {} s asked for",
            record.name,
            record
                .tokens
                .access_expires_at
                .saturating_sub(record.tokens.obtained_at)
                / 1000,
            min_valid_ms.div_ceil(1000)
        ),
    )
}

/// What a watcher is told of `record` now: its token if valid, else why
/// there is none.
pub fn watch_event(record: &SessionRecord, now: u64) -> WatchEvent {
    let token = record
        .tokens
        .access_token
        .as_ref()
        .filter(|_| record.tokens.access_expires_at > now)
        .map(|token| TokenReply {
            access_token: token.to_secret(),
            token_type: "Bearer".into(),
            expires_at: record.tokens.access_expires_at / 1000,
            scope: Vec::new(),
            audience: None,
        });
    let error = match record.state.state {
        SessionState::NeedsSignIn => Some(reauth_error(record)),
        SessionState::ClientMisconfigured => Some(misconfigured_error(record)),
        SessionState::Retrying if token.is_none() => Some(retrying_error(record, now)),
        _ => None,
    };
    WatchEvent {
        name: record.name.to_string(),
        generation: record.generation,
        state: record.state.state,
        token,
        error,
    }
}

/// The reply for a token that the caller may have, built once the gate's
/// outcome says it exists.
pub fn token_or_error(session: &Session, min_valid_ms: u64) -> Result<TokenReply, ErrorReply> {
    let now = now_ms();
    if let Some(token) = session.servable(now, min_valid_ms) {
        return Ok(token);
    }
    let record = session.record();
    if record.tokens.access_token.is_some() && record.tokens.access_expires_at > now {
        return Err(insufficient_validity(&record, min_valid_ms));
    }
    Err(ErrorReply::new(
        ErrorCode::TemporarilyUnavailable,
        format!(
            "session {}: no valid token yet; the agent is refreshing it",
            record.name
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use token_agent_proto::Secret;

    fn record() -> SessionRecord {
        crate::store::tests::record("s1")
    }

    fn answer(expires_in: Option<i64>, refresh: Option<&str>) -> TokenAnswer {
        TokenAnswer {
            access_token: Secret::new("at-2"),
            token_type: "bearer".into(),
            expires_in,
            refresh_token: refresh.map(Secret::new),
            refresh_expires_in: None,
        }
    }

    #[test]
    fn refresh_response_without_refresh_token_keeps_previous_one() {
        let mut r = record();
        apply_answer(&mut r, answer(Some(300), None), 1_000, &Timing::default());
        assert_eq!(
            r.tokens.refresh_token,
            RefreshToken::Held(Secret::new("rt-1"))
        );
        assert_eq!(r.tokens.access_token.unwrap().to_secret().expose(), "at-2");
    }

    #[test]
    fn expiry_counts_from_local_receipt() {
        let mut r = record();
        apply_answer(
            &mut r,
            answer(Some(300), Some("rt-2")),
            50_000,
            &Timing::default(),
        );
        assert_eq!(r.tokens.access_expires_at, 350_000);
        assert_eq!(r.tokens.expiry_source, Some(ExpirySource::Provider));
        assert_eq!(
            r.tokens.refresh_token,
            RefreshToken::Held(Secret::new("rt-2"))
        );
    }

    #[test]
    fn missing_expires_in_falls_back_to_last_known_lifetime() {
        let mut r = record();
        apply_answer(
            &mut r,
            answer(Some(600), Some("rt-1")),
            0,
            &Timing::default(),
        );
        apply_answer(
            &mut r,
            answer(None, Some("rt-2")),
            1_000_000,
            &Timing::default(),
        );
        assert_eq!(r.tokens.access_expires_at, 1_600_000);
        assert_eq!(r.tokens.expiry_source, Some(ExpirySource::PreviousLifetime));
    }

    #[test]
    fn missing_expires_in_uses_the_jwt_lifetime_then_the_default() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"iat":1000,"exp":1900,"sub":"u"}"#);
        let mut r = record();
        let mut jwt = answer(None, None);
        jwt.access_token = Secret::new(format!("eyJhbGciOiJub25lIn0.{claims}.sig"));
        apply_answer(&mut r, jwt, 0, &Timing::default());
        assert_eq!(r.tokens.access_expires_at, 900_000);
        assert_eq!(r.tokens.expiry_source, Some(ExpirySource::Jwt));

        let mut r = record();
        apply_answer(&mut r, answer(Some(0), None), 0, &Timing::default());
        assert_eq!(
            r.tokens.access_expires_at,
            Timing::default().default_lifetime_ms
        );
        assert_eq!(r.tokens.expiry_source, Some(ExpirySource::Default));
    }

    #[test]
    fn refresh_token_deadline_follows_the_provider() {
        let mut r = record();
        let mut a = answer(Some(300), Some("rt-2"));
        a.refresh_expires_in = Some(120);
        apply_answer(&mut r, a, 0, &Timing::default());
        assert_eq!(r.tokens.refresh_expires_at.get(), Some(120_000));

        // Zero: an offline token without expiry.
        let mut a = answer(Some(300), Some("rt-3"));
        a.refresh_expires_in = Some(0);
        apply_answer(&mut r, a, 0, &Timing::default());
        assert_eq!(r.tokens.refresh_expires_at.get(), None);
    }

    /// Lifetimes too large to add to the clock (a provider answering
    /// `expires_in: 9223372036854775807`, or a JWT whose `exp` and `iat`
    /// are far apart) are taken as "far off", never wrapped round into the
    /// past: a wrapped deadline made the agent refresh thousands of times a
    /// second and serve nothing.
    #[test]
    fn huge_lifetimes_mean_far_off_never_already_past() {
        let received = 1_700_000_000_000;
        let timing = Timing::default();

        let mut r = record();
        let mut a = answer(Some(i64::MAX), Some("rt-2"));
        a.refresh_expires_in = Some(i64::MAX);
        apply_answer(&mut r, a, received, &timing);
        assert!(r.tokens.access_expires_at > received);
        assert!(r.tokens.refresh_expires_at.get().unwrap() > received);
        let due = timing.next_refresh(
            r.tokens.obtained_at,
            r.tokens.access_expires_at,
            r.tokens.refresh_expires_at.get(),
            0.5,
        );
        assert!(due > received + 86_400_000, "planned at {due}");

        // The same from a JWT's own claims, and then remembered.
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            r#"{{"iat":{},"exp":{}}}"#,
            i64::MIN,
            i64::MAX
        ));
        let mut r = record();
        let mut jwt = answer(None, None);
        jwt.access_token = Secret::new(format!("eyJhbGciOiJub25lIn0.{claims}.sig"));
        apply_answer(&mut r, jwt, received, &timing);
        assert!(r.tokens.access_expires_at > received);
        apply_answer(&mut r, answer(Some(i64::MAX), None), received, &timing);
        apply_answer(&mut r, answer(None, None), received, &timing);
        assert!(r.tokens.access_expires_at > received);
    }

    /// A bogus lifetime counts as a year at most, also when it is
    /// remembered for a later answer that states none: refreshes go on,
    /// and deadlines stay readable (a four-digit year, an exact JSON
    /// number).
    #[test]
    fn an_absurd_lifetime_counts_as_a_year_and_is_not_remembered_longer() {
        let received = 1_700_000_000_000;
        let year = 365 * 24 * 3600 * 1000;
        let timing = Timing::default();

        let mut r = record();
        apply_answer(
            &mut r,
            answer(Some(i64::MAX), Some("rt-2")),
            received,
            &timing,
        );
        assert_eq!(r.tokens.access_expires_at, received + year);

        apply_answer(&mut r, answer(Some(-5), Some("rt-3")), received, &timing);
        assert_eq!(r.tokens.expiry_source, Some(ExpirySource::PreviousLifetime));
        assert_eq!(r.tokens.access_expires_at, received + year);

        let mut a = answer(Some(300), Some("rt-4"));
        a.refresh_expires_in = Some(i64::MAX);
        apply_answer(&mut r, a, received, &timing);
        let refresh_deadline = r.tokens.refresh_expires_at.get().unwrap();
        assert!(refresh_deadline < (1 << 53), "{refresh_deadline}");
    }

    /// A watcher hears when the failing provider is tried next, as a `get`
    /// would be told.
    #[test]
    fn a_watcher_is_told_when_a_failing_provider_is_tried_next() {
        let now = 1_700_000_000_000;
        let mut r = record();
        r.state = StateRecord {
            state: SessionState::Retrying,
            since: now,
            reason: Some("HTTP 503".into()),
            provider_error: None,
        };
        r.tokens.access_expires_at = now - 1;
        r.next_refresh_at = Some(now + 22_500).into();

        let event = watch_event(&r, now);

        let error = event.error.expect("no token, so an error");
        assert_eq!(error.code, ErrorCode::TemporarilyUnavailable);
        assert_eq!(error.retry_at, Some((now + 22_500).div_ceil(1000)));
    }

    #[test]
    fn a_non_bearer_token_is_not_kept_for_serving() {
        let mut r = record();
        let mut a = answer(Some(300), Some("rt-2"));
        a.token_type = "dpop".into();
        apply_answer(&mut r, a, 0, &Timing::default());
        assert!(r.tokens.access_token.is_none());
        assert_eq!(
            r.tokens.refresh_token,
            RefreshToken::Held(Secret::new("rt-2"))
        );
    }
}
