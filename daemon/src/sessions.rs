//! The in-memory view of every session: the current token, its expiry and
//! state, and the gate that keeps one refresh per session in flight.
//!
//! The store is the durable copy; this view only ever holds what the store
//! holds, or a rotated answer the store refused to take (see
//! [`Session::unsaved`]), which is never served.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use token_agent_proto::{
    ErrorCode, ErrorReply, Secret, SessionState, SessionStatus, TokenReply, WatchEvent,
};
use tokio::sync::broadcast;

use crate::store::SessionRecord;

/// Now, in Unix milliseconds, from the wall clock: expiries are wall-clock
/// deadlines, and checking them against this clock at serving time is what
/// keeps suspend and clock steps from serving a stale token.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn to_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How many events a watcher may fall behind before it skips to the
/// current state; see [`Session::events`].
pub const EVENT_BACKLOG: usize = 64;

/// What a down-scoped token is cached under, beside its session: the
/// scope set (sorted, without repeats) and the audience.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScopedKey {
    pub scope: Vec<String>,
    pub audience: Option<String>,
}

impl ScopedKey {
    pub fn new(mut scope: Vec<String>, audience: Option<String>) -> ScopedKey {
        scope.retain(|s| !s.is_empty());
        scope.sort();
        scope.dedup();
        ScopedKey {
            scope,
            audience: audience.filter(|a| !a.is_empty()),
        }
    }

    /// Whether this asks for the session's own token after all.
    pub fn is_plain(&self) -> bool {
        self.scope.is_empty() && self.audience.is_none()
    }
}

/// A down-scoped access token and its deadlines, Unix milliseconds. Held in
/// memory only: after a restart the first request fetches it again.
#[derive(Clone)]
pub struct ScopedToken {
    pub access_token: Secret,
    pub obtained_at: u64,
    pub expires_at: u64,
}

/// The outcome of one refresh attempt, kept so that callers who waited for
/// it get the same answer without another request to the provider.
pub type Outcome = Result<(), ErrorReply>;

pub struct Session {
    pub name: Arc<str>,
    record: Mutex<SessionRecord>,
    /// Held for the whole of a refresh, and by anything that replaces or
    /// removes the session: at most one refresh per session is in flight.
    pub gate: tokio::sync::Mutex<()>,
    /// Completed refresh attempts. A caller that saw N before waiting at the
    /// gate and finds more after it joined an attempt already made.
    attempts: AtomicU64,
    last_used: AtomicU64,
    removed: AtomicBool,
    /// What few sessions ever have: a failure, an unsaved answer, watchers,
    /// down-scoped tokens. Made when first needed and dropped when empty
    /// again: inline, these cost each of 100,000 sessions some 70 bytes.
    rare: Mutex<Option<Box<Rare>>>,
}

#[derive(Default)]
struct Rare {
    /// The last attempt's failure; `None` when it succeeded.
    last_failure: Option<ErrorReply>,
    /// A rotated answer the store failed to take. The next attempt writes
    /// it instead of presenting the refresh token it replaced.
    /// Boxed: a failing session keeps a small rare part.
    unsaved: Option<Box<SessionRecord>>,
    /// Every change a watcher should hear of: a new token, a failure, the
    /// session's end. A watcher more than [`EVENT_BACKLOG`] events behind
    /// loses the ones in between and is sent the current state instead;
    /// the refresher never waits for a watcher. Made at the first watch:
    /// a channel costs about 18 KB.
    events: Option<broadcast::Sender<WatchEvent>>,
    /// The failure the last event told of (none after a token), so a
    /// failure that goes on through many attempts is told once.
    told_failure: Option<ErrorCode>,
    /// Down-scoped tokens, apart from the session's own.
    scoped: HashMap<ScopedKey, ScopedToken>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.last_failure.is_none()
            && self.unsaved.is_none()
            && self.events.is_none()
            && self.told_failure.is_none()
            && self.scoped.is_empty()
    }
}

impl Session {
    /// A session whose record the store already holds: its refresh token
    /// stays there (see [`crate::store::RefreshToken`]).
    pub fn from_store(mut record: SessionRecord) -> Session {
        record.tokens.refresh_token.put_to_rest();
        Session::new(record)
    }

    /// A session whose record may not be stored yet (an import): it holds
    /// its refresh token until the first write.
    pub fn new(record: SessionRecord) -> Session {
        Session {
            name: record.name.clone(),
            record: Mutex::new(record),
            gate: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
            last_used: AtomicU64::new(now_ms()),
            removed: AtomicBool::new(false),
            rare: Mutex::new(None),
        }
    }

    /// Reads the rare part, if the session has one.
    fn read_rare<T>(&self, read: impl FnOnce(&Rare) -> T) -> Option<T> {
        let rare = self.rare.lock().unwrap_or_else(|e| e.into_inner());
        rare.as_deref().map(read)
    }

