//! The on-disk journal: writes accepted while the database is away, made
//! durable before they are acknowledged, and found again by this process or
//! the next one started on the same disk.
//!
//! Each [`Store`](crate::Store) appends to a file of its own,
//! `journal-<pid>-<nanos>.log` in the journal directory (0700; files 0600:
//! they hold live session ids and data), and holds an exclusive `flock` on
//! it for as long as it lives. The operating system drops that lock when the
//! process dies, however it dies (SIGKILL, OOM), so a file whose lock can be
//! taken is an orphan: a starting store, or a running one every few
//! seconds, adopts it (copies its live entries into its own file, fsyncs,
//! then deletes it).
//!
//! A file is a header line, then one record per line: a CRC-32 of the JSON
//! in hex, a space, the JSON. A record is either the whole latest state of a
//! session's entry (`put`) or the note that an entry was written back
//! (`done`). Replay keeps, per session, the last `put` not followed by its
//! `done`. A torn last line (a crash in the middle of an append, never
//! acknowledged) is ignored; a bad line anywhere else sets the file aside as
//! `*.damaged`, reported, never dropped.
//!
//! Appends are grouped: each writer writes its line to the file, and one of
//! the writers waiting at that moment calls `fsync` for all of them (group
//! commit), so an outage at high load does not cost one `fsync` per request.
//!
//! Hand-written rather than an embedded database (redb, sled) or a WAL
//! crate: the format is a few lines of JSON an operator can read with
//! `cat`, the only durability primitive needed is `fsync` of one
//! append-only file, and ownership across processes is an `flock`, which
//! those crates do not offer.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

/// A write waiting in the journal: the latest state of one session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Pending {
    /// Insert or replace the session's document and expiry.
    Save {
        /// The document (the `sess` column, JSON text).
        json: String,
        /// The expiry.
        #[serde(with = "time::serde::rfc3339")]
        expire: OffsetDateTime,
    },
    /// Move the expiry only.
    Touch {
        /// The new expiry.
        #[serde(with = "time::serde::rfc3339")]
        expire: OffsetDateTime,
    },
    /// Delete the session; a destroyed session stays destroyed.
    Destroy,
}

impl Pending {
    /// The entry that results from `self` followed by `next`.
    pub(crate) fn then(self, next: Pending) -> Pending {
        match (self, next) {
            (Pending::Save { json, .. }, Pending::Touch { expire }) => {
                Pending::Save { json, expire }
            }
            (Pending::Destroy, Pending::Touch { .. }) => Pending::Destroy,
            (_, next) => next,
        }
    }

    /// `save`, `touch` or `destroy`.
    pub fn op(&self) -> &'static str {
        match self {
            Pending::Save { .. } => "save",
            Pending::Touch { .. } => "touch",
            Pending::Destroy => "destroy",
        }
    }
}

/// What the row must be for a journaled save to land: the write-back is
/// conditional on it, so that it never undoes a newer write (of another
/// instance, or of a Node service on the same table) and never brings back
/// a destroyed session.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Base {
    /// The session had no row (it was created during the outage): insert
    /// only if the id is still free.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) absent: bool,
    /// SHA-256 (hex, or its first 16 hex digits) of the documents the row
    /// may hold: the one this instance last read or wrote, its own earlier
    /// ones (which a failover to an asynchronous replica may bring back),
    /// and any it sent without learning whether it committed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) docs: Vec<String>,
}

impl Base {
    /// Most documents kept: the earlier documents the cache remembers, and
    /// a few more (a session rarely has more than one write in doubt);
    /// past this the oldest go (a write-back then reports a conflict
    /// rather than guess).
    const MAX_DOCS: usize = 40;

    pub(crate) fn add_doc(&mut self, digest: String) {
        if !self.docs.contains(&digest) {
            if self.docs.len() == Self::MAX_DOCS {
                self.docs.remove(0);
            }
            self.docs.push(digest);
        }
    }
}

/// One session's journal entry: its latest write, and what that write was
/// based on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Entry {
    pub(crate) write: Pending,
    #[serde(default)]
    pub(crate) base: Base,
    /// When a statement carrying this session's write was last sent without
    /// an answer (a timeout, a link that broke mid-statement), as Unix
    /// milliseconds: it may still commit, so the write-back first makes sure
    /// no statement from before then is still running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) in_doubt_since: Option<i64>,
}

