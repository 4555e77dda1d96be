//! The session store: the only module that touches sled or the store folder.
//!
//! One record per session, keyed by its name, sealed (encrypted and
//! authenticated, see [`crate::seal`]) with the session name as associated
//! data: nothing in the store's files is readable without the key. Every
//! write is flushed before it returns: sled otherwise flushes on a timer, and
//! a rotated refresh token that is only in memory when the process dies is
//! lost for good.
//!
//! A sealed `key-check` file, written when the store is created, tells a
//! wrong key apart from a damaged record before sled opens (and writes).
//!
//! A sealed `sessions.index` lists the names of the sessions the store
//! holds. sled opens a database whose files were truncated as an empty one;
//! without the index such a store would start with its sessions gone and
//! nothing said. The index names every session the database holds, never
//! fewer: a new record is written (and flushed) before its index entry, and
//! an index entry is removed before its record. So a crash can only leave
//! the database holding more than the index, which the load repairs by
//! writing the index afresh, never less; a name in the index that the
//! database lacks means damage: the daemon refuses to start and touches
//! nothing. A damaged index is refused the same way.
//!
//! The index is a snapshot followed by a log: a new name or a removal
//! appends one sealed line and flushes it, so importing N sessions one at a
//! time costs O(N), not O(N²); the log is folded into a new snapshot once it
//! outgrows the snapshot, and at load. An incomplete last line is an append
//! the agent stopped during, and is skipped; any other damage is refused.
//! The format, and why skipping that line keeps the rule above, is in
//! [`index`].
//!
//! Checking a store before sled opens it costs a copy of the whole
//! database. A clean stop skips that cost at the next start: after its last
//! flush and once sled is closed, the agent writes `clean-stop`, the size,
//! modification time and inode of every file of the database. A start that
//! finds every file as that record describes it opens sled directly; any
//! difference (a crash, a torn copy, an edit, a restore) means the full
//! check on a copy. The record is removed once the store has passed, or
//! skipped, the check and before sled opens; a refused store keeps it.
//!
//! The folder also holds `lock`, which carries an exclusive `flock` for as
//! long as the agent runs. The kernel drops it when the process dies, so a
//! crash leaves nothing stale, and a second agent on the same store fails at
//! once instead of refreshing the same tokens.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use token_agent_proto::{
    ClientAuth, ExpirySource, Grant, Identity, ProviderError, Secret, SessionState,
};
use zeroize::Zeroizing;

use crate::packed_token::PackedToken;
use crate::seal::{KeySource, SealError, Sealer};

mod index;

use index::Index;

/// The folder layout version; a store written by a later layout is refused.
/// Layout 2 is layout 1 with the session index as a snapshot plus a log
/// ([`index`]); a layout 1 store opens, and says 2 from the first time its
/// index is written, so that an earlier agent refuses it as newer instead
/// of calling its index damaged.
const LAYOUT_VERSION: &[u8] = b"2";
const EARLIER_LAYOUTS: &[&[u8]] = &[b"1"];

const KEY_CHECK_CONTEXT: &[u8] = b"token-agent store key check";
/// Records per batch handed from the reader to the workers at load.
const LOAD_BATCH: usize = 512;
/// How long a reopen waits for sled's own lock; see [`open_sled`].
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const CLEAN_STOP_FILE: &str = "clean-stop";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {path} is in use by another token-agent (pid {pid})")]
    Locked { path: PathBuf, pid: String },
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store at {path} is unreadable ({source}); it was left untouched")]
    Damaged {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the store at {path} was written by a newer token-agent (layout {found})")]
    NewerLayout { path: PathBuf, found: String },
    #[error("the record of session {name} is unreadable: {detail}")]
    BadRecord { name: String, detail: String },
    #[error("store write failed: {0}")]
    Write(#[source] sled::Error),
    #[error("cannot write the session index {path}: {source}")]
    WriteIndex {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the store at {path} is damaged: its session index names {missing} session(s) \
         the database does not hold ({names}); it was left untouched. Restore the store \
         folder from a backup, or move it away to start empty"
    )]
    MissingSessions {
        path: PathBuf,
        missing: usize,
        names: String,
    },
    #[error(
        "the store at {path} is damaged: its session index does not open ({detail}); it \
         was left untouched. Restore the store folder from a backup, or move it away to \
         start empty"
    )]
    DamagedIndex { path: PathBuf, detail: String },
    #[error(transparent)]
    Key(#[from] SealError),
    #[error(
        "the store at {path} is encrypted, but its key is missing: expected {path}/key, \
         the key_file in the configuration, or the systemd credential store-key"
    )]
    MissingKey { path: PathBuf },
    #[error(
        "the store at {path} was written with another key than the {source_name}, or its \
         key-check file is damaged; \
         nothing was changed. Start with the key it was written with"
    )]
    WrongKey { path: PathBuf, source_name: String },
}

/// What the store keeps of one session. Holds secrets: never log it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Shared with the session's name everywhere else it is held.
    pub name: Arc<str>,
    /// Shared by every session of the same client ([`share_client`]):
    /// 100,000 sessions of one client hold one copy.
    #[serde(deserialize_with = "read_shared_client")]
    pub client: Arc<ClientConfig>,
    pub tokens: Tokens,
    /// Counts successful refreshes; names the refresh token in use.
    pub generation: u64,
    /// Set, and flushed, before a refresh request is sent; cleared when its
    /// answer is stored. Found set at start-up, it means the agent stopped
    /// while the provider may already have rotated the refresh token.
    /// Boxed: set only while a refresh is in flight.
    pub refresh_in_flight: Option<Box<InFlight>>,
    /// Set at start-up from `refresh_in_flight`, until the next answer.
    #[serde(default)]
    pub interrupted: bool,
    pub state: StateRecord,
    #[serde(default)]
    pub last_refresh_at: OptU64,
    pub consecutive_failures: u32,
    /// No earlier than this, the next attempt; the scheduler's due time.
    #[serde(default)]
    pub next_refresh_at: OptU64,
    #[serde(default)]
    pub idle_timeout_secs: OptU64,
    /// When to remove the session (Unix ms), if imported with a lifetime.
    #[serde(default)]
    pub remove_at: OptU64,
    pub created_at: u64,
    /// Who signed in, for display only.
    #[serde(default)]
    /// Boxed: an inline `Identity` costs every session its size.
    pub identity: Option<Box<Identity>>,
}

