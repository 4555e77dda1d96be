//! Filling a store with sessions quickly.
//!
//! `Store::save` writes one record and flushes, and rewrites the session
//! index whenever a name is new: filling 100,000 sessions through it takes
//! hours (see BENCHMARKS.md). So the filler creates the store through the
//! public `Store::open`, takes its key through the public `Sealer`, and
//! writes the sealed records straight into sled's `sessions` tree in
//! batches, exactly as `Store::save` lays them out (key: the session name;
//! value: the JSON record sealed with the name as associated data). The
//! index is left out, as in a store from before the index existed; the
//! agent writes it at its first start. If the store's layout changes, the
//! agent refuses the filled store at start-up and the bench says so.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use token_agent::packed_token::PackedToken;
use token_agent::store::SessionRecord;
use token_agent_client::proto::Secret;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn session_name(i: usize) -> String {
    format!("session-{i:06}")
}

/// The refresh token a filled session starts with; the fake provider reads
/// the session's number back from it.
pub fn first_refresh_token(i: usize) -> String {
    format!("rt-{i}-0")
}

/// A token of about `len` bytes shaped as a provider such as Keycloak
/// issues one: a JWT, three base64url parts (a header, claims, an RS256
/// signature) of pseudo-random bytes, different per `seed`. Like a real one,
/// each part is canonical base64url, which is what the agent packs in
/// memory (`token_agent::packed_token`); an opaque token of other
/// characters would be held as text.
pub fn token_of_len(len: usize, seed: usize) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    let mut state = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut random_bytes = |count: usize| -> Vec<u8> {
        (0..count)
            .map(|_| {
                // xorshift64: cheap, deterministic, different per session.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };

    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"bench"}"#);
    let text_budget = len.saturating_sub(header.len() + 2);
    // A third of the text for the signature (an RS256 one is 342 chars),
    // the rest for the claims; 4 characters for every 3 bytes.
    let signature_bytes = (text_budget / 3 * 3 / 4).min(256);
    let signature = URL_SAFE_NO_PAD.encode(random_bytes(signature_bytes));
    let claims_chars = text_budget.saturating_sub(signature.len());
    let claims = URL_SAFE_NO_PAD.encode(random_bytes(claims_chars * 3 / 4));
    format!("{header}.{claims}.{signature}")
}

/// What the filled sessions look like.
pub struct Fill {
    pub sessions: usize,
    pub access_token_bytes: usize,
    pub refresh_token_bytes: usize,
    /// Where the sessions refresh.
    pub token_endpoint: String,
    /// When session `i` is next due (Unix ms); `None` leaves it unplanned.
    pub due: Box<dyn Fn(usize) -> Option<u64> + Send + Sync>,
    /// When every access token expires (Unix ms).
    pub access_expires_at: u64,
}

impl Fill {
    /// Sessions with tokens valid for a day and nothing due for 20 hours:
    /// a store at rest.
    pub fn at_rest(sessions: usize, access_token_bytes: usize) -> Fill {
        let now = now_ms();
        Fill {
            sessions,
            access_token_bytes,
            refresh_token_bytes: (access_token_bytes / 2).max(32),
            token_endpoint: "http://127.0.0.1:9/token".into(),
            due: Box::new(move |i| Some(now + 20 * 3_600_000 + (i as u64 % 3_600_000))),
            access_expires_at: now + 24 * 3_600_000,
        }
    }
}

/// A record in the shape the agent writes after a successful refresh. Built
/// from JSON so that fields the store adds later with defaults need no change
/// here.
fn template(fill: &Fill, now: u64) -> anyhow::Result<SessionRecord> {
    let record = serde_json::json!({
        "name": "template",
        "client": {
            "issuer": "http://127.0.0.1",
            "token_endpoint": fill.token_endpoint,
            "client_id": "bench-client",
            "client_secret": "bench-secret",
            "client_auth": "basic",
            "scopes": [],
        },
        "tokens": {
            "access_token": null,
            "obtained_at": now,
            "access_expires_at": fill.access_expires_at,
            "expiry_source": "provider",
            "provider_lifetime_ms": fill.access_expires_at.saturating_sub(now),
            "refresh_token": null,
            "refresh_expires_at": null,
        },
        "generation": 0,
        "refresh_in_flight": null,
        "interrupted": false,
        "state": {"state": "fresh", "since": now, "reason": null, "provider_error": null},
        "last_refresh_at": now,
        "consecutive_failures": 0,
        "next_refresh_at": null,
        "idle_timeout_secs": null,
        "created_at": now,
    });
    serde_json::from_value(record)
        .context("the store's record shape changed; update bench/src/populate.rs")
}

/// Session `i` of `fill`, made from `template`.
fn session_record(template: &SessionRecord, fill: &Fill, i: usize) -> SessionRecord {
    let mut record = template.clone();
    record.name = session_name(i).into();
    record.tokens.access_token = Some(PackedToken::new(&Secret::new(token_of_len(
        fill.access_token_bytes,
        i,
    ))));
    let mut refresh_token = first_refresh_token(i);
    if refresh_token.len() < fill.refresh_token_bytes {
        refresh_token.push('-');
        refresh_token.push_str(&token_of_len(
            fill.refresh_token_bytes - refresh_token.len(),
            i + 1,
        ));
    }
    record.tokens.refresh_token = Some(Secret::new(refresh_token)).into();
    record.next_refresh_at = (fill.due)(i).into();
    record
}

/// What [`save_one_by_one`] measured.
pub struct Saved {
    /// Sessions saved (fewer than asked when it gave up).
    pub saved: usize,
    pub took: Duration,
    /// Each save's own time.
    pub samples: crate::stats::Samples,
    /// The size of `sessions.index` at the end.
    pub index_bytes: u64,
    /// Reopening the filled store and loading it (`Store::open`,
    /// `load_all`), as the agent starts.
    pub reopen: Duration,
}

/// Adds `fill.sessions` new sessions to a new store at `dir` one at a time
/// through `Store::save`, as imports do, each save awaited before the next;
/// stops early once `give_up` has passed.
pub fn save_one_by_one(dir: &Path, fill: Fill, give_up: Duration) -> anyhow::Result<Saved> {
    use token_agent::store::Store;
    anyhow::ensure!(
        !dir.join("sled").exists(),
        "{} already holds a store",
        dir.display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let template = template(&fill, now_ms())?;
    let store = Store::open(dir, None)?;
    store.load_all()?;
    let mut samples = crate::stats::Samples::with_capacity(fill.sessions);
    let started = Instant::now();
    let mut saved = 0;
    runtime.block_on(async {
        for i in 0..fill.sessions {
            let record = session_record(&template, &fill, i);
            let one = Instant::now();
            store.save(&record).await?;
            samples.push(one.elapsed());
            saved += 1;
            if started.elapsed() > give_up {
                break;
            }
        }
        anyhow::Ok(())
    })?;
    let took = started.elapsed();
    drop(store);
    let index_bytes = std::fs::metadata(dir.join("sessions.index"))
        .map(|m| m.len())
        .unwrap_or(0);

    // sled lets go of its file lock once its background work on the
    // dropped store ends; wait for that.
    let reopened = Instant::now();
    let mut tries = 0;
    let store = loop {
        match Store::open(dir, None) {
            Ok(store) => break store,
            Err(_) if tries < 200 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => return Err(err.into()),
        }
    };
    let loaded = store.load_all()?.len();
    let reopen = reopened.elapsed();
    anyhow::ensure!(loaded == saved, "saved {saved} sessions, reopened {loaded}");
    Ok(Saved {
        saved,
        took,
        samples,
        index_bytes,
        reopen,
    })
}

/// Writes `fill.sessions` records into a new store at `dir` and returns
/// how long that took.
pub fn fill_store(dir: &Path, fill: Fill) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        !dir.join("sled").exists(),
        "{} already holds a store",
        dir.display()
    );
    let started = Instant::now();
    // The folder, its layout file, key and key check, and an empty sled
    // database, as the agent creates them.
    drop(token_agent::store::Store::open(dir, None)?);
    let sealer = token_agent::seal::Sealer::find_key(dir, None, false)?
        .context("the new store has no key")?;
    // sled lets go of its file lock once its background work on the
    // dropped store ends; wait for that.
    let db = {
        let mut tries = 0;
        loop {
            match sled::Config::new().path(dir.join("sled")).open() {
                Ok(db) => break db,
                Err(err) if tries < 200 => {
                    tries += 1;
                    let _ = err;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(err) => return Err(err.into()),
            }
        }
    };
    let tree = db.open_tree("sessions")?;

    let now = now_ms();
    let template = template(&fill, now)?;
    let mut batch = sled::Batch::default();
    for i in 0..fill.sessions {
        let record = session_record(&template, &fill, i);
        let plain = serde_json::to_vec(&record)?;
        batch.insert(
            record.name.as_bytes(),
            sealer.seal(record.name.as_bytes(), &plain),
        );
        if (i + 1) % 1_000 == 0 {
            tree.apply_batch(std::mem::take(&mut batch))?;
        }
    }
    tree.apply_batch(batch)?;
    db.flush()?;
    drop(tree);
    drop(db);
    Ok(started.elapsed())
}