/// Now, in Unix milliseconds: the journal's moments "in doubt" are kept
/// this way so that they survive a restart (the same machine's clock).
pub(crate) fn unix_ms_now() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// SHA-256 of a document, in hex, as the write-back's SQL computes it.
pub(crate) fn digest(json: &str) -> String {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    let hash = sha2::Sha256::digest(json.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in hash {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// The first 8 bytes of a document's SHA-256: its [`digest`]'s first 16
/// hex digits, which the write-back's SQL also accepts. Enough to tell a
/// session's own earlier documents apart (a collision needs 2^32 of them),
/// at an eighth of the memory.
pub(crate) fn doc_prefix(json: &str) -> u64 {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(json.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

/// Why the journal could not take a write.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum JournalError {
    /// Past `journal_max_bytes`.
    #[error("the journal is full ({limit} bytes, journal_max_bytes)")]
    Full { limit: u64 },
    /// The disk refused the write or the fsync (full, read-only, failing).
    #[error("the journal file {path} cannot be written: {reason}")]
    Io { path: PathBuf, reason: String },
}

/// Why the journal could not be opened at start.
#[derive(Debug, thiserror::Error)]
#[error("journal_dir {dir}: {reason}")]
pub(crate) struct OpenError {
    pub(crate) dir: PathBuf,
    pub(crate) reason: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    pgsession_journal: u32,
    table: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Record {
    Put { seq: u64, sid: String, put: Entry },
    Done { done: u64, sid: String },
}

/// A file set aside, or an orphan adopted: for the log and the dashboard.
#[derive(Debug)]
pub(crate) enum Found {
    Adopted {
        path: PathBuf,
        entries: usize,
    },
    Damaged {
        path: PathBuf,
        kept: PathBuf,
        line: usize,
        reason: String,
    },
}

/// A journal just opened: the store's own file, and what it found of
/// stores that died.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) journal: Journal,
    /// Their live entries, oldest first, now in this store's file.
    pub(crate) adopted: Vec<(String, Entry)>,
    /// The files adopted or set aside, for the log.
    pub(crate) found: Vec<Found>,
}

/// The journal file of one store.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    path: PathBuf,
    table: String,
    max_bytes: u64,
    writer: Mutex<Writer>,
    sync: Mutex<SyncState>,
    synced: tokio::sync::Notify,
    /// `fsync` calls made for appends, for the metrics and tests.
    fsyncs: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Writer {
    file: Arc<File>,
    /// Bytes in the file now.
    bytes: u64,
    /// Bytes of the header.
    header: u64,
    /// Records written (their tickets are 1..=written).
    written: u64,
    /// Set when a write or an fsync failed: nothing more is acknowledged
    /// from this file (Linux may have dropped the pages that failed).
    broken: Option<String>,
    /// The last append the disk refused (full, say), taken back cleanly;
    /// cleared by the next append that works.
    refused: Option<String>,
}

#[derive(Debug, Default)]
struct SyncState {
    synced: u64,
    syncing: bool,
}

/// A record written, to wait on until it is durable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket(u64);

const VERSION: u32 = 1;

impl Journal {
    /// Creates the directory (0700) if needed and this store's own file
    /// (0600, locked), then adopts every orphan file of `table` in it.
    pub(crate) fn open(dir: &Path, table: &str, max_bytes: u64) -> Result<Opened, OpenError> {
        let fail = |reason: String| OpenError {
            dir: dir.to_owned(),
            reason,
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail(format!("cannot create it: {e}")))?;
        }
        let meta = fs::metadata(dir).map_err(|e| fail(e.to_string()))?;
        if !meta.is_dir() {
            return Err(fail("is not a directory".into()));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            // Session ids are bearer secrets: nobody else may read them.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
                fail(format!(
                    "is readable by others and cannot be made 0700: {e}"
                ))
            })?;
        }
        let stamp = OffsetDateTime::now_utc().unix_timestamp_nanos();
        let name = format!("journal-{}-{stamp}.log", std::process::id());
        let path = dir.join(&name);
        let (file, header) =
            create_locked(&path, table).map_err(|e| fail(format!("cannot write {name}: {e}")))?;
        sync_dir(dir).map_err(|e| fail(format!("cannot fsync the directory: {e}")))?;
        let journal = Journal {
            dir: dir.to_owned(),
            path,
            table: table.to_owned(),
            max_bytes,
            writer: Mutex::new(Writer {
                file: Arc::new(file),
                bytes: header,
                header,
                written: 0,
                broken: None,
                refused: None,
            }),
            sync: Mutex::new(SyncState::default()),
            synced: tokio::sync::Notify::new(),
            fsyncs: std::sync::atomic::AtomicU64::new(0),
        };
        let (adopted, found) = journal.adopt_orphans();
        Ok(Opened {
            journal,
            adopted,
            found,
        })
    }

    /// This store's file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The journal directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Why the file takes no more writes, or why the last one was refused
    /// (a full disk), if so.
    pub(crate) fn broken(&self) -> Option<String> {
        let writer = self.lock_writer();
        writer.broken.clone().or_else(|| writer.refused.clone())
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        // Every update leaves the fields consistent before it can fail.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_sync(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The line of a `put` record, and its length (what it costs against
    /// the byte limit).
    pub(crate) fn put_line(seq: u64, sid: &str, entry: &Entry) -> String {
        frame(&Record::Put {
            seq,
            sid: sid.to_owned(),
            put: entry.clone(),
        })
    }

    /// Appends a `put` line (from [`Journal::put_line`]). `live` is the
    /// bytes the journal's live entries would take with this one: past the
    /// limit, the write is refused; past it in the file only (superseded
    /// records), `compact` is asked for the live records to rewrite the
    /// file with first. Call with the fallback's lock held, so that the
    /// file's order is the memory's.
    pub(crate) fn append_put(
        &self,
        line: &str,
        live: u64,
        compact: impl FnOnce() -> Vec<String>,
    ) -> Result<Ticket, JournalError> {
        let mut writer = self.lock_writer();
        if let Some(reason) = &writer.broken {
            return Err(self.io_error(reason.clone()));
        }
        if live + writer.header > self.max_bytes {
            return Err(JournalError::Full {
                limit: self.max_bytes,
            });
        }
        if writer.bytes + line.len() as u64 > self.max_bytes {
            self.compact(&mut writer, compact())?;
        }
        self.append(&mut writer, line)
    }

    /// Appends a `put` line whatever the byte limit (an entry adopted from
    /// a dead store was acknowledged there: it is never refused).
    pub(crate) fn append_put_unbounded(&self, line: &str) -> Result<Ticket, JournalError> {
        let mut writer = self.lock_writer();
        if let Some(reason) = &writer.broken {
            return Err(self.io_error(reason.clone()));
        }
        self.append(&mut writer, line)
    }

    /// Appends a `done` line; durable with the next sync.
    pub(crate) fn append_done(&self, seq: u64, sid: &str) {
        let line = frame(&Record::Done {
            done: seq,
            sid: sid.to_owned(),
        });
        let mut writer = self.lock_writer();
        if writer.broken.is_none() {
            // A lost `done` only means the entry is written back again
            // after a crash, which its condition makes harmless.
            let _ = self.append(&mut writer, &line);
        }
    }

    fn append(&self, writer: &mut Writer, line: &str) -> Result<Ticket, JournalError> {
        let before = writer.bytes;
        match (&*writer.file).write_all(line.as_bytes()) {
            Ok(()) => {
                writer.bytes += line.len() as u64;
                writer.written += 1;
                writer.refused = None;
                Ok(Ticket(writer.written))
            }
            Err(e) => {
                // Take back a partial line, so that later lines do not
                // follow a torn one; if even that fails, stop here.
                let reason = e.to_string();
                if writer.file.set_len(before).is_err() {
                    writer.broken = Some(reason.clone());
                } else {
                    writer.refused = Some(format!("the last write was refused: {reason}"));
                }
                Err(self.io_error(reason))
            }
        }
    }

    fn io_error(&self, reason: String) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            reason,
        }
    }

    /// Rewrites the file with only the live records: written to a temporary
    /// file, fsynced, locked, renamed over the old one.
    fn compact(&self, writer: &mut Writer, live: Vec<String>) -> Result<(), JournalError> {
        let tmp = self.dir.join(format!(
            ".tmp-{}",
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("journal")
        ));
        let rewrite = || -> io::Result<(File, u64, u64)> {
            let (file, header) = create_locked(&tmp, &self.table)?;
            let mut out = io::BufWriter::new(&file);
            let mut bytes = header;
            for line in &live {
                out.write_all(line.as_bytes())?;
                bytes += line.len() as u64;
            }
            out.flush()?;
            drop(out);
            file.sync_data()?;
            fs::rename(&tmp, &self.path)?;
            sync_dir(&self.dir)?;
            Ok((file, header, bytes))
        };
        match rewrite() {
            Ok((file, header, bytes)) => {
                writer.file = Arc::new(file);
                writer.header = header;
                writer.bytes = bytes;
                // Everything written so far is in the new file, synced.
                let mut sync = self.lock_sync();
                sync.synced = sync.synced.max(writer.written);
                drop(sync);
                self.synced.notify_waiters();
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(self.io_error(format!("compacting: {e}")))
            }
        }
    }

    /// When the journal is empty: the file back to its header.
    pub(crate) fn truncate_if(&self, empty: impl FnOnce() -> bool) {
        let mut writer = self.lock_writer();
        if writer.bytes == writer.header || writer.broken.is_some() || !empty() {
            return;
        }
        if writer.file.set_len(writer.header).is_ok() && writer.file.sync_data().is_ok() {
            writer.bytes = writer.header;
        }
    }

    /// Waits until the record of `ticket` is on disk: one `fsync` serves
    /// every record written before it started (group commit).
    pub(crate) async fn durable(&self, ticket: Ticket) -> Result<(), JournalError> {
        loop {
            let notified = self.synced.notified();
            tokio::pin!(notified);
            // Decided under the lock, acted on outside it (a std mutex
            // guard is never held across an await).
            let lead = {
                let mut sync = self.lock_sync();
                if sync.synced >= ticket.0 {
                    return Ok(());
                }
                if sync.syncing {
                    // Registered before the lock is released: the
                    // syncer's notification cannot be missed.
                    notified.as_mut().enable();
                    false
                } else {
                    sync.syncing = true;
                    true
                }
            };
            if !lead {
                notified.await;
                continue;
            }
            let (file, upto) = {
                let writer = self.lock_writer();
                if let Some(reason) = &writer.broken {
                    self.lock_sync().syncing = false;
                    self.synced.notify_waiters();
                    return Err(self.io_error(reason.clone()));
                }
                (writer.file.clone(), writer.written)
            };
            let result = tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
            self.fsyncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!(crate::metrics::JOURNAL_FSYNCS).increment(1);
            if let Err(e) = &result {
                // After a failed fsync the kernel may have dropped the
                // pages: nothing more is acknowledged from this file.
                self.lock_writer().broken = Some(format!("fsync failed: {e}"));
            }
            {
                let mut sync = self.lock_sync();
                sync.syncing = false;
                if result.is_ok() {
                    sync.synced = sync.synced.max(upto);
                }
            }
            self.synced.notify_waiters();
            if let Err(e) = result {
                return Err(self.io_error(format!("fsync failed: {e}")));
            }
        }
    }

    /// Makes every record written so far durable (the `done` records of a
    /// write-back pass).
    pub(crate) async fn sync_all(&self) -> Result<(), JournalError> {
        let written = self.lock_writer().written;
        self.durable(Ticket(written)).await
    }

    /// Adopts the files of dead stores of the same table: their live
    /// entries are copied into this store's file and made durable, then
    /// their files are deleted. Files of live stores (locked) are left.
    pub(crate) fn adopt_orphans(&self) -> (Vec<(String, Entry)>, Vec<Found>) {
        let mut adopted = Vec::new();
        let mut found = Vec::new();
        let paths = journal_paths(&self.dir, |name| name.ends_with(".log"));
        for path in paths.into_iter().filter(|p| *p != self.path) {
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if file.try_lock().is_err() {
                continue; // its store is alive
            }
            // Another store may have adopted and deleted it between our
            // open and our lock: only the file still at the path counts.
            let same = match (fs::metadata(&path), file.metadata()) {
                (Ok(now), Ok(ours)) => now.ino() == ours.ino() && now.dev() == ours.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            match read(&file, &self.table) {
                Ok(Some(entries)) => {
                    let count = entries.len();
                    if self.take_over(&entries).is_ok() {
                        let _ = fs::remove_file(&path);
                        let _ = sync_dir(&self.dir);
                        if count > 0 {
                            found.push(Found::Adopted {
                                path: path.clone(),
                                entries: count,
                            });
                        }
                        adopted.extend(entries);
                    }
                }
                Ok(None) => {} // another table's journal
                Err((line, reason)) => {
                    let kept = path.with_extension("damaged");
                    let kept = match fs::rename(&path, &kept) {
                        Ok(()) => kept,
                        Err(_) => path.clone(),
                    };
                    found.push(Found::Damaged {
                        path,
                        kept,
                        line,
                        reason,
                    });
                }
            }
        }
        (adopted, found)
    }

    /// Writes adopted entries into this store's file and fsyncs it, before
    /// the orphan file is deleted. The byte limit does not apply: an
    /// acknowledged write is never refused after the fact. Their sequence
    /// numbers are the caller's to assign; here they only need to be
    /// unique within this file, and `take_over` precedes any other record.
    fn take_over(&self, entries: &[(String, Entry)]) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut writer = self.lock_writer();
        let mut lines = String::new();
        for (sid, entry) in entries {
            // Sequence 0: superseded by the first `put` the store makes
            // when it takes the entry into memory (`Fallback::adopt`).
            lines.push_str(&Journal::put_line(0, sid, entry));
        }
        self.append(&mut writer, &lines)?;
        writer
            .file
            .sync_data()
            .map_err(|e| self.io_error(e.to_string()))?;
        Ok(())
    }

    /// Deletes this store's file (at close, with nothing left in it).
    pub(crate) fn remove(&self) {
        let writer = self.lock_writer();
        if writer.broken.is_none() {
            let _ = fs::remove_file(&self.path);
            let _ = sync_dir(&self.dir);
        }
    }
}

