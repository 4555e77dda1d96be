//! The store's files damaged, and the disk full.
//!
//! A damaged store must stop the daemon at start with a message that names
//! the store, and must be left exactly as it was found: a "repair" that
//! drops records would lose sessions silently. A full disk must make a
//! refresh fail loudly, never be acknowledged, and lose nothing: the
//! rotated token is held and written once there is room again.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{session, test_timing, Daemon, FakeIdp, Reply};
use token_agent::config::Config;

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Every file's bytes, by path relative to `dir`, except `lock` (which
/// holds the pid of whoever holds the store, and is not data).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "lock"))
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            (rel, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn config(dir: &Path) -> Config {
    common::config(dir, test_timing())
}

/// A store with three sessions, written by a daemon that then stopped.
async fn a_store_with_sessions(fake: &FakeIdp) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), test_timing()).await;
    for i in 0..3 {
        fake.then(Reply::tokens(
            &format!("at-{i}"),
            Some(&format!("rt-{i}-1")),
            Some(300),
        ));
        daemon
            .import(session(&format!("s{i}"), fake, &format!("rt-{i}-0")))
            .await
            .unwrap();
    }
    daemon.stop().await;
    dir
}

/// A named way to damage a store folder.
type Damage = (String, Box<dyn Fn(&Path)>);

/// Ways a store's files get damaged: a torn copy, a disk error, an editor.
fn damages(store: &Path) -> Vec<Damage> {
    let mut cases: Vec<Damage> = Vec::new();
    for file in files_under(store) {
        let rel = file.strip_prefix(store).unwrap().to_path_buf();
        let name = rel.display().to_string();
        if name == "lock" || name == "layout" {
            continue;
        }
        let len = std::fs::metadata(&file).unwrap().len();
        let (r1, r2, r3) = (rel.clone(), rel.clone(), rel.clone());
        cases.push((
            format!("{name} truncated to nothing"),
            Box::new(move |dir: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join(&r1))
                    .unwrap()
                    .set_len(0)
                    .unwrap()
            }),
        ));
        if len > 1 {
            cases.push((
                format!("{name} truncated to half"),
                Box::new(move |dir: &Path| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(dir.join(&r2))
                        .unwrap()
                        .set_len(len / 2)
                        .unwrap()
                }),
            ));
        }
        cases.push((
            format!("{name} overwritten in the middle"),
            Box::new(move |dir: &Path| {
                let path = dir.join(&r3);
                let mut bytes = std::fs::read(&path).unwrap();
                let mid = bytes.len() / 2;
                let end = (mid + 64).min(bytes.len());
                for b in &mut bytes[mid..end] {
                    *b ^= 0x5a;
                }
                std::fs::write(&path, bytes).unwrap();
            }),
        ));
    }
    cases
}

/// Every damage to every file of a store: the daemon either refuses to
/// start, naming the store, and leaves every byte as it was, or starts
/// with every session intact. It never starts with sessions missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_and_left_untouched() {
    let fake = FakeIdp::start().await;
    let original = a_store_with_sessions(&fake).await;
    let store = original.path().join("store");

    let mut refused = 0;
    let mut harmless = Vec::new();
    for (what, damage) in damages(&store) {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&store, &dir.path().join("store"));
        damage(&dir.path().join("store"));
        if refused_untouched(dir.path(), &what).await {
            refused += 1;
        } else {
            harmless.push(what);
        }
    }
    println!("refused {refused} damaged stores; started intact despite: {harmless:?}");
    assert!(refused > 0);
}

/// The same damage done in place, to a store whose daemon stopped cleanly
/// and left its clean-stop record: a start that trusted the record without
/// looking would open the damaged files directly, and sled's repair would
/// drop what it cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_after_a_clean_stop_is_still_refused_and_left_untouched() {
    let fake = FakeIdp::start().await;
    let original = a_store_with_sessions(&fake).await;
    let store = original.path().join("store");

    let mut refused = 0;
    for (what, _) in damages(&store) {
        if !what.starts_with("sled/") {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("store");
        copy_dir(&store, &copy);
        let running = token_agent::start(config(dir.path())).await.unwrap();
        running.shutdown.cancel();
        running.stopped().await.unwrap();
        assert!(
            copy.join("clean-stop").exists(),
            "a clean stop leaves its record"
        );
        // sled may have replaced a file (a snapshot) in that run.
        let Some((_, damage)) = damages(&copy).into_iter().find(|(name, _)| *name == what) else {
            continue;
        };

        // File times tick in steps of a few milliseconds: damage made in
        // the same step as the stop's last write would look untouched.
        tokio::time::sleep(Duration::from_millis(50)).await;
        damage(&copy);
        if refused_untouched(dir.path(), &what).await {
            refused += 1;
        }
    }
    assert!(refused > 0);
}

