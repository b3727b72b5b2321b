//! The spool file: where the journal goes when the process stops while the
//! database is away, and where the next start finds it.
//!
//! One JSON document per line: a header naming the table, then the entries
//! oldest first. Written to a temporary file, fsynced, renamed into place,
//! and the directory fsynced, so a crash leaves the old state or the new,
//! never half a file. At start-up each file is claimed by renaming it (only
//! one instance wins), read back, and removed once written back. A file that
//! cannot be read is renamed `*.damaged` and reported, never dropped.

use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use super::fallback::Pending;

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    pgsession_spool: u32,
    table: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    sid: String,
    #[serde(flatten)]
    write: Pending,
}

/// Why a spool file could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    #[error("spool file {path} is damaged (line {line}: {reason}); kept aside as {kept}")]
    Damaged {
        path: PathBuf,
        line: usize,
        reason: String,
        kept: PathBuf,
    },
}

fn prefix(table: &str) -> String {
    format!("spool-{table}-")
}

/// Writes `entries` to a new spool file in `dir`; returns its path.
pub(crate) fn write(dir: &Path, table: &str, entries: &[(String, Pending)]) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let name = format!("{}{}-{stamp}.jsonl", prefix(table), std::process::id());
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut file = io::BufWriter::new(fs::File::create(&tmp)?);
        serde_json::to_writer(
            &mut file,
            &Header {
                pgsession_spool: 1,
                table: table.to_owned(),
            },
        )?;
        file.write_all(b"\n")?;
        for (sid, write) in entries {
            serde_json::to_writer(
                &mut file,
                &Entry {
                    sid: sid.clone(),
                    write: write.clone(),
                },
            )?;
            file.write_all(b"\n")?;
        }
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

/// A spool file claimed by this process, with its entries.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) path: PathBuf,
    pub(crate) entries: Vec<(String, Pending)>,
}

/// Claims and reads every spool file of `table` in `dir`. Damaged files are
/// kept aside and reported in the second list.
pub(crate) fn claim_all(dir: &Path, table: &str) -> (Vec<Claimed>, Vec<SpoolError>) {
    let (mut claimed, mut errors) = (Vec::new(), Vec::new());
    let Ok(listing) = fs::read_dir(dir) else {
        return (claimed, errors); // no spool directory: nothing spooled
    };
    let prefix = prefix(table);
    let mut names: Vec<PathBuf> = listing
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".jsonl"))
        })
        .collect();
    names.sort(); // same process first, then by time
    for path in names {
        let mine = path.with_extension(format!("claimed-{}", std::process::id()));
        if fs::rename(&path, &mine).is_err() {
            continue; // another instance claimed it first
        }
        match read(&mine, table) {
            Ok(entries) => claimed.push(Claimed {
                path: mine,
                entries,
            }),
            Err((line, reason)) => {
                let kept = path.with_extension("damaged");
                let kept = match fs::rename(&mine, &kept) {
                    Ok(()) => kept,
                    Err(_) => mine,
                };
                errors.push(SpoolError::Damaged {
                    path,
                    line,
                    reason,
                    kept,
                });
            }
        }
    }
    (claimed, errors)
}

fn read(path: &Path, table: &str) -> Result<Vec<(String, Pending)>, (usize, String)> {
    let file = fs::File::open(path).map_err(|e| (0, e.to_string()))?;
    let mut lines = io::BufReader::new(file).lines();
    let header: Header = match lines.next() {
        Some(Ok(line)) => serde_json::from_str(&line).map_err(|e| (1, e.to_string()))?,
        Some(Err(e)) => return Err((1, e.to_string())),
        None => return Err((1, "empty file".into())),
    };
    if header.pgsession_spool != 1 || header.table != table {
        return Err((
            1,
            format!(
                "written for {} version {}",
                header.table, header.pgsession_spool
            ),
        ));
    }
    let mut entries = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line.map_err(|e| (i + 2, e.to_string()))?;
        let entry: Entry = serde_json::from_str(&line).map_err(|e| (i + 2, e.to_string()))?;
        entries.push((entry.sid, entry.write));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<(String, Pending)> {
        let expire = time::macros::datetime!(2030-01-01 00:00 UTC);
        vec![
            (
                "a".into(),
                Pending::Save {
                    json: r#"{"views":3}"#.into(),
                    expire,
                },
            ),
            ("b".into(), Pending::Destroy),
            ("c".into(), Pending::Touch { expire }),
        ]
    }

    #[test]
    fn a_spool_file_round_trips_and_is_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "public.s", &entries()).unwrap();
        assert!(path.exists());
        write(dir.path(), "public.other", &entries()).unwrap();

        let (claimed, errors) = claim_all(dir.path(), "public.s");
        assert!(errors.is_empty());
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].entries, entries());
        assert!(!path.exists(), "claimed by renaming");
        let (again, _) = claim_all(dir.path(), "public.s");
        assert!(again.is_empty(), "a claimed file is not claimed twice");
    }

    #[test]
    fn a_damaged_spool_file_is_kept_aside_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "public.s", &entries()).unwrap();
        let mut text = fs::read_to_string(&path).unwrap();
        text.truncate(text.len() - 10);
        fs::write(&path, text).unwrap();
        let (claimed, errors) = claim_all(dir.path(), "public.s");
        assert!(claimed.is_empty());
        assert_eq!(errors.len(), 1);
        let message = errors[0].to_string();
        assert!(
            message.contains("damaged") && message.contains("line 4"),
            "{message}"
        );
        assert!(path.with_extension("damaged").exists(), "kept, not dropped");
    }
}