/// The `journal-*` files of `dir` whose name `accept` takes, in name order
/// (the same process's files together, then by time); none without the
/// directory.
fn journal_paths(dir: &Path, accept: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(listing) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = listing
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("journal-") && accept(n))
        })
        .collect();
    paths.sort();
    paths
}

/// A new file with the header, 0600, created exclusively and locked.
fn create_locked(path: &Path, table: &str) -> io::Result<(File, u64)> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.try_lock()
        .map_err(|e| io::Error::other(format!("cannot lock: {e}")))?;
    let mut header = serde_json::to_string(&Header {
        pgsession_journal: VERSION,
        table: table.to_owned(),
    })
    .map_err(io::Error::other)?;
    header.push('\n');
    file.write_all(header.as_bytes())?;
    file.sync_data()?;
    Ok((file, header.len() as u64))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `crc32-hex json\n`.
fn frame(record: &Record) -> String {
    let json = serde_json::to_string(record).expect("journal records serialize");
    format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes()))
}

fn unframe(line: &str) -> Option<Record> {
    let (crc, json) = line.split_once(' ')?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    (crc32fast::hash(json.as_bytes()) == crc)
        .then(|| serde_json::from_str(json).ok())
        .flatten()
}

/// The live entries of a journal file, oldest first; `None` for another
/// table's file; the line and reason of a damaged one.
#[allow(clippy::type_complexity)]
fn read(file: &File, table: &str) -> Result<Option<Vec<(String, Entry)>>, (usize, String)> {
    read_any(file, Some(table)).map(|found| found.map(|(_, entries)| entries))
}