/// The shared copy of `config`: the one every session of the same client
/// already uses, or `config` itself, now shared. Most agents hold many
/// sessions of a few clients, and a copy per session costs a few hundred
/// bytes each. Held weakly, so a client's secret leaves memory with its
/// last session.
pub fn share_client(config: ClientConfig) -> Arc<ClientConfig> {
    type EndpointAndId = (String, String);
    static SHARED: std::sync::OnceLock<
        std::sync::Mutex<HashMap<EndpointAndId, Vec<std::sync::Weak<ClientConfig>>>>,
    > = std::sync::OnceLock::new();

    let mut shared = SHARED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = (config.token_endpoint.clone(), config.client_id.clone());
    let copies = shared.entry(key).or_default();
    copies.retain(|copy| copy.strong_count() > 0);
    if let Some(copy) = copies
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .find(|copy| **copy == config)
    {
        return copy;
    }
    let config = Arc::new(config);
    copies.push(Arc::downgrade(&config));
    config
}

/// Reads a record's client configuration into its shared copy, so that
/// the copy parsed is freed at once (see [`RefreshToken`] on holes).
fn read_shared_client<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Arc<ClientConfig>, D::Error> {
    ClientConfig::deserialize(deserializer).map(share_client)
}

/// Where and how to refresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    pub issuer: String,
    pub token_endpoint: String,
    /// RFC 7009 revocation, from discovery, when the provider has it.
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub client_auth: ClientAuth,
    pub scopes: Vec<String>,
    /// How the next access token is obtained.
    #[serde(default)]
    pub grant: Grant,
}

/// The tokens and their deadlines, Unix milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tokens {
    pub access_token: Option<PackedToken>,
    pub obtained_at: u64,
    pub access_expires_at: u64,
    pub expiry_source: Option<ExpirySource>,
    /// The lifetime the provider stated last, for answers that omit it.
    #[serde(default)]
    pub provider_lifetime_ms: OptU64,
    pub refresh_token: RefreshToken,
    #[serde(default)]
    pub refresh_expires_at: OptU64,
}

/// An `Option<u64>` in 8 bytes instead of 16: each of 100,000 sessions holds
/// six. Stored as a number or `null`, exactly like an `Option<u64>`. The
/// one value it cannot hold, `u64::MAX`, is kept as `u64::MAX - 1`: as a
/// time or a duration, both mean never.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct OptU64(u64);

impl OptU64 {
    pub const NONE: OptU64 = OptU64(u64::MAX);

    pub fn get(self) -> Option<u64> {
        (self != OptU64::NONE).then_some(self.0)
    }
}

impl Default for OptU64 {
    fn default() -> OptU64 {
        OptU64::NONE
    }
}

impl From<Option<u64>> for OptU64 {
    fn from(value: Option<u64>) -> OptU64 {
        value.map_or(OptU64::NONE, |v| OptU64(v.min(u64::MAX - 1)))
    }
}

impl std::fmt::Debug for OptU64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl Serialize for OptU64 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for OptU64 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Option::<u64>::deserialize(deserializer).map(OptU64::from)
    }
}

/// A session's refresh token as the agent holds it.
///
/// Refresh tokens are needed only to refresh, a few times an hour, and the
/// store always holds the current one; so a session in memory keeps it
/// `AtRest` and the refresher reads it from the store
/// ([`Store::refresh_token`]) just before presenting it. 100,000 sessions
/// then do not keep 100,000 refresh tokens in the agent's memory, where a
/// core dump or a memory read would find them. `Held` is a token not yet
/// known to be on disk: a new import, a rotated answer before its write,
/// a session put back after a refused replacement.
///
/// Serialised as the token or `null`, like an `Option<Secret>`; a record
/// whose token is `AtRest` is written by [`Store::save`], which keeps the
/// stored token in it. A record read from the store has its token `AtRest`
/// by construction: the token is skipped while parsing, never copied into
/// memory (a copy freed after the load would leave 100,000 holes in the
/// heap that the allocator cannot give back).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RefreshToken {
    #[default]
    None,
    Held(Secret),
    AtRest,
}

impl RefreshToken {
    /// Whether the session has a refresh token, held or at rest.
    pub fn is_some(&self) -> bool {
        !matches!(self, RefreshToken::None)
    }

    /// Lets go of a held token that the store now holds.
    pub fn put_to_rest(&mut self) {
        if let RefreshToken::Held(_) = self {
            *self = RefreshToken::AtRest;
        }
    }
}

impl From<Option<Secret>> for RefreshToken {
    fn from(token: Option<Secret>) -> RefreshToken {
        token.map_or(RefreshToken::None, RefreshToken::Held)
    }
}