    /// Changes the rare part: one is kept only while something is in it,
    /// so a change that leaves it empty (a success, most of the time)
    /// allocates nothing.
    fn change_rare<T>(&self, change: impl FnOnce(&mut Rare) -> T) -> T {
        let mut rare = self.rare.lock().unwrap_or_else(|e| e.into_inner());
        match rare.as_deref_mut() {
            Some(part) => {
                let result = change(part);
                if part.is_empty() {
                    *rare = None;
                }
                result
            }
            None => {
                let mut part = Rare::default();
                let result = change(&mut part);
                if !part.is_empty() {
                    *rare = Some(Box::new(part));
                }
                result
            }
        }
    }

    /// The down-scoped token under `key`, if it stays valid for
    /// `min_valid_ms` more.
    pub fn scoped_servable(
        &self,
        key: &ScopedKey,
        now: u64,
        min_valid_ms: u64,
    ) -> Option<TokenReply> {
        let token = self.scoped(key)?;
        if token.expires_at <= now.saturating_add(min_valid_ms) {
            return None;
        }
        Some(TokenReply {
            access_token: token.access_token,
            token_type: "Bearer".into(),
            expires_at: token.expires_at / 1000,
            scope: key.scope.clone(),
            audience: key.audience.clone(),
        })
    }

    /// The cached down-scoped token under `key`, valid or not.
    pub fn scoped(&self, key: &ScopedKey) -> Option<ScopedToken> {
        self.read_rare(|rare| rare.scoped.get(key).cloned())
            .flatten()
    }

    pub fn cache_scoped(&self, key: ScopedKey, token: ScopedToken) {
        self.change_rare(|rare| rare.scoped.insert(key, token));
    }

    /// Drops every down-scoped token: the session's grant is gone.
    pub fn clear_scoped(&self) {
        self.change_rare(|rare| rare.scoped = HashMap::new());
    }

    /// A rotated answer the store has not taken yet, if there is one.
    pub fn unsaved(&self) -> Option<SessionRecord> {
        self.read_rare(|rare| rare.unsaved.as_deref().cloned())
            .flatten()
    }

    pub fn has_unsaved(&self) -> bool {
        self.read_rare(|rare| rare.unsaved.is_some())
            .unwrap_or(false)
    }

    /// Holds `record` (or nothing) as the answer the store failed to take.
    pub fn set_unsaved(&self, record: Option<SessionRecord>) {
        self.change_rare(|rare| rare.unsaved = record.map(Box::new));
    }

    /// The current record. Callers clone what they need and let go.
    pub fn record(&self) -> MutexGuard<'_, SessionRecord> {
        // A panic while holding this lock cannot leave a half-written
        // record (every update assigns whole values), so poisoning is moot.
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `record`, which the store now holds, the current view; its
    /// refresh token is let go of (the store has it).
    pub fn set_record(&self, mut record: SessionRecord) {
        record.tokens.refresh_token.put_to_rest();
        *self.record() = record;
    }

    /// The token, if it stays valid for `min_valid_ms` more.
    pub fn servable(&self, now: u64, min_valid_ms: u64) -> Option<TokenReply> {
        let record = self.record();
        let token = record.tokens.access_token.as_ref()?;
        if record.tokens.access_expires_at <= now.saturating_add(min_valid_ms) {
            return None;
        }
        Some(TokenReply {
            access_token: token.to_secret(),
            token_type: "Bearer".into(),
            expires_at: record.tokens.access_expires_at / 1000,
            scope: Vec::new(),
            audience: None,
        })
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    pub fn last_outcome(&self) -> Outcome {
        match self.read_rare(|rare| rare.last_failure.clone()).flatten() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// Records an attempt's outcome; callers hold the gate.
    pub fn finish_attempt(&self, outcome: Outcome) {
        self.change_rare(|rare| rare.last_failure = outcome.err());
        self.attempts.fetch_add(1, Ordering::AcqRel);
    }

    pub fn touch(&self, now: u64) {
        self.last_used.store(now, Ordering::Relaxed);
    }

    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// Starts listening to this session's events.
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.change_rare(|rare| {
            rare.events
                .get_or_insert_with(|| broadcast::channel(EVENT_BACKLOG).0)
                .subscribe()
        })
    }

    /// Tells every watcher, if there is any. No watcher is a fine outcome;
    /// a lagging one skips ahead.
    pub fn publish(&self, event: WatchEvent) {
        self.read_rare(|rare| {
            if let Some(events) = &rare.events {
                let _ = events.send(event);
            }
        });
    }

    /// Tells watchers of a change to the session's token or failure: a new
    /// token always, a failure once when it starts or changes (not at every
    /// attempt it goes on through).
    pub fn publish_change(&self, event: WatchEvent, token_changed: bool) {
        let failure = event.error.as_ref().map(|e| e.code);
        self.change_rare(|rare| {
            let is_new_failure = failure.is_some() && failure != rare.told_failure;
            if token_changed || is_new_failure {
                rare.told_failure = failure;
                if let Some(events) = &rare.events {
                    let _ = events.send(event);
                }
            }
        });
    }

    /// Marks the session gone; callers hold the gate.
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
        self.clear_scoped();
        let (generation, state) = {
            let record = self.record();
            (record.generation, record.state.state)
        };
        self.publish(WatchEvent {
            name: self.name.to_string(),
            generation,
            state,
            token: None,
            error: Some(ErrorReply::new(
                ErrorCode::NoSuchSession,
                format!("session {} was removed", self.name),
            )),
        });
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub fn status(&self) -> SessionStatus {
        let record = self.record();
        let seconds = |ms: u64| ms / 1000;
        let has_token = record.tokens.access_token.is_some();
        SessionStatus {
            name: record.name.to_string(),
            issuer: record.client.issuer.clone(),
            client_id: record.client.client_id.clone(),
            token_endpoint: record.client.token_endpoint.clone(),
            scopes: record.client.scopes.clone(),
            state: record.state.state,
            state_since: seconds(record.state.since),
            reason: record.state.reason.clone(),
            access_expires_at: has_token.then(|| seconds(record.tokens.access_expires_at)),
            expiry_source: record.tokens.expiry_source.filter(|_| has_token),
            refresh_expires_at: record.tokens.refresh_expires_at.get().map(seconds),
            last_refresh_at: record.last_refresh_at.get().map(seconds),
            consecutive_failures: record.consecutive_failures,
            next_refresh_at: record.next_refresh_at.get().map(seconds),
            idle_timeout_secs: record.idle_timeout_secs.get(),
            remove_at: record.remove_at.get().map(seconds),
            has_refresh_token: record.tokens.refresh_token.is_some(),
            grant: record.client.grant,
            identity: record.identity.as_deref().cloned(),
        }
    }

    /// Whether the planned refresh time has come.
    pub fn is_due(&self, now: u64) -> bool {
        self.record()
            .next_refresh_at
            .get()
            .is_some_and(|at| at <= now)
    }

    /// Whether the session is in a state where refreshing cannot help
    /// until a person acts.
    pub fn is_stuck(&self) -> bool {
        matches!(
            self.record().state.state,
            SessionState::NeedsSignIn | SessionState::ClientMisconfigured
        )
    }
}

/// Every session by name.
#[derive(Default)]
pub struct Sessions {
    by_name: RwLock<HashSet<ByName>>,
}

/// A session in the set, found by its name: the set holds one pointer per
/// session where a map would hold the name beside it, 16 bytes a slot less.
struct ByName(Arc<Session>);

impl std::borrow::Borrow<str> for ByName {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

impl std::hash::Hash for ByName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state)
    }
}