/// [`read`] for the file's own table (`None`: any), with that table's name.
#[allow(clippy::type_complexity)]
fn read_any(
    file: &File,
    table: Option<&str>,
) -> Result<Option<(String, Vec<(String, Entry)>)>, (usize, String)> {
    let mut lines = io::BufReader::new(file).lines();
    let header: Header = match lines.next() {
        Some(Ok(line)) => serde_json::from_str(&line).map_err(|e| (1, e.to_string()))?,
        Some(Err(e)) => return Err((1, e.to_string())),
        None => return Ok(Some((String::new(), Vec::new()))), // created, never written
    };
    if header.pgsession_journal != VERSION {
        return Err((1, format!("journal version {}", header.pgsession_journal)));
    }
    if table.is_some_and(|table| header.table != table) {
        return Ok(None);
    }
    let lines: Vec<io::Result<String>> = lines.collect();
    let last = lines.len();
    let mut live: HashMap<String, (u64, usize, Entry)> = HashMap::new();
    let mut order = 0usize;
    for (i, line) in lines.into_iter().enumerate() {
        let number = i + 2;
        let record = line.ok().as_deref().and_then(unframe);
        match record {
            Some(Record::Put { seq, sid, put }) => {
                order += 1;
                live.insert(sid, (seq, order, put));
            }
            Some(Record::Done { done, sid }) => {
                if live.get(&sid).is_some_and(|(seq, _, _)| *seq == done) {
                    live.remove(&sid);
                }
            }
            // A torn last line: a crash in the middle of an append that
            // was never acknowledged.
            None if i + 1 == last => break,
            None => return Err((number, "bad record".into())),
        }
    }
    let mut entries: Vec<(usize, String, Entry)> = live
        .into_iter()
        .map(|(sid, (_, order, entry))| (order, sid, entry))
        .collect();
    entries.sort_by_key(|(order, _, _)| *order);
    Ok(Some((
        header.table,
        entries
            .into_iter()
            .map(|(_, sid, entry)| (sid, entry))
            .collect(),
    )))
}

