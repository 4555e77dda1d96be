//! `sessions.index`: the sealed list of every session name the database
//! holds, kept as a snapshot followed by a log of changes, so that a new
//! session or a removal appends one short line instead of rewriting the
//! whole list (issue 7: at 100,000 sessions the list is over 2 MB).
//!
//! The file is text, one item per line:
//!
//! ```text
//! token-agent session index 2 <epoch: 32 hex digits>
//! <snapshot: base64 of the sealed JSON list of names>
//! <entry 1: base64 of the sealed "+name" or "-name">
//! <entry 2> ...
//! ```
//!
//! The epoch is random, new with every snapshot. The snapshot is sealed
//! with the epoch as part of its associated data, and entry `n` with the
//! epoch and `n`: an entry opens only in its own place of its own file, so
//! no line can be moved, repeated, dropped from the middle or brought in
//! from another file (or another version of this one) without the lines
//! after it failing to open.
//!
//! An append is one write of the whole line, then `fdatasync`; appends
//! never overlap (the store holds the index's lock). So only the last line
//! can be incomplete, and only when the agent stopped during its append:
//! an append that was never acknowledged. Such a line is skipped, and safe
//! to skip because of the order of writes ([`super`]): a `+name` is
//! appended after its record was flushed, so the database holds that
//! record and the load writes the name back; a `-name` is appended before
//! its record is deleted, so the record is still there and the name simply
//! stays. A final line that does not open is therefore read as torn, with
//! a warning, whatever its bytes are (a crash can leave zeros where the
//! line was going). The cost: damage confined to exactly the last line
//! loses that one entry, so if the database lost the same session at the
//! same time, nothing would notice. Any other line that does not open,
//! and a header or snapshot that does not, refuses the store.
//!
//! The whole file is rewritten (a new file, flushed, renamed over the old
//! one, the folder flushed), with a new epoch and no entries, when the log
//! has grown past [`compact_after`] bytes, after an append failed (its
//! bytes may be on disk, part of a line), and at load when the file is not
//! compact: so appends always follow a whole line, and a torn line is
//! gone before the next one is written.
//!
//! The first format was the sealed JSON list alone, with no header (store
//! layout 1). It still opens, as a snapshot without entries, and is
//! rewritten in this format at the first load; the store's layout becomes 2
//! just before, so that an earlier agent refuses the store as newer rather
//! than calling this index damaged.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use super::StoreError;
use crate::seal::Sealer;

pub(super) const FILE: &str = "sessions.index";

/// The first line's start; the epoch follows.
const HEADER: &str = "token-agent session index 2 ";
const EPOCH_LEN: usize = 16;

/// The associated data of the first format's whole-file snapshot.
const FIRST_FORMAT_CONTEXT: &[u8] = b"token-agent session index";
const SNAPSHOT_CONTEXT: &[u8] = b"token-agent session index snapshot ";
const ENTRY_CONTEXT: &[u8] = b"token-agent session index entry ";

const ADD: u8 = b'+';
const REMOVE: u8 = b'-';

type Epoch = [u8; EPOCH_LEN];

/// The names in the index, and where the next change goes.
pub(super) struct Index {
    /// Shared with the sessions' own names where the store could (see
    /// [`Index::adopt`]): 100,000 names are not held twice.
    names: BTreeSet<Arc<str>>,
    /// The file's epoch and entry count, when the next change may be
    /// appended to it; `None` when the file must be rewritten first (an
    /// earlier format, a torn last line, a failed append).
    log: Option<Log>,
}

struct Log {
    epoch: Epoch,
    entries: u64,
    /// The size of the header and snapshot lines, and of the entries.
    snapshot_bytes: u64,
    entry_bytes: u64,
    /// Opened at the first append.
    file: Option<File>,
}

/// The bytes of entries after which the file is rewritten: as many as the
/// snapshot holds, so a rewrite of S bytes comes after some S bytes of
/// appends (O(1) per change, amortised) and the file stays under twice its
/// compact size; and 64 KiB (some 900 entries) at least, so a small index
/// is not rewritten every few changes.
pub(super) fn compact_after(snapshot_bytes: u64) -> u64 {
    snapshot_bytes.max(64 * 1024)
}