impl Serialize for RefreshToken {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RefreshToken::None => serializer.serialize_none(),
            RefreshToken::Held(token) => serializer.serialize_some(token),
            RefreshToken::AtRest => Err(serde::ser::Error::custom(
                "a refresh token at rest is written by the store, which holds it",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for RefreshToken {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = Option::<serde::de::IgnoredAny>::deserialize(deserializer)?;
        Ok(match stored {
            Some(_) => RefreshToken::AtRest,
            None => RefreshToken::None,
        })
    }
}

/// Just the refresh token of a stored record (serde skips the rest).
#[derive(Deserialize)]
struct StoredRefreshToken {
    tokens: StoredTokens,
}

#[derive(Deserialize)]
struct StoredTokens {
    refresh_token: Option<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InFlight {
    pub generation: u64,
    pub started_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: SessionState,
    pub since: u64,
    pub reason: Option<String>,
    /// Boxed: most sessions have none, and an inline one costs every
    /// session its size.
    pub provider_error: Option<Box<ProviderError>>,
}

pub struct Store {
    path: PathBuf,
    sealer: Sealer,
    /// sled and its sessions tree. After a failed write sled keeps failing
    /// every later one (it remembers the error), so the store reopens it:
    /// a full disk that gets room again takes writes again without a
    /// restart. `None` while a reopen has not succeeded yet.
    sled: std::sync::RwLock<Option<(sled::Db, sled::Tree)>>,
    /// `sessions.index`; `None` until the first load of a store that has
    /// none yet (new, or from an earlier version).
    index: std::sync::Mutex<Option<Index>>,
    /// Group commit: one sled flush in flight at a time, covering every
    /// write made before it started. sled runs each `flush_async` on its own
    /// small thread pool, the same pool that writes its log buffers; many
    /// concurrent flushes block every pool thread waiting for writes that no
    /// thread is left to make, and the store hangs.
    flushes: FlushQueue,
    /// Set by [`Store::close`]: writes fail from then on instead of
    /// reopening sled behind the clean-stop record.
    closed: std::sync::atomic::AtomicBool,
    // Held, never read: the flock lives as long as this file is open.
    _lock: File,
}

/// Counts writes and the writes a completed flush covers.
#[derive(Default)]
struct FlushQueue {
    /// Writes made so far.
    written: std::sync::atomic::AtomicU64,
    /// The `written` count the last completed flush covered.
    flushed: std::sync::atomic::AtomicU64,
    /// Held by the one flush in flight.
    turn: tokio::sync::Mutex<()>,
}

impl Store {
    /// Opens the store in `dir`, creating it owner-only if it is missing.
    /// `key_file` is the configured key file, if any (see [`crate::seal`]).
    pub fn open(dir: &Path, key_file: Option<&Path>) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(open_err)?;
        let lock = take_lock(dir)?;
        check_layout(dir)?;
        // The key is proven before sled opens: opening writes to its files.
        let db_path = dir.join("sled");
        let sealer = unlock(dir, key_file, db_path.exists())?;
        // Read before sled opens, so a damaged index is refused untouched.
        let index = Index::read(dir, &sealer)?;

        if db_path.exists() {
            let untouched = read_clean_stop(dir)
                .is_some_and(|stopped| fingerprint(&db_path).is_ok_and(|now| now == stopped));
            // The record goes before sled opens, so it never outlives the
            // files it describes; a record that cannot go means the check.
            if untouched && remove_clean_stop(dir) {
                tracing::debug!("the store is as the last clean stop left it; opening it directly");
            } else {
                verify_on_a_copy(dir, &db_path, index.as_ref().map(Index::names))?;
                remove_clean_stop(dir);
            }
        }
        let opened = open_sled(&db_path)?;

        Ok(Store {
            path: dir.to_path_buf(),
            sealer,
            sled: std::sync::RwLock::new(Some(opened)),
            index: std::sync::Mutex::new(index),
            flushes: FlushQueue::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// Where the key came from.
    pub fn key_source(&self) -> &KeySource {
        &self.sealer.source
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every record in the store, in key order. A record that does not
    /// parse fails the whole load: starting without it would drop a
    /// session silently.
    pub fn load_all(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let mut records = Vec::new();
        self.load_each(|record| records.push(record))?;
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Hands every record in the store to `each`, in no set order, on the
    /// calling thread, as they are opened. Fails as [`Store::load_all`]
    /// does; `each` may have had some records by then.
    ///
    /// At 100,000 sessions this is most of the start-up, so it runs as a
    /// pipeline: one thread reads sealed records from sled and checks their
    /// names against the index, a worker per core opens and parses them,
    /// and the caller builds its sessions from them meanwhile.
    ///
    /// Reading the whole tree leaves sled's cache holding a decoded copy of
    /// every page, which the agent never reads again (it serves from memory
    /// and only writes); so sled is closed after the load and reopened
    /// empty-handed.
    pub fn load_each(&self, mut each: impl FnMut(SessionRecord)) -> Result<(), StoreError> {
        use std::sync::mpsc::sync_channel;

        let (db, tree) = self.sled()?;
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (sealed_out, sealed_in) = sync_channel::<Vec<(sled::IVec, sled::IVec)>>(workers * 2);
        let (opened_out, opened_in) = sync_channel(workers * 2);
        let sealed_in = std::sync::Mutex::new(sealed_in);
        let (read, names, opened) = std::thread::scope(|scope| {
            for _ in 0..workers {
                let (sealed_in, opened_out) = (&sealed_in, opened_out.clone());
                scope.spawn(move || loop {
                    let batch = sealed_in.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(batch) = batch else { return };
                    let records: Result<Vec<SessionRecord>, StoreError> = batch
                        .iter()
                        .map(|(key, sealed)| open_record(key, sealed, &self.sealer))
                        .collect();
                    if opened_out.send(records).is_err() {
                        return;
                    }
                });
            }
            drop(opened_out);

            let tree = &tree;
            let reader = scope.spawn(move || {
                let mut batch = Vec::with_capacity(LOAD_BATCH);
                for entry in tree.iter() {
                    let (key, sealed) = entry.map_err(|source| StoreError::Damaged {
                        path: self.path.clone(),
                        source,
                    })?;
                    batch.push((key, sealed));
                    if batch.len() == LOAD_BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(LOAD_BATCH));
                        if sealed_out.send(full).is_err() {
                            break;
                        }
                    }
                }
                if !batch.is_empty() {
                    let _ = sealed_out.send(batch);
                }
                Ok::<_, StoreError>(())
            });

            // The names are the records' own (a record's name is its key,
            // see `open_record`), so the index can share them. Made here,
            // on the loading thread: names made by the reader would be
            // strewn among sled's cached pages in its heap and keep them
            // from being given back after the load.
            let mut names = Vec::new();
            let mut opened = Ok(());
            for records in opened_in {
                match records {
                    Ok(records) if opened.is_ok() => {
                        for record in records {
                            names.push(record.name.clone());
                            each(record);
                        }
                    }
                    Ok(_) => {}
                    Err(err) => opened = opened.and(Err(err)),
                }
            }
            let read = reader.join().expect("reading the store does not panic");
            (read, names, opened)
        });
        drop(tree);
        drop(db);

        read?;
        opened?;
        // Built in one go: a set grown by sorted inserts leaves its nodes
        // half full, twice the memory.
        self.check_index(names.into_iter().collect())?;
        self.release_cache()
    }

    /// Closes and reopens sled, dropping the pages a full read cached.
    fn release_cache(&self) -> Result<(), StoreError> {
        let mut slot = self.sled.write().unwrap_or_else(|e| e.into_inner());
        drop(slot.take());
        *slot = Some(open_sled(&self.path.join("sled"))?);
        Ok(())
    }

    /// Flushes and closes the database and writes the clean-stop record,
    /// so that the next start can skip the check on a copy. Writes after
    /// this fail. A write still holding the database when the agent stops
    /// (past the shutdown grace) changes the files after the record was
    /// taken, which the next start sees as a difference: it then checks.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.flush().await?;
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let open = self.sled.write().unwrap_or_else(|e| e.into_inner()).take();
        drop(open);
        let db_path = self.path.join("sled");
        let record = fingerprint(&db_path).map_err(|source| StoreError::Open {
            path: db_path.clone(),
            source,
        })?;
        let path = self.path.join(CLEAN_STOP_FILE);
        write_owner_only(&path, record.as_bytes())
            .map_err(|source| StoreError::Open { path, source })
    }

    /// Refuses a database that lacks a session the index names; writes the
    /// index when the store has none yet, and rewrites it as a snapshot of
    /// the names the database holds when it differs or has a log.
    fn check_index(&self, held: std::collections::BTreeSet<Arc<str>>) -> Result<(), StoreError> {
        let mut index = self.index();
        match index.as_mut() {
            Some(index) => {
                missing_names(&self.path, index.names(), |name| held.contains(name))?;
                // More held than indexed: a crash between a new record and
                // its index entry.
                if held.len() > index.names().len() || !index.is_compact() {
                    index.replace(&self.path, &self.sealer, held)?;
                } else {
                    index.adopt(held);
                }
            }
            None => *index = Some(Index::create(&self.path, &self.sealer, held)?),
        }
        Ok(())
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Option<Index>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a record and returns once it is on disk. A record whose
    /// refresh token is at rest keeps the one stored under its name, read
    /// and replaced in one compare-and-swap, so a write racing a rotation
    /// can never put an older token back.
    pub async fn save(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let key = record.name.as_bytes();
        if record.tokens.refresh_token == RefreshToken::AtRest {
            self.write(|tree| loop {
                let Some(stored) = tree.get(key).map_err(StoreError::Write)? else {
                    return Err(StoreError::BadRecord {
                        name: record.name.to_string(),
                        detail: "its refresh token is not in the store (was it removed meanwhile?)"
                            .into(),
                    });
                };
                let mut whole = record.clone();
                whole.tokens.refresh_token = self.open_refresh_token(key, &stored)?.into();
                let sealed = self.seal_record(&whole)?;
                match tree.compare_and_swap(key, Some(stored), Some(sealed)) {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(_changed_meanwhile)) => continue,
                    Err(err) => return Err(StoreError::Write(err)),
                }
            })
            .await?;
        } else {
            let sealed = self.seal_record(record)?;
            self.write(|tree| {
                tree.insert(key, sealed)
                    .map(drop)
                    .map_err(StoreError::Write)
            })
            .await?;
        }

        // The record first, then its index entry: see the module docs.
        let mut index = self.index();
        match index.as_mut() {
            Some(index) => index.add(&self.path, &self.sealer, &record.name),
            None => {
                let names = std::collections::BTreeSet::from([record.name.clone()]);
                *index = Some(Index::create(&self.path, &self.sealer, names)?);
                Ok(())
            }
        }
    }

    /// Deletes a record and returns once that is on disk.
    pub async fn remove(&self, name: &str) -> Result<(), StoreError> {
        // The index entry first, then the record: see the module docs.
        if let Some(index) = self.index().as_mut() {
            index.remove(&self.path, &self.sealer, name)?;
        }
        self.write(|tree| {
            tree.remove(name.as_bytes())
                .map(drop)
                .map_err(StoreError::Write)
        })
        .await
    }

    /// Applies one change to the sessions tree and returns once it is on
    /// disk. After a failed write sled refuses every later one, so it is
    /// closed, to be reopened at the next write.
    async fn write(
        &self,
        change: impl FnOnce(&sled::Tree) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let (db, tree) = self.sled()?;
        let written = match change(&tree) {
            Ok(()) => self.flush_covering(&db).await.map_err(StoreError::Write),
            Err(err) => Err(err),
        };
        drop((db, tree));
        if let Err(StoreError::Write(_)) = &written {
            self.reopen_after_failure();
        }
        written
    }

    /// The session's current refresh token, read from disk: the one to
    /// present next. `None` if the session has none.
    pub fn refresh_token(&self, name: &str) -> Result<Option<Secret>, StoreError> {
        let (_db, tree) = self.sled()?;
        match tree.get(name.as_bytes()).map_err(StoreError::Write)? {
            Some(stored) => self.open_refresh_token(name.as_bytes(), &stored),
            None => Err(StoreError::BadRecord {
                name: name.to_string(),
                detail: "the session is not in the store".into(),
            }),
        }
    }

    fn open_refresh_token(&self, key: &[u8], sealed: &[u8]) -> Result<Option<Secret>, StoreError> {
        let bad = |detail: String| StoreError::BadRecord {
            name: String::from_utf8_lossy(key).into_owned(),
            detail,
        };
        let plain = self
            .sealer
            .open(key, sealed)
            .map_err(|err| bad(err.to_string()))?;
        let stored: StoredRefreshToken =
            serde_json::from_slice(&plain).map_err(|err| bad(err.to_string()))?;
        Ok(stored.tokens.refresh_token)
    }

    fn seal_record(&self, record: &SessionRecord) -> Result<Vec<u8>, StoreError> {
        let plain =
            Zeroizing::new(
                serde_json::to_vec(record).map_err(|err| StoreError::BadRecord {
                    name: record.name.to_string(),
                    detail: err.to_string(),
                })?,
            );
        Ok(self.sealer.seal(record.name.as_bytes(), &plain))
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        let (db, _tree) = self.sled()?;
        self.flush_covering(&db).await.map_err(StoreError::Write)?;
        Ok(())
    }

    /// Returns once every write made before this call is on disk, sharing
    /// one flush with the writes that came along meanwhile.
    async fn flush_covering(&self, db: &sled::Db) -> sled::Result<()> {
        use std::sync::atomic::Ordering;

        let mine = self.flushes.written.fetch_add(1, Ordering::AcqRel) + 1;
        let _turn = self.flushes.turn.lock().await;
        if self.flushes.flushed.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        let covers = self.flushes.written.load(Ordering::Acquire);
        db.flush_async().await?;
        self.flushes.flushed.fetch_max(covers, Ordering::AcqRel);
        Ok(())
    }

    /// The open database, reopening it if a failure closed it.
    fn sled(&self) -> Result<(sled::Db, sled::Tree), StoreError> {
        if let Some(open) = &*self.sled.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(open.clone());
        }
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Write(sled::Error::Unsupported(
                "the store was closed for shutdown".into(),
            )));
        }
        let mut slot = self.sled.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(open_sled(&self.path.join("sled"))?);
        }
        Ok(slot.clone().expect("just opened"))
    }

