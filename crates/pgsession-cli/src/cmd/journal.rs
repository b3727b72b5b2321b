//! `pgsession journal`: the dead letters of a journal directory (journaled
//! writes the write-back left out because the row had moved on, the
//! session was destroyed, its id was taken, or the database refused them),
//! listed, replayed through a [`Store`], or discarded.
//!
//! Letters are numbered from 1, oldest first, as `list` shows them. Between
//! a `list` and a `replay` or `discard`, a running server may append
//! letters (at the end, so the numbers shown stay valid) and another
//! operator may remove some: a letter is removed from the file only if it
//! is still there as it was read, so a stale number never removes another
//! letter than the one acted on.
//!
//! Session ids are bearer secrets: nothing here prints more than the first
//! few characters of one, nor any session data.

use std::path::Path;

use anyhow::Context as _;
use pgsession::dead_letter::{self, DeadLetter, Write};
use pgsession::Store;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::args::{JournalAction, JournalArgs, JournalListArgs, JournalPickArgs};
use crate::cmd::{store_for_command, wait_ready};
use crate::UsageError;

/// Runs the command.
pub(crate) async fn run(args: JournalArgs) -> anyhow::Result<()> {
    match args.action {
        JournalAction::List(args) => list(args),
        JournalAction::Replay(args) => replay(args).await,
        JournalAction::Discard(args) => discard(args),
    }
}

fn list(args: JournalListArgs) -> anyhow::Result<()> {
    let (dir, _table) = args.store.journal_dir_and_table()?;
    let letters = read_letters(&dir)?;
    let file = dead_letter::path(&dir);
    if letters.is_empty() {
        println!("no dead letters in {}", file.display());
    } else {
        println!(
            "{} dead letter{} in {}:",
            letters.len(),
            plural(letters.len()),
            file.display()
        );
        println!(
            "{:>4}  {:<20}  {:<9}  {:<7}  {:<9}  {:>7}  {:<7}  {:<22}  reason",
            "N", "set aside (UTC)", "kind", "op", "session", "bytes", "expiry", "table"
        );
        let now = OffsetDateTime::now_utc();
        for (i, letter) in letters.iter().enumerate() {
            println!(
                "{:>4}  {:<20}  {:<9}  {:<7}  {:<9}  {:>7}  {:<7}  {:<22}  {}",
                i + 1,
                rfc3339_seconds(letter.at),
                letter.kind.as_str(),
                letter.write.op(),
                format!("{}…", letter.sid_prefix()),
                document_bytes(letter).map_or("-".to_owned(), |n| n.to_string()),
                expiry(letter, now),
                letter.table,
                one_line(&letter.reason),
            );
        }
        println!(
            "\n`pgsession journal replay N...` writes letters to the table as they stand \
             (whatever the row holds now); `pgsession journal discard N...` deletes them."
        );
    }
    let files = journal_files(&dir);
    if files.is_empty() {
        println!("no journal files in {}", dir.display());
    } else {
        println!("journal files in {}:", dir.display());
        for f in files {
            println!("  {f}");
        }
    }
    Ok(())
}

async fn replay(args: JournalPickArgs) -> anyhow::Result<()> {
    let (dir, table) = args.store.journal_dir_and_table()?;
    let letters = read_letters(&dir)?;
    let picked = pick(&letters, &args.numbers, args.all)?;
    if picked.is_empty() {
        println!("no dead letters in {}", dead_letter::path(&dir).display());
        return Ok(());
    }
    let foreign: Vec<String> = picked
        .iter()
        .filter(|(_, letter)| letter.table != table)
        .map(|(n, letter)| format!("#{n} is for table {}", letter.table))
        .collect();
    if !foreign.is_empty() {
        return Err(UsageError::new(format!(
            "{}, not {table}: set PGSESSION_SCHEMA and PGSESSION_TABLE (or --schema, --table) \
             to the letter's table",
            foreign.join(", ")
        ))
        .into());
    }
    // With the fallback off, this store neither creates a journal file nor
    // adopts the files of stopped servers: it only writes what it is told.
    let store = store_for_command(&args.store, |b| b)?;
    let result = replay_with(&store, &dir, picked).await;
    store.close().await;
    result
}