impl Index {
    /// The index in `dir`, `None` if there is none. Damage is refused
    /// (see the module docs); nothing is written.
    pub(super) fn read(dir: &Path, sealer: &Sealer) -> Result<Option<Index>, StoreError> {
        let path = dir.join(FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Open { path, source }),
        };
        let damaged = |detail: String| StoreError::DamagedIndex {
            path: dir.to_path_buf(),
            detail,
        };
        if !bytes.starts_with(HEADER.as_bytes()) {
            let plain = sealer
                .open(FIRST_FORMAT_CONTEXT, &bytes)
                .map_err(|_| damaged("it opens in neither format".into()))?;
            let names: Vec<String> = serde_json::from_slice(&plain)
                .map_err(|_| damaged("its list of names does not parse".into()))?;
            return Ok(Some(Index {
                names: names.into_iter().map(Arc::from).collect(),
                log: None,
            }));
        }
        parse(&bytes, sealer).map(Some).map_err(damaged)
    }

    /// Writes a new index holding `names`.
    pub(super) fn create(
        dir: &Path,
        sealer: &Sealer,
        names: BTreeSet<Arc<str>>,
    ) -> Result<Index, StoreError> {
        let mut index = Index { names, log: None };
        index.rewrite(dir, sealer)?;
        Ok(index)
    }

    pub(super) fn names(&self) -> &BTreeSet<Arc<str>> {
        &self.names
    }

    /// Holds `names`, the very names the index holds already, in their
    /// place: the loaded sessions' own copies, shared instead of doubled.
    pub(super) fn adopt(&mut self, names: BTreeSet<Arc<str>>) {
        debug_assert!(names == self.names, "adopted names are the same names");
        self.names = names;
    }

    /// Whether the file is a snapshot alone, in the current format.
    pub(super) fn is_compact(&self) -> bool {
        self.log.as_ref().is_some_and(|log| log.entries == 0)
    }

    /// Replaces the names with `names` and rewrites the file.
    pub(super) fn replace(
        &mut self,
        dir: &Path,
        sealer: &Sealer,
        names: BTreeSet<Arc<str>>,
    ) -> Result<(), StoreError> {
        let old = std::mem::replace(&mut self.names, names);
        self.rewrite(dir, sealer).inspect_err(|_| self.names = old)
    }

    /// Adds `name` and returns once that is on disk.
    pub(super) fn add(
        &mut self,
        dir: &Path,
        sealer: &Sealer,
        name: &Arc<str>,
    ) -> Result<(), StoreError> {
        if self.names.contains(name) {
            return Ok(());
        }
        self.change(dir, sealer, ADD, name)
    }

    /// Removes `name` and returns once that is on disk.
    pub(super) fn remove(
        &mut self,
        dir: &Path,
        sealer: &Sealer,
        name: &str,
    ) -> Result<(), StoreError> {
        if !self.names.contains(name) {
            return Ok(());
        }
        self.change(dir, sealer, REMOVE, &Arc::from(name))
    }

    /// Appends the change, or rewrites the file with it when that is due;
    /// the names in memory change only once the file has.
    fn change(
        &mut self,
        dir: &Path,
        sealer: &Sealer,
        op: u8,
        name: &Arc<str>,
    ) -> Result<(), StoreError> {
        let due = self
            .log
            .as_ref()
            .is_none_or(|log| log.entry_bytes >= compact_after(log.snapshot_bytes));
        if due {
            self.apply(op, name);
            return self
                .rewrite(dir, sealer)
                .inspect_err(|_| self.undo(op, name));
        }

        let path = dir.join(FILE);
        let log = self.log.as_mut().expect("checked above");
        match log.append(&path, sealer, op, name) {
            Ok(()) => {
                self.apply(op, name);
                Ok(())
            }
            Err(source) => {
                // Part of the line may be on disk: no append may follow it.
                self.log = None;
                Err(StoreError::WriteIndex { path, source })
            }
        }
    }

    fn apply(&mut self, op: u8, name: &Arc<str>) {
        if op == ADD {
            self.names.insert(name.clone());
        } else {
            self.names.remove(name);
        }
    }

    fn undo(&mut self, op: u8, name: &Arc<str>) {
        self.apply(if op == ADD { REMOVE } else { ADD }, name);
    }

    /// Replaces the file with a snapshot of the names in one step: a new
    /// file, flushed, renamed over the old one, and the folder flushed.
    fn rewrite(&mut self, dir: &Path, sealer: &Sealer) -> Result<(), StoreError> {
        self.log = None;
        let path = dir.join(FILE);
        let temporary = dir.join(format!("{FILE}.new"));
        let epoch: Epoch = rand::random();
        let plain = serde_json::to_vec(&self.names).expect("a set of strings serialises");
        let sealed = sealer.seal(&snapshot_context(&epoch), &plain);
        let mut text = format!("{HEADER}{}\n", hex(&epoch));
        BASE64.encode_string(&sealed, &mut text);
        text.push('\n');

        let write = || -> std::io::Result<()> {
            super::upgrade_layout(dir)?;
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&temporary, &path)?;
            File::open(dir)?.sync_all()
        };
        write().map_err(|source| StoreError::WriteIndex { path, source })?;
        self.log = Some(Log {
            epoch,
            entries: 0,
            snapshot_bytes: text.len() as u64,
            entry_bytes: 0,
            file: None,
        });
        Ok(())
    }
}