/// A journal file found in a journal directory (`pgsession journal list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalFile {
    /// Its path.
    pub path: PathBuf,
    /// `schema.table` it holds writes for, when its header could be read.
    pub table: Option<String>,
    /// Sessions with a write waiting in it, when it could be read.
    pub live_entries: Option<usize>,
    /// Who holds it.
    pub state: JournalFileState,
}

/// Whether a journal file belongs to a running store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalFileState {
    /// A running store holds its lock.
    Held,
    /// Its store stopped: the next store started on the directory adopts
    /// it and writes it back.
    Left,
    /// Set aside as damaged (`*.damaged`): to be read by a person.
    Damaged,
    /// It could not be opened.
    Unreadable,
}

/// Every journal file in `dir` (`journal-*`), read as the store reads
/// them, in name order.
pub fn journal_files(dir: &Path) -> Vec<JournalFile> {
    journal_paths(dir, |_| true)
        .into_iter()
        .map(|path| {
            let Ok(file) = File::open(&path) else {
                return JournalFile {
                    path,
                    table: None,
                    live_entries: None,
                    state: JournalFileState::Unreadable,
                };
            };
            let state = if path.extension().is_some_and(|e| e == "damaged") {
                JournalFileState::Damaged
            } else if file.try_lock().is_err() {
                JournalFileState::Held
            } else {
                JournalFileState::Left
            };
            let read = read_any(&file, None).ok().flatten();
            JournalFile {
                path,
                table: read.as_ref().map(|(table, _)| table.clone()),
                live_entries: read.map(|(_, entries)| entries.len()),
                state,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(json: &str) -> Entry {
        Entry {
            write: Pending::Save {
                json: json.into(),
                expire: time::macros::datetime!(2030-01-01 00:00 UTC),
            },
            base: Base {
                absent: false,
                docs: vec![digest("{}")],
            },
            in_doubt_since: None,
        }
    }

    /// Opens a journal as another process would find it: a file whose lock
    /// is free (its store gone).
    fn orphan(dir: &Path, records: &[(u64, &str, Option<Entry>)]) -> PathBuf {
        let path = dir.join("journal-1-1.log");
        let mut text = serde_json::to_string(&Header {
            pgsession_journal: VERSION,
            table: "public.s".into(),
        })
        .unwrap();
        text.push('\n');
        for (seq, sid, entry) in records {
            text.push_str(&match entry {
                Some(entry) => Journal::put_line(*seq, sid, entry),
                None => frame(&Record::Done {
                    done: *seq,
                    sid: sid.to_string(),
                }),
            });
        }
        fs::write(&path, text).unwrap();
        path
    }

    #[tokio::test]
    async fn files_and_directory_are_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("journal");
        let Opened { journal, .. } = Journal::open(&dir, "public.s", 1 << 20).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(journal.path()), 0o600);
    }

    #[tokio::test]
    async fn an_orphan_is_adopted_with_its_live_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = orphan(
            dir.path(),
            &[
                (1, "a", Some(save("1"))),
                (2, "b", Some(save("2"))),
                (1, "a", None), // a written back
                (3, "b", Some(save("3"))),
            ],
        );
        let Opened {
            journal,
            adopted: entries,
            found,
        } = Journal::open(dir.path(), "public.s", 1 << 20).unwrap();
        assert_eq!(entries, vec![("b".to_owned(), save("3"))]);
        assert!(matches!(&found[..], [Found::Adopted { entries: 1, .. }]));
        assert!(!path.exists(), "adopted, then deleted");
        // And they are in the adopter's own file, durable.
        let file = File::open(journal.path()).unwrap();
        assert_eq!(
            read(&file, "public.s").unwrap().unwrap(),
            vec![("b".to_owned(), save("3"))]
        );
    }

    #[tokio::test]
    async fn a_live_stores_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { journal: first, .. } = Journal::open(dir.path(), "public.s", 1 << 20).unwrap();
        let line = Journal::put_line(1, "a", &save("1"));
        let ticket = first
            .append_put(&line, line.len() as u64, Vec::new)
            .unwrap();
        first.durable(ticket).await.unwrap();
        let Opened {
            adopted: entries, ..
        } = Journal::open(dir.path(), "public.s", 1 << 20).unwrap();
        assert!(entries.is_empty(), "locked by a live store");
        assert!(first.path().exists());
        drop(first); // the lock goes with the file, as at a process's death
        let Opened {
            adopted: entries, ..
        } = Journal::open(dir.path(), "public.s", 1 << 20).unwrap();
        assert_eq!(entries.len(), 1);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_ignored_and_a_bad_middle_line_sets_the_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = orphan(
            dir.path(),
            &[(1, "a", Some(save("1"))), (2, "b", Some(save("2")))],
        );
        let mut text = fs::read_to_string(&path).unwrap();
        text.truncate(text.len() - 7);
        fs::write(&path, &text).unwrap();
        let Opened {
            adopted: entries, ..
        } = Journal::open(dir.path(), "public.s", 1 << 20).unwrap();
        assert_eq!(entries, vec![("a".to_owned(), save("1"))]);

        let dir = tempfile::tempdir().unwrap();
        let path = orphan(
            dir.path(),
            &[(1, "a", Some(save("1"))), (2, "b", Some(save("2")))],
        );
        let text = fs::read_to_string(&path)
            .unwrap()
            .replacen("\"1\"", "\"9\"", 1);
        fs::write(&path, text).unwrap();
        let Opened {
            adopted: entries,
            found,
            ..
        } = Journal::open(dir.path(), "public.s", 1 << 20).unwrap();
        assert!(entries.is_empty());
        assert!(
            matches!(&found[..], [Found::Damaged { line: 2, kept, .. }] if kept.exists()),
            "{found:?}"
        );
    }

    #[tokio::test]
    async fn the_byte_limit_refuses_live_data_and_compacts_superseded_records() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { journal, .. } = Journal::open(dir.path(), "public.s", 2_000).unwrap();
        let line = Journal::put_line(1, "a", &save(&"x".repeat(300)));
        let len = line.len() as u64;
        // The same session rewritten: only the latest record is live, so
        // the file is compacted instead of refused.
        for seq in 0..20 {
            let line = Journal::put_line(seq, "a", &save(&"x".repeat(300)));
            let ticket = journal
                .append_put(&line, len, || vec![line.clone()])
                .unwrap();
            journal.durable(ticket).await.unwrap();
        }
        assert!(journal.lock_writer().bytes <= 2_000);
        // Live data past the limit is refused.
        let err = journal.append_put(&line, 2_001, Vec::new).unwrap_err();
        assert!(matches!(err, JournalError::Full { limit: 2_000 }), "{err}");
    }

    #[tokio::test]
    async fn concurrent_appends_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { journal, .. } = Journal::open(dir.path(), "public.s", 1 << 30).unwrap();
        let journal = Arc::new(journal);
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    let line = Journal::put_line(i, &format!("s{i}"), &save("{}"));
                    let ticket = journal.append_put(&line, 0, Vec::new).unwrap();
                    journal.durable(ticket).await.unwrap();
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let fsyncs = journal.fsyncs.load(std::sync::atomic::Ordering::Relaxed);
        assert!(fsyncs < 8, "64 appends took {fsyncs} fsyncs");
        let file = File::open(journal.path()).unwrap();
        assert_eq!(read(&file, "public.s").unwrap().unwrap().len(), 64);
    }
}