    /// Closes sled after a failed write, so the next write reopens it and
    /// finds out afresh whether the disk takes writes. sled recovers its
    /// log up to the last complete write; what failed was never
    /// acknowledged. A write still in progress elsewhere keeps the old
    /// database open a moment longer; the reopen then waits for a later
    /// call.
    fn reopen_after_failure(&self) {
        // Closing only; `sled()` opens afresh at the next write. Reopening
        // at once would run sled's recovery on a disk that is still full.
        let old = self.sled.write().unwrap_or_else(|e| e.into_inner()).take();
        drop(old);
    }
}

/// Takes the store's exclusive lock and writes our pid into the lock file,
/// so the error a second agent prints can name the first.
fn take_lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("lock");
    let open_err = |source| StoreError::Open {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(open_err)?;

    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.into()
                },
            });
        }
        Err(fs::TryLockError::Error(err)) => return Err(open_err(err)),
    }

    file.set_len(0).map_err(open_err)?;
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    writeln!(file, "{}", std::process::id()).map_err(open_err)?;
    file.sync_all().map_err(open_err)?;
    Ok(file)
}

/// Finds the store's key and proves it is the one the store was written
/// with, by opening the sealed `key-check` file. A new store gets a key and
/// a key check; an existing one is never touched until its check opens.
fn unlock(dir: &Path, key_file: Option<&Path>, has_data: bool) -> Result<Sealer, StoreError> {
    let check_path = dir.join("key-check");
    let key_check = match fs::read(&check_path) {
        Ok(bytes) => Some(bytes),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(StoreError::Open {
                path: check_path,
                source,
            })
        }
    };
    let is_new = key_check.is_none() && !has_data;

    let sealer =
        Sealer::find_key(dir, key_file, is_new)?.ok_or_else(|| StoreError::MissingKey {
            path: dir.to_path_buf(),
        })?;
    match key_check {
        Some(sealed) => {
            sealer
                .open(KEY_CHECK_CONTEXT, &sealed)
                .map_err(|_| StoreError::WrongKey {
                    path: dir.to_path_buf(),
                    source_name: sealer.source.to_string(),
                })?;
        }
        None if is_new => {
            let sealed = sealer.seal(KEY_CHECK_CONTEXT, b"ok");
            fs::write(&check_path, sealed)
                .and_then(|()| fs::File::open(&check_path)?.sync_all())
                .map_err(|source| StoreError::Open {
                    path: check_path,
                    source,
                })?;
        }
        None => {
            return Err(StoreError::BadRecord {
                name: "key-check".into(),
                detail: "the store holds data but no key check; it is damaged".into(),
            })
        }
    }
    Ok(sealer)
}