async fn replay_with(
    store: &Store,
    dir: &Path,
    picked: Vec<(usize, &DeadLetter)>,
) -> anyhow::Result<()> {
    wait_ready(store).await?;
    let mut landed: Vec<DeadLetter> = Vec::new();
    let mut failed = 0usize;
    for (n, letter) in &picked {
        match store.replay_dead_letter(letter).await {
            Ok(()) => {
                println!("#{n}: {} replayed", describe(letter));
                landed.push((*letter).clone());
            }
            Err(e) => {
                failed += 1;
                eprintln!("#{n}: {} failed, kept in the file: {e}", describe(letter));
            }
        }
    }
    let removed = remove_letters(dir, &landed)?;
    if removed < landed.len() {
        eprintln!(
            "{} replayed letter{} had already left the file",
            landed.len() - removed,
            plural(landed.len() - removed)
        );
    }
    println!(
        "{} of {} dead letter{} replayed and removed from {}",
        landed.len(),
        picked.len(),
        plural(picked.len()),
        dead_letter::path(dir).display()
    );
    if failed > 0 {
        anyhow::bail!(
            "{failed} dead letter{} could not be replayed (see above); run `pgsession journal \
             list` to see what is left",
            plural(failed)
        );
    }
    Ok(())
}

fn discard(args: JournalPickArgs) -> anyhow::Result<()> {
    let (dir, _table) = args.store.journal_dir_and_table()?;
    let letters = read_letters(&dir)?;
    let picked = pick(&letters, &args.numbers, args.all)?;
    if picked.is_empty() {
        println!("no dead letters in {}", dead_letter::path(&dir).display());
        return Ok(());
    }
    let chosen: Vec<DeadLetter> = picked.iter().map(|(_, l)| (*l).clone()).collect();
    let removed = remove_letters(&dir, &chosen)?;
    for (n, letter) in &picked {
        println!("#{n}: {} discarded", describe(letter));
    }
    println!(
        "{removed} dead letter{} removed from {}",
        plural(removed),
        dead_letter::path(&dir).display()
    );
    if removed < chosen.len() {
        eprintln!(
            "{} of them had already left the file",
            chosen.len() - removed
        );
    }
    Ok(())
}

/// The dead letters of `dir`, with an error naming the file.
fn read_letters(dir: &Path) -> anyhow::Result<Vec<DeadLetter>> {
    dead_letter::read(dir).with_context(|| {
        format!(
            "cannot read the dead letters in {} (PGSESSION_JOURNAL_DIR)",
            dead_letter::path(dir).display()
        )
    })
}

/// The letters numbered `numbers` (1-based), in the order given, each once;
/// every letter with `all`. A number past the end is a usage error.
fn pick<'a>(
    letters: &'a [DeadLetter],
    numbers: &[usize],
    all: bool,
) -> anyhow::Result<Vec<(usize, &'a DeadLetter)>> {
    if all {
        return Ok(letters
            .iter()
            .enumerate()
            .map(|(i, l)| (i + 1, l))
            .collect());
    }
    let mut picked: Vec<(usize, &DeadLetter)> = Vec::new();
    for &n in numbers {
        if n == 0 || n > letters.len() {
            return Err(UsageError::new(if letters.is_empty() {
                format!("no dead letter #{n}: there are none")
            } else {
                format!(
                    "no dead letter #{n}: there are {} (1 to {}); see `pgsession journal list`",
                    letters.len(),
                    letters.len()
                )
            })
            .into());
        }
        if !picked.iter().any(|(m, _)| *m == n) {
            picked.push((n, &letters[n - 1]));
        }
    }
    Ok(picked)
}