impl Log {
    /// Appends one sealed entry as a line and flushes it.
    fn append(&mut self, path: &Path, sealer: &Sealer, op: u8, name: &str) -> std::io::Result<()> {
        let number = self.entries + 1;
        let mut plain = Vec::with_capacity(1 + name.len());
        plain.push(op);
        plain.extend_from_slice(name.as_bytes());
        let sealed = sealer.seal(&entry_context(&self.epoch, number), &plain);
        let mut line = BASE64.encode(&sealed);
        line.push('\n');

        let file = match &mut self.file {
            Some(file) => file,
            empty => empty.insert(OpenOptions::new().append(true).open(path)?),
        };
        file.write_all(line.as_bytes())?;
        file.sync_data()?;
        self.entries = number;
        self.entry_bytes += line.len() as u64;
        Ok(())
    }
}

/// Reads the current format; the error says where it is damaged.
fn parse(bytes: &[u8], sealer: &Sealer) -> Result<Index, String> {
    let ends_whole = bytes.ends_with(b"\n");
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if ends_whole {
        lines.pop();
    }
    let [header, snapshot, entries @ ..] = lines.as_slice() else {
        return Err("it ends before its snapshot".into());
    };
    let epoch = header
        .strip_prefix(HEADER.as_bytes())
        .and_then(unhex)
        .ok_or("its header is damaged")?;
    if entries.is_empty() && !ends_whole {
        return Err("its snapshot is incomplete".into());
    }
    let plain = open_line(sealer, &snapshot_context(&epoch), snapshot)
        .ok_or("its snapshot does not open")?;
    // Parsed as a list and built in one go: a set grown by sorted inserts
    // leaves its nodes half full, twice the memory.
    let names: Vec<String> =
        serde_json::from_slice(&plain).map_err(|_| "its snapshot does not parse")?;
    let mut names: BTreeSet<Arc<str>> = names.into_iter().map(Arc::from).collect();

    let mut torn = false;
    for (i, line) in entries.iter().enumerate() {
        let number = i as u64 + 1;
        let Some(plain) = open_line(sealer, &entry_context(&epoch, number), line) else {
            if i + 1 == entries.len() {
                // See the module docs: an append the agent stopped during.
                tracing::warn!(
                    entry = number,
                    "the session index ends in an incomplete entry; skipped"
                );
                torn = true;
                break;
            }
            return Err(format!("entry {number} of {} does not open", entries.len()));
        };
        let name = std::str::from_utf8(&plain[1..])
            .map_err(|_| format!("entry {number} is not a name"))?;
        match plain[0] {
            ADD => names.insert(Arc::from(name)),
            REMOVE => names.remove(name),
            _ => {
                return Err(format!(
                    "entry {number} is neither an addition nor a removal"
                ))
            }
        };
    }

    // Appends must follow a whole, good line; otherwise the next change
    // rewrites the file.
    let log = (ends_whole && !torn).then(|| Log {
        epoch,
        entries: entries.len() as u64,
        snapshot_bytes: (header.len() + snapshot.len() + 2) as u64,
        entry_bytes: entries.iter().map(|line| line.len() as u64 + 1).sum(),
        file: None,
    });
    Ok(Index { names, log })
}

/// The plaintext of one base64 line, if it decodes and opens and is not
/// empty.
fn open_line(sealer: &Sealer, context: &[u8], line: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let sealed = BASE64.decode(line).ok()?;
    let plain = sealer.open(context, &sealed).ok()?;
    (!plain.is_empty()).then_some(plain)
}