impl PartialEq for ByName {
    fn eq(&self, other: &ByName) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for ByName {}

impl Sessions {
    pub fn get(&self, name: &str) -> Option<Arc<Session>> {
        self.read().get(name).map(|found| found.0.clone())
    }

    /// Adds a session, returning the one it replaced.
    pub fn insert(&self, session: Arc<Session>) -> Option<Arc<Session>> {
        self.write().replace(ByName(session)).map(|old| old.0)
    }

    /// Removes `session`, but only if it is still the one under its name.
    pub fn remove(&self, session: &Arc<Session>) {
        let mut set = self.write();
        if set
            .get(&*session.name)
            .is_some_and(|current| Arc::ptr_eq(&current.0, session))
        {
            set.remove(&*session.name);
        }
    }

    /// All sessions, sorted by name.
    pub fn all(&self) -> Vec<Arc<Session>> {
        let mut all: Vec<_> = self.read().iter().map(|found| found.0.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashSet<ByName>> {
        self.by_name.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<ByName>> {
        self.by_name.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed_token::PackedToken;
    use token_agent_proto::Secret;

    /// A replaced session is handed back, and removing it afterwards leaves
    /// its replacement in place: a late removal of an old session must not
    /// take the new one with it.
    #[test]
    fn a_replaced_session_is_returned_and_its_late_removal_keeps_the_new_one() {
        let sessions = Sessions::default();
        let old = Arc::new(Session::new(crate::store::tests::record("work")));
        let new = Arc::new(Session::new(crate::store::tests::record("work")));

        assert!(sessions.insert(old.clone()).is_none());
        let replaced = sessions
            .insert(new.clone())
            .expect("the old one comes back");
        assert!(Arc::ptr_eq(&replaced, &old));

        sessions.remove(&old);
        assert!(Arc::ptr_eq(&sessions.get("work").unwrap(), &new));
        sessions.remove(&new);
        assert!(sessions.get("work").is_none() && sessions.is_empty());
    }

    /// Whatever the timers did, serving compares the wall-clock expiry with
    /// the time of the `get`: a token is never served at or past it.
    #[test]
    fn a_token_is_never_served_at_or_past_its_wall_clock_expiry() {
        let mut record = crate::store::tests::record("s1");
        record.tokens.access_token = Some(PackedToken::new(&Secret::new("at")));
        record.tokens.access_expires_at = 1_000_000;
        let session = Session::new(record);

        assert!(session.servable(999_999, 0).is_some());
        assert!(session.servable(1_000_000, 0).is_none());
        assert!(session.servable(1_000_001, 0).is_none());
        // After a suspend of an hour the timer has not fired; still refused.
        assert!(session.servable(1_000_000 + 3_600_000, 0).is_none());
        // The caller's minimum validity counts too.
        assert!(session.servable(990_000, 10_000).is_none());
        assert!(session.servable(989_999, 10_000).is_some());
    }
}
