//! Dead letters: journaled writes that could not be written back, kept
//! aside instead of dropped.
//!
//! A write-back that finds the row changed by someone else, the session
//! destroyed, or its id taken does not guess: it leaves the database as it
//! is (the newer state wins) and appends the journaled write here, one JSON
//! document per line, in `dead-letters.jsonl` of the journal directory
//! (0600: it holds session ids and data). `pgsession journal` lists them and
//! replays or discards them on request.
//!
//! ```no_run
//! # fn example() -> std::io::Result<()> {
//! let letters = pgsession::dead_letter::read(std::path::Path::new(".pgsession/journal"))?;
//! for (i, letter) in letters.iter().enumerate() {
//!     println!("{i}: {} {} at {}", letter.kind, letter.write.op(), letter.at);
//! }
//! # Ok(()) }
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

pub use super::journal::Pending as Write;
pub use super::journal::{journal_files, JournalFile, JournalFileState};

/// Why a journaled write was set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conflict {
    /// The row holds a document this instance never saw: another instance
    /// (or a Node service) changed the session meanwhile.
    Changed,
    /// The session was destroyed meanwhile (a logout elsewhere): it is not
    /// brought back.
    Destroyed,
    /// The session was created during the outage, and its id is now taken.
    IdTaken,
    /// Two dead stores' journals held the same session; each write was
    /// based on its own view of the row, so neither can be merged.
    Duplicate,
    /// The database refused the write for good (a constraint, a missing
    /// table, a document it does not accept).
    Failed,
}

impl Conflict {
    /// Every kind's label.
    pub const LABELS: [&'static str; 5] = [
        Conflict::Changed.as_str(),
        Conflict::Destroyed.as_str(),
        Conflict::IdTaken.as_str(),
        Conflict::Duplicate.as_str(),
        Conflict::Failed.as_str(),
    ];

    /// The label of `pgsession_writeback_conflicts_total{kind}`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Conflict::Changed => "changed",
            Conflict::Destroyed => "destroyed",
            Conflict::IdTaken => "id_taken",
            Conflict::Duplicate => "duplicate",
            Conflict::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One write set aside.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// When it was set aside.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `schema.table` it was meant for.
    pub table: String,
    /// The session id (a secret: not shown by `Debug`).
    pub sid: String,
    /// Why it could not land.
    pub kind: Conflict,
    /// Details for a person (no session data).
    pub reason: String,
    /// The write itself.
    pub write: Write,
}

impl std::fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Session ids are bearer secrets, documents hold user data.
        let bytes = match &self.write {
            Write::Save { json, .. } => json.len(),
            _ => 0,
        };
        f.debug_struct("DeadLetter")
            .field("at", &self.at)
            .field("table", &self.table)
            .field("kind", &self.kind)
            .field("reason", &self.reason)
            .field("op", &self.write.op())
            .field("json_bytes", &bytes)
            .finish_non_exhaustive()
    }
}

impl DeadLetter {
    /// The first characters of the session id, enough to tell letters
    /// apart in a listing without printing a usable id.
    pub fn sid_prefix(&self) -> &str {
        let end = self
            .sid
            .char_indices()
            .nth(6)
            .map_or(self.sid.len(), |(i, _)| i);
        &self.sid[..end]
    }
}

/// The dead-letter file of a journal directory.
pub fn path(journal_dir: &Path) -> PathBuf {
    journal_dir.join("dead-letters.jsonl")
}

/// Every dead letter in `journal_dir`, oldest first (none without a file).
/// A line that cannot be read is an error naming it: nothing is skipped,
/// except a torn last line (no newline: a crash in the middle of an
/// append, whose entry stayed in the journal and is set aside again).
pub fn read(journal_dir: &Path) -> io::Result<Vec<DeadLetter>> {
    let bytes = match fs::read(path(journal_dir)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let torn_tail = !bytes.is_empty() && !bytes.ends_with(b"\n");
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let mut letters = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice(line) {
            Ok(letter) => letters.push(letter),
            Err(_) if torn_tail && i + 1 == lines.len() => break,
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} line {}: {e}", path(journal_dir).display(), i + 1),
                ))
            }
        }
    }
    Ok(letters)
}

/// Appends `letter`, fsynced, under the directory's dead-letter lock.
pub(crate) fn append(journal_dir: &Path, letter: &DeadLetter) -> io::Result<()> {
    let _lock = lock(journal_dir)?;
    let mut line = serde_json::to_string(letter).map_err(io::Error::other)?;
    line.push('\n');
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path(journal_dir))?;
    mend_tail(journal_dir, &file)?;
    file.write_all(line.as_bytes())?;
    file.sync_data()
}