fn snapshot_context(epoch: &Epoch) -> Vec<u8> {
    [SNAPSHOT_CONTEXT, epoch].concat()
}

fn entry_context(epoch: &Epoch, number: u64) -> Vec<u8> {
    [ENTRY_CONTEXT, epoch, &number.to_be_bytes()].concat()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &[u8]) -> Option<Epoch> {
    let text = std::str::from_utf8(text).ok()?;
    if text.len() != 2 * EPOCH_LEN {
        return None;
    }
    let mut epoch = [0u8; EPOCH_LEN];
    for (i, byte) in epoch.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::KeySource;

    fn sealer() -> Sealer {
        Sealer::from_key(&[7; 32], KeySource::StoreFile("test".into()))
    }

    fn lines(dir: &Path) -> Vec<Vec<u8>> {
        let bytes = fs::read(dir.join(FILE)).unwrap();
        bytes
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn names(range: std::ops::Range<usize>) -> BTreeSet<Arc<str>> {
        range.map(|i| Arc::from(format!("s{i}"))).collect()
    }

    #[test]
    fn a_change_appends_one_line_and_keeps_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::create(dir.path(), &sealer(), names(0..3)).unwrap();
        let before = lines(dir.path());
        assert_eq!(before.len(), 2, "a header and a snapshot");

        index.add(dir.path(), &sealer(), &Arc::from("new")).unwrap();
        index.remove(dir.path(), &sealer(), "s1").unwrap();
        let after = lines(dir.path());
        assert_eq!(after.len(), 4);
        assert_eq!(after[..2], before[..], "the snapshot was rewritten");

        let read = Index::read(dir.path(), &sealer()).unwrap().unwrap();
        let mut expected = names(0..3);
        expected.insert("new".into());
        expected.remove("s1");
        assert_eq!(read.names(), &expected);
        assert!(!read.is_compact());
    }

    #[test]
    fn the_log_is_folded_into_a_new_snapshot_once_it_grows_and_keeps_every_name() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = sealer();
        let mut index = Index::create(dir.path(), &sealer, BTreeSet::new()).unwrap();
        let header = lines(dir.path())[0].clone();
        let mut expected = BTreeSet::new();
        for i in 0..2500 {
            let name = format!("s{i}");
            index
                .add(dir.path(), &sealer, &Arc::from(name.as_str()))
                .unwrap();
            expected.insert(Arc::<str>::from(name));
            if i % 3 == 0 {
                let gone = format!("s{}", i / 2);
                index.remove(dir.path(), &sealer, &gone).unwrap();
                expected.remove(gone.as_str());
            }
        }
        let now = lines(dir.path());
        assert_ne!(now[0], header, "never rewritten");
        let snapshot = (now[0].len() + now[1].len()) as u64;
        let log: u64 = now[2..].iter().map(|line| line.len() as u64).sum();
        assert!(
            log <= compact_after(snapshot) + now.last().unwrap().len() as u64,
            "{log} bytes of entries after a snapshot of {snapshot}"
        );
        assert_eq!(index.names(), &expected);
        let read = Index::read(dir.path(), &sealer).unwrap().unwrap();
        assert_eq!(read.names(), &expected);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_the_next_change_rewrites_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = sealer();
        let mut index = Index::create(dir.path(), &sealer, names(0..2)).unwrap();
        index.add(dir.path(), &sealer, &Arc::from("kept")).unwrap();
        index.add(dir.path(), &sealer, &Arc::from("torn")).unwrap();
        let full = fs::read(dir.path().join(FILE)).unwrap();

        // Cut anywhere inside the last line (a line missing only its
        // newline still opens), or the line replaced by zeros (what a crash
        // can leave of an extending write).
        let last = lines(dir.path()).last().unwrap().len();
        let mut cases: Vec<Vec<u8>> = (2..last)
            .map(|cut| full[..full.len() - cut].to_vec())
            .collect();
        let mut zeros = full.clone();
        let start = zeros.len() - last;
        zeros[start..].fill(0);
        cases.push(zeros);

        for case in cases {
            fs::write(dir.path().join(FILE), &case).unwrap();
            let mut read = Index::read(dir.path(), &sealer).unwrap().unwrap();
            let mut expected = names(0..2);
            expected.insert("kept".into());
            assert_eq!(read.names(), &expected);

            // No line may follow a torn one.
            read.add(dir.path(), &sealer, &Arc::from("after")).unwrap();
            assert_eq!(lines(dir.path()).len(), 2, "not rewritten");
            expected.insert("after".into());
            let again = Index::read(dir.path(), &sealer).unwrap().unwrap();
            assert_eq!(again.names(), &expected);
        }
    }

    #[test]
    fn damage_before_the_last_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = sealer();
        let mut index = Index::create(dir.path(), &sealer, names(0..2)).unwrap();
        for name in ["a", "b", "c"] {
            index.add(dir.path(), &sealer, &Arc::from(name)).unwrap();
        }
        let good = lines(dir.path());
        let refused = |lines: Vec<Vec<u8>>, what: &str| {
            fs::write(dir.path().join(FILE), lines.concat()).unwrap();
            match Index::read(dir.path(), &sealer) {
                Err(StoreError::DamagedIndex { .. }) => {}
                Err(other) => panic!("{what}: {other}"),
                Ok(_) => panic!("{what}: opened"),
            }
        };

        for line in 0..good.len() - 1 {
            let mut flipped = good.clone();
            flipped[line][5] ^= 0x01;
            refused(flipped, &format!("line {line} flipped"));
        }
        let mut dropped = good.clone();
        dropped.remove(2);
        refused(dropped, "an entry dropped");
        let mut swapped = good.clone();
        swapped.swap(2, 3);
        refused(swapped, "two entries swapped");
        let mut repeated = good.clone();
        repeated.insert(3, good[2].clone());
        refused(repeated, "an entry repeated");
        refused(good[..1].to_vec(), "the snapshot missing");
        let mut cut = good[..2].concat();
        cut.pop();
        refused(vec![cut], "the snapshot cut short");

        // A line from another index (the same names, another snapshot).
        let other = tempfile::tempdir().unwrap();
        let mut elsewhere = Index::create(other.path(), &sealer, names(0..2)).unwrap();
        for name in ["a", "b", "x"] {
            elsewhere
                .add(other.path(), &sealer, &Arc::from(name))
                .unwrap();
        }
        let mut foreign = good.clone();
        foreign[3] = lines(other.path())[3].clone();
        refused(foreign, "an entry from another index");
    }

    #[test]
    fn the_first_format_opens_and_is_not_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = sealer();
        let plain = serde_json::to_vec(&names(0..3)).unwrap();
        let first = sealer.seal(FIRST_FORMAT_CONTEXT, &plain);
        fs::write(dir.path().join(FILE), &first).unwrap();

        let mut read = Index::read(dir.path(), &sealer).unwrap().unwrap();
        assert_eq!(read.names(), &names(0..3));
        assert!(!read.is_compact());
        read.add(dir.path(), &sealer, &Arc::from("s3")).unwrap();
        assert!(lines(dir.path())[0].starts_with(HEADER.as_bytes()));
        let again = Index::read(dir.path(), &sealer).unwrap().unwrap();
        assert_eq!(again.names(), &names(0..4));

        let mut damaged = first.clone();
        damaged[30] ^= 1;
        fs::write(dir.path().join(FILE), &damaged).unwrap();
        assert!(matches!(
            Index::read(dir.path(), &sealer),
            Err(StoreError::DamagedIndex { .. })
        ));
    }

    #[test]
    fn a_failed_append_leaves_the_names_unchanged_and_the_next_change_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = sealer();
        let mut index = Index::create(dir.path(), &sealer, names(0..2)).unwrap();
        index.add(dir.path(), &sealer, &Arc::from("a")).unwrap();
        // A handle that cannot write fails the append, as a full disk does.
        index.log.as_mut().unwrap().file = Some(File::open(dir.path().join(FILE)).unwrap());
        assert!(index.add(dir.path(), &sealer, &Arc::from("b")).is_err());
        assert!(!index.names().contains("b"));
        assert!(index.log.is_none());

        index.add(dir.path(), &sealer, &Arc::from("b")).unwrap();
        assert_eq!(lines(dir.path()).len(), 2, "rewritten");
        let read = Index::read(dir.path(), &sealer).unwrap().unwrap();
        assert_eq!(read.names(), index.names());
    }
}