/// Removes each of `letters` once, if it is still in the file as read.
fn remove_letters(dir: &Path, letters: &[DeadLetter]) -> anyhow::Result<usize> {
    if letters.is_empty() {
        return Ok(0);
    }
    let mut left: Vec<&DeadLetter> = letters.iter().collect();
    dead_letter::remove(dir, |_, letter| {
        match left.iter().position(|l| *l == letter) {
            Some(i) => {
                left.swap_remove(i);
                true
            }
            None => false,
        }
    })
    .with_context(|| format!("cannot rewrite {}", dead_letter::path(dir).display()))
}

/// `kind save of session abc123…`, for the messages.
fn describe(letter: &DeadLetter) -> String {
    format!(
        "{} {} of session {}…",
        letter.kind.as_str(),
        letter.write.op(),
        letter.sid_prefix()
    )
}

fn document_bytes(letter: &DeadLetter) -> Option<usize> {
    match &letter.write {
        Write::Save { json, .. } => Some(json.len()),
        _ => None,
    }
}

/// Whether the write's expiry has passed (a replayed expired save is a row
/// no one can load, pruned later).
fn expiry(letter: &DeadLetter, now: OffsetDateTime) -> &'static str {
    match &letter.write {
        Write::Save { expire, .. } | Write::Touch { expire } if *expire < now => "expired",
        Write::Save { .. } | Write::Touch { .. } => "live",
        _ => "-",
    }
}

fn rfc3339_seconds(at: OffsetDateTime) -> String {
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&Rfc3339).unwrap_or_default()
}

/// The reason on one line, whatever it holds.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// One line per journal file of `dir` (`journal-*.log`, and `*.damaged`
/// set aside), as the library reads it: its live entries, and whether a
/// running store holds it.
fn journal_files(dir: &Path) -> Vec<String> {
    use pgsession::dead_letter::JournalFileState as State;
    pgsession::dead_letter::journal_files(dir)
        .into_iter()
        .map(|file| {
            let name = file
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let state = match file.state {
                State::Damaged => "damaged, set aside: read it by hand",
                State::Held => "held by a running store",
                State::Left => {
                    "left by a stopped store: the next store started on this directory \
                     writes it back"
                }
                State::Unreadable => "cannot be opened",
            };
            let entries = file.live_entries.map_or("?".to_owned(), |n| n.to_string());
            format!("{name}: {entries} live entries, {state}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgsession::dead_letter::Conflict;

    fn letter(sid: &str) -> DeadLetter {
        DeadLetter {
            at: time::macros::datetime!(2030-01-01 00:00 UTC),
            table: "public.session_store".into(),
            sid: sid.into(),
            kind: Conflict::Changed,
            reason: "found a document\nthis instance never saw".into(),
            write: Write::Save {
                json: r#"{"views":2}"#.into(),
                expire: time::macros::datetime!(2030-01-02 00:00 UTC),
            },
        }
    }

    #[test]
    fn numbers_pick_letters_once_and_out_of_range_is_a_usage_error() {
        let letters = vec![letter("aaaaaaaa"), letter("bbbbbbbb")];
        let picked = pick(&letters, &[2, 2, 1], false).unwrap();
        assert_eq!(
            picked.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(pick(&letters, &[], true).unwrap().len(), 2);
        let err = pick(&letters, &[3], false).unwrap_err();
        assert!(err.is::<UsageError>(), "{err}");
        assert!(err.to_string().contains("1 to 2"), "{err}");
        let err = pick(&[], &[1], false).unwrap_err();
        assert!(err.to_string().contains("there are none"), "{err}");
    }

    #[test]
    fn descriptions_show_a_prefix_only() {
        let text = describe(&letter("0123456789abcdef"));
        assert_eq!(text, "changed save of session 012345…");
        assert_eq!(one_line("a\nb  c"), "a b c");
        assert_eq!(
            expiry(&letter("x"), time::macros::datetime!(2031-01-01 00:00 UTC)),
            "expired"
        );
    }
}