/// A file that does not end with a newline (a crash in the middle of an
/// append) is mended before the next line goes after it, so that the new
/// line is not glued to the torn one: a whole letter missing only its
/// newline gets it, a torn one is cut off (`read` ignores it anyway).
fn mend_tail(journal_dir: &Path, mut file: &File) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let bytes = fs::read(path(journal_dir))?;
    if bytes.ends_with(b"\n") {
        return Ok(());
    }
    let start = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if serde_json::from_slice::<DeadLetter>(&bytes[start..]).is_ok() {
        file.write_all(b"\n")
    } else {
        file.set_len(start as u64)
    }
}

/// Removes the letters for which `remove` says so (by position in
/// [`read`]'s order, and content); returns how many went. The file is
/// rewritten whole (temporary file, fsync, rename).
pub fn remove(
    journal_dir: &Path,
    mut remove: impl FnMut(usize, &DeadLetter) -> bool,
) -> io::Result<usize> {
    let _lock = lock(journal_dir)?;
    let letters = read(journal_dir)?;
    let before = letters.len();
    let kept: Vec<DeadLetter> = letters
        .into_iter()
        .enumerate()
        .filter(|(i, letter)| !remove(*i, letter))
        .map(|(_, letter)| letter)
        .collect();
    let removed = before - kept.len();
    if removed == 0 {
        return Ok(0);
    }
    let tmp = journal_dir.join(".dead-letters.tmp");
    {
        let mut file = io::BufWriter::new(
            OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?,
        );
        for letter in &kept {
            serde_json::to_writer(&mut file, letter).map_err(io::Error::other)?;
            file.write_all(b"\n")?;
        }
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    fs::rename(&tmp, path(journal_dir))?;
    File::open(journal_dir)?.sync_all()?;
    Ok(removed)
}

/// An exclusive lock on `dead-letters.lock`, held while the file changes
/// (several stores, and the `pgsession journal` command, share it).
fn lock(journal_dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(journal_dir.join("dead-letters.lock"))?;
    file.lock()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn letter(sid: &str, kind: Conflict) -> DeadLetter {
        DeadLetter {
            at: time::macros::datetime!(2030-01-01 00:00 UTC),
            table: "public.s".into(),
            sid: sid.into(),
            kind,
            reason: "test".into(),
            write: Write::Save {
                json: r#"{"views":2}"#.into(),
                expire: time::macros::datetime!(2030-01-02 00:00 UTC),
            },
        }
    }

    #[test]
    fn letters_are_appended_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_empty(), "no file, no letters");
        append(dir.path(), &letter("aaaaaaaaaaaa", Conflict::Changed)).unwrap();
        append(dir.path(), &letter("bbbbbbbbbbbb", Conflict::Destroyed)).unwrap();
        let mode = fs::metadata(path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let letters = read(dir.path()).unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(letters[1].kind, Conflict::Destroyed);
        assert_eq!(remove(dir.path(), |i, _| i == 0).unwrap(), 1);
        let letters = read(dir.path()).unwrap();
        assert_eq!(letters, vec![letter("bbbbbbbbbbbb", Conflict::Destroyed)]);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_mended_by_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), &letter("aaaaaaaaaaaa", Conflict::Changed)).unwrap();
        let whole = fs::read_to_string(path(dir.path())).unwrap();
        // A crash in the middle of the second append.
        let torn = serde_json::to_string(&letter("bbbbbbbbbbbb", Conflict::Changed)).unwrap();
        fs::write(
            path(dir.path()),
            format!("{whole}{}", &torn[..torn.len() / 2]),
        )
        .unwrap();
        assert_eq!(
            read(dir.path()).unwrap().len(),
            1,
            "the torn line is ignored"
        );
        append(dir.path(), &letter("cccccccccccc", Conflict::Destroyed)).unwrap();
        let sids: Vec<String> = read(dir.path())
            .unwrap()
            .into_iter()
            .map(|l| l.sid)
            .collect();
        assert_eq!(sids, ["aaaaaaaaaaaa", "cccccccccccc"]);
        // A whole letter that only lost its newline is kept.
        let text = fs::read_to_string(path(dir.path())).unwrap();
        fs::write(path(dir.path()), text.trim_end()).unwrap();
        append(dir.path(), &letter("dddddddddddd", Conflict::Changed)).unwrap();
        assert_eq!(read(dir.path()).unwrap().len(), 3);
        // A bad line in the middle is still an error naming it.
        let text = fs::read_to_string(path(dir.path())).unwrap();
        fs::write(path(dir.path()), format!("not json\n{text}")).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn debug_shows_neither_the_id_nor_the_document() {
        let text = format!("{:?}", letter("secret-session-id", Conflict::Changed));
        assert!(
            !text.contains("secret-session-id") && !text.contains("views"),
            "{text}"
        );
        assert_eq!(
            letter("secret-session-id", Conflict::Changed).sid_prefix(),
            "secret"
        );
    }
}