/// Opens sled and its sessions tree.
/// sled's page cache. The agent serves from memory and reads sled only to
/// load and to fetch a refresh token just before presenting it; every
/// other access is a write. sled's default (1 GiB) lets a day of refreshes
/// fill the agent's memory with pages it will not read again.
const SLED_CACHE_BYTES: u64 = 16 * 1024 * 1024;

fn open_sled(db_path: &Path) -> Result<(sled::Db, sled::Tree), StoreError> {
    let damaged = |source| StoreError::Damaged {
        path: db_path.to_path_buf(),
        source,
    };
    let config = sled::Config::new()
        .path(db_path)
        // Our own flushes decide durability; the timer only adds work.
        .flush_every_ms(None)
        .cache_capacity(SLED_CACHE_BYTES);

    // sled's background threads can hold its file lock for a moment after
    // the database was closed, so reopening it at once (after the load, or
    // a restart within the process) may find the lock taken. No other
    // agent can hold it (the store's own `lock` keeps them out): wait.
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    let db = loop {
        match config.open() {
            Err(err) if is_lock_taken(&err) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            opened => break opened.map_err(damaged)?,
        }
    };
    let sessions = db.open_tree("sessions").map_err(damaged)?;
    Ok((db, sessions))
}

/// Whether sled failed to open because its file lock is taken.
fn is_lock_taken(err: &sled::Error) -> bool {
    matches!(err, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn open_record(key: &[u8], sealed: &[u8], sealer: &Sealer) -> Result<SessionRecord, StoreError> {
    let bad = |detail: String| StoreError::BadRecord {
        name: String::from_utf8_lossy(key).into_owned(),
        detail,
    };
    let plain = sealer
        .open(key, sealed)
        .map_err(|err| bad(err.to_string()))?;
    let record: SessionRecord =
        serde_json::from_slice(&plain).map_err(|err| bad(err.to_string()))?;
    // The load takes the index's names from the records: each must name
    // the key it is stored under.
    if record.name.as_bytes() != key {
        return Err(bad("its name is not the name it is stored under".into()));
    }
    Ok(record)
}

/// sled repairs what it can when it opens, writing to its files as it
/// goes: a truncated database file is reopened as an empty database. So the
/// database is first opened from a copy, and its keys checked against the
/// index there; a damaged store is refused before sled touches the real
/// files. Records are opened and parsed once, by the load after this. When
/// the copy cannot be made (a full disk), the check is skipped with a
/// warning and the index check at load time still catches lost sessions.
fn verify_on_a_copy(
    dir: &Path,
    db_path: &Path,
    index: Option<&std::collections::BTreeSet<Arc<str>>>,
) -> Result<(), StoreError> {
    let copy = dir.join("sled.verify");
    let _ = fs::remove_dir_all(&copy);
    if let Err(err) = copy_dir(db_path, &copy) {
        let _ = fs::remove_dir_all(&copy);
        tracing::warn!(error = %err, "cannot copy the store to check it before opening; opening it directly");
        return Ok(());
    }
    let damaged = |source| StoreError::Damaged {
        path: db_path.to_path_buf(),
        source,
    };
    let checked = (|| {
        let (_db, tree) = open_sled(&copy).map_err(|err| match err {
            StoreError::Damaged { source, .. } => damaged(source),
            other => other,
        })?;
        let held = tree
            .iter()
            .keys()
            .map(|key| key.map(|k| String::from_utf8_lossy(&k).into_owned()))
            .collect::<sled::Result<std::collections::BTreeSet<String>>>()
            .map_err(damaged)?;
        if let Some(names) = index {
            missing_names(dir, names, |name| held.contains(name))?;
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&copy);
    checked
}

/// What the clean-stop record holds: each file under the database folder
/// with its size, modification time and inode, one per line, sorted.
fn fingerprint(db_path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;

    let mut lines = Vec::new();
    let mut folders = vec![db_path.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in fs::read_dir(&folder)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                folders.push(entry.path());
                continue;
            }
            let relative = entry.path();
            let relative = relative.strip_prefix(db_path).unwrap_or(&relative);
            lines.push(format!(
                "{} {} {}.{:09} {}",
                relative.display(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ino()
            ));
        }
    }
    lines.sort();
    Ok(lines.join("\n"))
}

/// The clean-stop record, if the last stop left one.
fn read_clean_stop(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(CLEAN_STOP_FILE)).ok()
}

/// Removes the clean-stop record; false if one is left behind. Not
/// flushed: a record that comes back after a crash no longer matches files
/// that sled has written since.
fn remove_clean_stop(dir: &Path) -> bool {
    let path = dir.join(CLEAN_STOP_FILE);
    match fs::remove_file(&path) {
        Ok(()) => true,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => true,
        Err(err) => {
            tracing::warn!(error = %err, path = %path.display(), "cannot remove the clean-stop record; the store is checked in full at start while it stays");
            false
        }
    }
}

fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Refuses a database holding fewer names than the index.
fn missing_names(
    dir: &Path,
    names: &std::collections::BTreeSet<Arc<str>>,
    holds: impl Fn(&str) -> bool,
) -> Result<(), StoreError> {
    let missing: Vec<&str> = names.iter().map(|n| &**n).filter(|n| !holds(n)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(StoreError::MissingSessions {
        path: dir.to_path_buf(),
        missing: missing.len(),
        names: missing.join(", "),
    })
}

/// Records the layout version in a new store and refuses a newer one.
fn check_layout(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join("layout");
    match fs::read(&path) {
        Ok(found) if found.trim_ascii() == LAYOUT_VERSION => Ok(()),
        Ok(found) if EARLIER_LAYOUTS.contains(&found.trim_ascii()) => Ok(()),
        Ok(found) => Err(StoreError::NewerLayout {
            path: dir.to_path_buf(),
            found: String::from_utf8_lossy(&found).trim().to_string(),
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => fs::write(&path, LAYOUT_VERSION)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o600)))
            .map_err(|source| StoreError::Open { path, source }),
        Err(source) => Err(StoreError::Open { path, source }),
    }
}

/// Records the current layout version in the store, if it holds an
/// earlier one: in one step (a new file, flushed, renamed, the folder
/// flushed), as the index written next depends on it.
fn upgrade_layout(dir: &Path) -> std::io::Result<()> {
    let path = dir.join("layout");
    match fs::read(&path) {
        Ok(found) if found.trim_ascii() == LAYOUT_VERSION => return Ok(()),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let temporary = dir.join("layout.new");
    write_owner_only(&temporary, LAYOUT_VERSION)?;
    fs::rename(&temporary, &path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(name: &str) -> SessionRecord {
        SessionRecord {
            name: name.into(),
            client: Arc::new(ClientConfig {
                issuer: "https://id.example".into(),
                token_endpoint: "https://id.example/token".into(),
                revocation_endpoint: None,
                client_id: "cli".into(),
                client_secret: None,
                client_auth: ClientAuth::None,
                scopes: vec![],
                grant: Grant::RefreshToken,
            }),
            tokens: Tokens {
                refresh_token: RefreshToken::Held(Secret::new("rt-1")),
                ..Tokens::default()
            },
            generation: 0,
            refresh_in_flight: None,
            interrupted: false,
            state: StateRecord {
                state: SessionState::Fresh,
                since: 0,
                reason: None,
                provider_error: None,
            },
            last_refresh_at: OptU64::NONE,
            consecutive_failures: 0,
            next_refresh_at: OptU64::NONE,
            idle_timeout_secs: OptU64::NONE,
            remove_at: OptU64::NONE,
            created_at: 0,
            identity: None,
        }
    }

    #[tokio::test]
    async fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), None).unwrap();
            store.save(&record("work")).await.unwrap();
            store.save(&record("home")).await.unwrap();
            store.remove("home").await.unwrap();
        }
        let store = Store::open(dir.path(), None).unwrap();
        let records = store.load_all().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(&*records[0].name, "work");
        assert_eq!(
            store.refresh_token("work").unwrap().unwrap().expose(),
            "rt-1"
        );
    }

    fn index_lines(dir: &Path) -> Vec<Vec<u8>> {
        fs::read(dir.join(index::FILE))
            .unwrap()
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    /// Every file's bytes but the lock's (it holds the pid).
    fn files(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
        walk(dir)
            .into_iter()
            .filter(|p| !p.ends_with("lock"))
            .map(|p| {
                let bytes = fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect()
    }

    #[tokio::test]
    async fn sessions_added_one_by_one_append_to_the_index_and_all_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let count = 1500;
        {
            let store = Store::open(dir.path(), None).unwrap();
            store.load_all().unwrap();
            let header = index_lines(dir.path())[0].clone();
            for i in 0..count {
                store.save(&record(&format!("s{i}"))).await.unwrap();
                if i == 10 {
                    let lines = index_lines(dir.path());
                    assert_eq!(lines[0], header, "the index was rewritten for a new name");
                    assert_eq!(lines.len(), 2 + 11, "one line per new name");
                }
            }
            // Saving a session again adds nothing to the index.
            let before = index_lines(dir.path()).len();
            store.save(&record("s0")).await.unwrap();
            assert_eq!(index_lines(dir.path()).len(), before);
        }
        let store = Store::open(dir.path(), None).unwrap();
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), count);
        assert_eq!(store.index().as_ref().unwrap().names().len(), count);
        assert_eq!(index_lines(dir.path()).len(), 2, "compacted at load");
    }

    #[tokio::test]
    async fn removals_survive_reopening_and_leave_the_index_exact() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), None).unwrap();
            store.load_all().unwrap();
            for i in 0..6 {
                store.save(&record(&format!("s{i}"))).await.unwrap();
            }
            store.remove("s1").await.unwrap();
            store.remove("s4").await.unwrap();
            store.remove("never-there").await.unwrap();
        }
        let expected = ["s0", "s2", "s3", "s5"];
        let read = Index::read(dir.path(), &unlock(dir.path(), None, true).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            read.names().iter().map(|n| &**n).collect::<Vec<_>>(),
            expected
        );

        let store = Store::open(dir.path(), None).unwrap();
        let names: Vec<String> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, expected);
    }

    #[tokio::test]
    async fn a_torn_last_index_entry_is_skipped_and_the_store_opens_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), None).unwrap();
            store.load_all().unwrap();
            for name in ["a", "b", "c"] {
                store.save(&record(name)).await.unwrap();
            }
        }
        // The agent died while appending c's entry: its record is written.
        let path = dir.path().join(index::FILE);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();

        let store = Store::open(dir.path(), None).unwrap();
        let names: Vec<String> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        // The load wrote the index afresh: every name, no torn line.
        let index = store.index();
        assert_eq!(index.as_ref().unwrap().names().len(), 3);
        assert!(index.as_ref().unwrap().is_compact());
    }

    #[tokio::test]
    async fn a_damaged_index_entry_before_the_last_refuses_the_store_untouched() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), None).unwrap();
            store.load_all().unwrap();
            for name in ["a", "b", "c"] {
                store.save(&record(name)).await.unwrap();
            }
        }
        let mut lines = index_lines(dir.path());
        lines[3][10] ^= 0x01; // b's entry
        fs::write(dir.path().join(index::FILE), lines.concat()).unwrap();
        let before = files(dir.path());

        match Store::open(dir.path(), None) {
            Err(StoreError::DamagedIndex { detail, .. }) => {
                assert!(detail.contains("entry 2"), "{detail}")
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("a damaged index opened"),
        }
        assert_eq!(files(dir.path()), before, "the refusal changed the store");
    }

    #[tokio::test]
    async fn an_index_in_the_first_format_opens_and_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), None).unwrap();
            for name in ["a", "b", "c"] {
                store.save(&record(name)).await.unwrap();
            }
        }
        // What the previous version wrote: layout 1 and the sealed list,
        // nothing else.
        fs::write(dir.path().join("layout"), b"1").unwrap();
        let sealer = unlock(dir.path(), None, true).unwrap();
        let first = |names: &[&str]| {
            let plain = serde_json::to_vec(names).unwrap();
            sealer.seal(b"token-agent session index", &plain)
        };
        let path = dir.path().join(index::FILE);

        // It is read: a name it holds that the database lacks refuses.
        fs::write(&path, first(&["a", "b", "gone"])).unwrap();
        let refused = match Store::open(dir.path(), None) {
            Err(err) => err,
            Ok(store) => store
                .load_all()
                .map(drop)
                .expect_err("a missing session opened"),
        };
        assert!(
            matches!(&refused, StoreError::MissingSessions { names, .. } if names == "gone"),
            "{refused}"
        );

        assert_eq!(fs::read(dir.path().join("layout")).unwrap(), b"1");

        fs::write(&path, first(&["a", "b"])).unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        assert_eq!(fs::read(dir.path().join("layout")).unwrap(), b"1");
        assert_eq!(store.load_all().unwrap().len(), 3);
        assert!(index_lines(dir.path())[0].starts_with(b"token-agent session index 2 "));
        assert_eq!(fs::read(dir.path().join("layout")).unwrap(), b"2");
        store.save(&record("d")).await.unwrap();
        store.remove("a").await.unwrap();
        drop(store);

        let store = Store::open(dir.path(), None).unwrap();
        let names: Vec<String> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["b", "c", "d"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loading_reopens_the_database_every_time() {
        // The load closes sled and opens it again at once; sled's own
        // threads may still hold its file lock for a moment after the
        // close, and a reopen that lost that race failed the start.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        for i in 0..20 {
            store.save(&record(&format!("s{i}"))).await.unwrap();
            let loaded = store
                .load_all()
                .unwrap_or_else(|err| panic!("load {i}: {err}"));
            assert_eq!(loaded.len(), i + 1);
        }
        // Right after a write, sled's pool threads are likeliest to hold on.
        for i in 0..300 {
            store.save(&record("busy")).await.unwrap();
            store
                .release_cache()
                .unwrap_or_else(|err| panic!("reopen {i}: {err}"));
        }
    }

    #[tokio::test]
    async fn a_refresh_token_at_rest_stays_as_the_store_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let mut work = record("work");
        store.save(&work).await.unwrap();

        // A write of the record without its token (a state change, a
        // marker) keeps the stored one, rotated or not.
        work.tokens.refresh_token = RefreshToken::Held(Secret::new("rt-2"));
        store.save(&work).await.unwrap();
        let mut at_rest = work.clone();
        at_rest.tokens.refresh_token.put_to_rest();
        at_rest.generation = 7;
        store.save(&at_rest).await.unwrap();
        assert_eq!(
            store.refresh_token("work").unwrap().unwrap().expose(),
            "rt-2"
        );
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded[0].generation, 7);
        assert_eq!(loaded[0].tokens.refresh_token, RefreshToken::AtRest);

        // Cleared on purpose (a refused token), it stays cleared.
        work.tokens.refresh_token = RefreshToken::None;
        store.save(&work).await.unwrap();
        store.save(&at_rest).await.unwrap();
        assert_eq!(store.refresh_token("work").unwrap(), None);

        // A late write of a removed session does not bring it back.
        store.remove("work").await.unwrap();
        assert!(store.save(&at_rest).await.is_err());
        assert!(store.load_all().unwrap().is_empty());
    }

    #[test]
    fn a_refresh_token_at_rest_is_never_serialised_in_place_of_the_token() {
        let mut r = record("work");
        r.tokens.refresh_token.put_to_rest();
        assert!(serde_json::to_vec(&r).is_err());
    }

    #[test]
    fn sessions_of_one_client_share_one_copy_of_its_configuration() {
        let first = share_client((*record("a").client).clone());
        let second = share_client((*record("b").client).clone());
        assert!(Arc::ptr_eq(&first, &second));

        // Another secret is another client, whatever else is alike.
        let mut config = (*record("c").client).clone();
        config.client_secret = Some(Secret::new("other"));
        let other = share_client(config);
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(other.client_secret, Some(Secret::new("other")));

        // Once its sessions are gone, nothing keeps a configuration alive.
        let weak = Arc::downgrade(&other);
        drop(other);
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn a_load_of_many_batches_hands_over_every_record_or_fails_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let (_db, tree) = store.sled().unwrap();
        let count = LOAD_BATCH * 3 + 7;
        for i in 0..count {
            let mut r = record(&format!("s{i:05}"));
            r.generation = i as u64;
            tree.insert(r.name.as_bytes(), store.seal_record(&r).unwrap())
                .unwrap();
        }
        // The load closes and reopens sled: no handle may stay open.
        drop((_db, tree));
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), count);
        assert!(loaded
            .iter()
            .enumerate()
            .all(|(i, r)| *r.name == format!("s{i:05}") && r.generation == i as u64));

        // One record that does not open, deep in a later batch, fails it all.
        let (_db, tree) = store.sled().unwrap();
        tree.insert("s01200", b"not a sealed record".as_slice())
            .unwrap();
        drop((_db, tree));
        match store.load_all() {
            Err(StoreError::BadRecord { name, .. }) => assert_eq!(name, "s01200"),
            other => panic!(
                "expected the bad record named, got {:?}",
                other.map(|r| r.len())
            ),
        }
    }

    /// The index's names are taken from the loaded records, so a record
    /// must name the key it is stored under; one that does not is refused
    /// by name, and the store is not loaded with a wrong index.
    #[test]
    fn a_record_stored_under_another_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let (db, tree) = store.sled().unwrap();
        let plain = serde_json::to_vec(&record("impostor")).unwrap();
        let sealed = store.sealer.seal(b"work", &plain);
        tree.insert("work", sealed).unwrap();
        drop((db, tree));

        match store.load_all() {
            Err(StoreError::BadRecord { name, detail }) => {
                assert_eq!(name, "work");
                assert!(
                    detail.contains("not the name it is stored under"),
                    "{detail}"
                );
            }
            other => panic!(
                "expected the record refused, got {:?}",
                other.map(|r| r.len())
            ),
        }
    }

    #[tokio::test]
    async fn a_clean_close_is_recorded_and_the_record_used_once() {
        let dir = tempfile::tempdir().unwrap();
        let record_path = dir.path().join(CLEAN_STOP_FILE);
        {
            let store = Store::open(dir.path(), None).unwrap();
            store.save(&record("work")).await.unwrap();
            store.close().await.unwrap();
            assert!(
                store.save(&record("late")).await.is_err(),
                "a write after close must fail, not reopen sled behind the record"
            );
        }
        let mode = fs::metadata(&record_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let store = Store::open(dir.path(), None).unwrap();
        assert!(!record_path.exists(), "the record describes one stop only");
        let records = store.load_all().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(&*records[0].name, "work");
    }

    #[tokio::test]
    async fn a_record_that_no_longer_matches_means_the_full_check() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), None).unwrap();
            store.save(&record("work")).await.unwrap();
            store.close().await.unwrap();
        }
        let stopped = read_clean_stop(dir.path()).unwrap();
        assert_eq!(stopped, fingerprint(&dir.path().join("sled")).unwrap());

        // Any file of the database changed since: the record says so.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let conf = dir.path().join("sled/conf");
        let bytes = fs::read(&conf).unwrap();
        fs::write(&conf, bytes).unwrap();
        assert_ne!(stopped, fingerprint(&dir.path().join("sled")).unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_concurrent_saves_all_complete() {
        // sled's flushes share a small thread pool with its log writes; a
        // burst of concurrent flushes used to take every thread and hang.
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path(), None).unwrap());
        let saves: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    for round in 0..20 {
                        let mut r = record(&format!("s{i}"));
                        r.generation = round;
                        store.save(&r).await.unwrap();
                    }
                })
            })
            .collect();
        let all = futures_util::future::join_all(saves);
        let finished = tokio::time::timeout(std::time::Duration::from_secs(120), all).await;
        assert!(finished.is_ok(), "saves hung");
        assert_eq!(store.load_all().unwrap().len(), 64);
    }

    #[test]
    fn a_second_open_of_the_same_store_names_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), None).unwrap();
        let second = Store::open(dir.path(), None);
        match second {
            Err(StoreError::Locked { pid, .. }) => {
                assert_eq!(pid, std::process::id().to_string())
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("second open succeeded"),
        }
    }

    #[test]
    fn the_store_folder_is_owner_only() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("store");
        let _store = Store::open(&dir, None).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    /// The compact optional number reads and writes exactly what an
    /// `Option<u64>` did, so stores written before it open unchanged.
    #[test]
    fn an_optional_number_is_stored_as_before() {
        for value in [None, Some(0), Some(1_700_000_000_000), Some(u64::MAX - 1)] {
            let compact = OptU64::from(value);
            let json = serde_json::to_string(&compact).unwrap();
            assert_eq!(json, serde_json::to_string(&value).unwrap());
            assert_eq!(serde_json::from_str::<OptU64>(&json).unwrap().get(), value);
        }
        // The one value it cannot hold means "never" either way.
        assert_eq!(OptU64::from(Some(u64::MAX)).get(), Some(u64::MAX - 1));

        let mut stored = serde_json::to_value(record("old")).unwrap();
        let fields = stored.as_object_mut().unwrap();
        fields.remove("remove_at");
        fields.remove("next_refresh_at");
        fields.insert("idle_timeout_secs".into(), serde_json::json!(3600));
        let read: SessionRecord = serde_json::from_value(stored).unwrap();
        assert_eq!(read.remove_at.get(), None);
        assert_eq!(read.next_refresh_at.get(), None);
        assert_eq!(read.idle_timeout_secs.get(), Some(3600));
    }

    #[tokio::test]
    async fn no_secret_appears_in_plain_text_in_the_store_files() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), None).unwrap();
            let mut r = record("work");
            r.tokens.refresh_token = RefreshToken::Held(Secret::new("rt-plaintext-canary"));
            r.tokens.access_token = Some(PackedToken::new(&Secret::new("at-plaintext-canary")));
            Arc::make_mut(&mut r.client).client_secret = Some(Secret::new("cs-plaintext-canary"));
            store.save(&r).await.unwrap();
        }
        for entry in walk(dir.path()) {
            let bytes = fs::read(&entry).unwrap();
            for canary in [&b"plaintext-canary"[..], b"id.example"] {
                assert!(
                    !bytes.windows(canary.len()).any(|w| w == canary),
                    "{} holds plain text",
                    entry.display()
                );
            }
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    #[tokio::test]
    async fn a_store_opened_with_another_key_fails_and_is_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), None).unwrap();
            store.save(&record("work")).await.unwrap();
        }
        let other_key = dir.path().join("other.key");
        fs::write(&other_key, [9u8; 32]).unwrap();
        let before = fs::read(dir.path().join("key")).unwrap();

        match Store::open(dir.path(), Some(&other_key)) {
            Err(StoreError::WrongKey { source_name, .. }) => {
                assert!(source_name.contains("other.key"))
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("opened with the wrong key"),
        }

        // The right key still opens everything.
        assert_eq!(fs::read(dir.path().join("key")).unwrap(), before);
        let store = Store::open(dir.path(), None).unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_lost_key_file_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), None).unwrap();
            store.save(&record("work")).await.unwrap();
        }
        fs::remove_file(dir.path().join("key")).unwrap();
        assert!(matches!(
            Store::open(dir.path(), None),
            Err(StoreError::MissingKey { .. })
        ));
        assert!(!dir.path().join("key").exists());
    }

    #[test]
    fn a_newer_layout_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("layout"), b"99").unwrap();
        assert!(matches!(
            Store::open(dir.path(), None),
            Err(StoreError::NewerLayout { .. })
        ));
        assert_eq!(fs::read(dir.path().join("layout")).unwrap(), b"99");
    }
}