/// Starts a daemon on the damaged store under `dir`. It must either refuse,
/// naming the store and changing no byte (true), or start with every
/// session intact (false).
async fn refused_untouched(dir: &Path, what: &str) -> bool {
    let before = snapshot(&dir.join("store"));
    match token_agent::start(config(dir)).await {
        Err(err) => {
            let message = format!("{err:#}");
            assert!(
                message.contains("store") || message.contains("session"),
                "{what}: the message does not say what is wrong: {message}"
            );
            let after = snapshot(&dir.join("store"));
            let changed: Vec<_> = after
                .keys()
                .chain(before.keys())
                .filter(|k| before.get(*k) != after.get(*k))
                .collect();
            assert!(
                changed.is_empty(),
                "{what}: the refusal changed {changed:?}"
            );
            println!("{what}: refused: {message}");
            true
        }
        Ok(running) => {
            let names: Vec<String> = running
                .agent
                .sessions
                .all()
                .iter()
                .map(|s| s.name.to_string())
                .collect();
            running.shutdown.cancel();
            running.stopped().await.unwrap();
            assert_eq!(
                names,
                ["s0", "s1", "s2"],
                "{what}: started with sessions missing"
            );
            false
        }
    }
}

/// A size-limited tmpfs mounted at `dir`, unmounted when dropped; `None`
/// where mounting is not allowed (not root).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system holding `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while file.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while file.write_all(&small).is_ok() {}
    while file.write_all(&[0u8]).is_ok() {}
    let _ = file.sync_all();
    path
}

/// The disk fills while a session is due: the provider rotates the refresh
/// token, the store cannot take the answer, and the refresh is not
/// acknowledged (`store_failed`), the error is logged, nothing from the
/// answer is served. Once there is room again the held answer is written,
/// never the spent token presented again, and it survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_refresh_loudly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_tmpfs) = Tmpfs::mount(&dir.path().join("disk"), "4m") else {
        println!("SKIPPED: a_full_disk_...: mounting a tmpfs needs root");
        return;
    };
    let fake = FakeIdp::start().await;
    let mut config = config(dir.path());
    config.store_dir = dir.path().join("disk/store");
    let daemon = Daemon::start_with(config.clone()).await;

    fake.then(Reply::tokens("at-1", Some("rt-2"), Some(300)));
    daemon.import(session("s1", &fake, "rt-1")).await.unwrap();

    // sled writes into segments it has already laid out, so the first
    // writes after the disk fills may still land; keep refreshing until the
    // store refuses one. Each answer rotates. The write that fails is either
    // the in-flight marker (then nothing was sent: the disk is emptied, one
    // refresh goes through, and the disk is filled again) or the answer
    // itself, the case this test is after.
    let mut generation = 2;
    let mut filler = fill(&dir.path().join("disk"));
    let mut markers_refused = 0;
    loop {
        let sent_before = fake.presented().len();
        fake.then(Reply::tokens(
            &format!("at-{generation}"),
            Some(&format!("rt-{}", generation + 1)),
            Some(300),
        ));
        let reply = match daemon.refresh("s1").await {
            Ok(_) => {
                generation += 1;
                assert!(generation < 5_000, "the store never ran out of room");
                continue;
            }
            Err(token_agent_client::ClientError::Agent(reply)) => reply,
            Err(other) => panic!("{other:?}"),
        };
        assert_eq!(
            reply.code,
            token_agent_client::proto::ErrorCode::StoreFailed,
            "{}",
            reply.message
        );
        if fake.presented().len() > sent_before || markers_refused == 10 {
            break;
        }

        // The marker was refused: no refresh token left the agent, and the
        // token it holds is still good.
        markers_refused += 1;
        assert_eq!(daemon.token("s1").await, format!("at-{}", generation - 1));
        fake.clear_script();
        std::fs::remove_file(&filler).unwrap();
        fake.then(Reply::tokens(
            &format!("at-{generation}"),
            Some(&format!("rt-{}", generation + 1)),
            Some(300),
        ));
        daemon
            .refresh("s1")
            .await
            .expect("a refresh once there is room");
        assert_eq!(
            fake.presented().last().unwrap(),
            &format!("rt-{generation}")
        );
        generation += 1;
        filler = fill(&dir.path().join("disk"));
    }
    println!(
        "the store refused a write after {} refreshes on a full disk ({markers_refused} refused markers first)",
        generation - 2
    );
    if fake.presented().last() != Some(&format!("rt-{generation}")) {
        println!("only markers were refused in 10 rounds; the held-answer path was not reached");
        std::fs::remove_file(&filler).unwrap();
        daemon.stop().await;
        return;
    }
    let presented = fake.presented();
    // The stored token is still served; the unsaved one is not.
    let stored = format!("at-{}", generation - 1);
    assert_eq!(daemon.token("s1").await, stored);

    std::fs::remove_file(&filler).unwrap();
    let held = format!("at-{generation}");
    common::wait_until(
        "the held answer is written",
        Duration::from_secs(10),
        || async {
            daemon
                .get("s1")
                .await
                .is_ok_and(|t| t.access_token.expose() == held)
        },
    )
    .await;
    assert_eq!(
        fake.presented(),
        presented,
        "the spent token was presented again"
    );
    daemon.stop().await;

    // What was written survives a restart: the next refresh presents the
    // token from the held answer.
    let daemon = Daemon::start_with(config.clone()).await;
    assert_eq!(daemon.token("s1").await, held);
    fake.then(Reply::tokens("at-last", Some("rt-last"), Some(300)));
    daemon.refresh("s1").await.unwrap();
    assert_eq!(
        fake.presented().last().unwrap(),
        &format!("rt-{}", generation + 1)
    );
    daemon.stop().await;
}
