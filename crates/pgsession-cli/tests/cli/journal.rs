//! `pgsession journal list|replay|discard` on a dead-letter file written in
//! its documented format (one JSON document per line, see
//! `pgsession::dead_letter`), against a throwaway database. The fault
//! suite (`two_instances`) lists and replays a letter made by a real
//! write-back conflict.

use std::path::Path;

use crate::common::{closed_port_url, run, test_db};

/// Three session ids, told apart by their first characters.
const SID_CHANGED: &str = "aaaaaaSECRETchangedXXXXXXXXXXXXX";
const SID_DESTROYED: &str = "bbbbbbSECRETdestroyedXXXXXXXXXXX";
const SID_TAKEN: &str = "ccccccSECRETtakenXXXXXXXXXXXXXXX";

fn letter(sid: &str, kind: &str, write: &str) -> String {
    format!(
        r#"{{"at":"2030-01-01T00:00:00Z","table":"public.session_store","sid":"{sid}","kind":"{kind}","reason":"found something else","write":{write}}}"#
    )
}

/// A journal directory holding three dead letters: a save whose row had
/// changed, a destroy, and a save of a session whose id was taken.
fn journal_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("journal dir");
    let save = r#"{"op":"save","json":"{\"cookie\":{\"originalMaxAge\":null},\"views\":2}","expire":"2099-01-01T00:00:00Z"}"#;
    let lines = [
        letter(SID_CHANGED, "changed", save),
        letter(SID_DESTROYED, "changed", r#"{"op":"destroy"}"#),
        letter(SID_TAKEN, "id_taken", save),
    ];
    std::fs::write(
        dir.path().join("dead-letters.jsonl"),
        lines.join("\n") + "\n",
    )
    .expect("write the dead letters");
    dir
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn dir_env(dir: &Path) -> (&'static str, &str) {
    ("PGSESSION_JOURNAL_DIR", dir.to_str().expect("UTF-8 path"))
}

/// The sids of the letters left, in order.
fn sids_left(dir: &Path) -> Vec<String> {
    pgsession::dead_letter::read(dir)
        .expect("read the dead letters")
        .into_iter()
        .map(|l| l.sid)
        .collect()
}

#[test]
fn list_shows_letters_without_their_ids_and_needs_no_database() {
    let dir = journal_dir();
    let out = run(&["journal", "list"], &[dir_env(dir.path())]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("3 dead letters"), "{text}");
    for (n, prefix, kind, op) in [
        ("1", "aaaaaa…", "changed", "save"),
        ("2", "bbbbbb…", "changed", "destroy"),
        ("3", "cccccc…", "id_taken", "save"),
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{n}  2030-")))
            .unwrap_or_else(|| panic!("no line for #{n}: {text}"));
        assert!(
            line.contains(prefix) && line.contains(kind) && line.contains(op),
            "#{n}: {line}"
        );
    }
    for sid in [SID_CHANGED, SID_DESTROYED, SID_TAKEN] {
        assert!(!text.contains(sid), "a whole session id is shown: {text}");
        assert!(
            !text.contains("SECRET"),
            "more than a prefix is shown: {text}"
        );
    }
    assert!(!text.contains("views"), "session data is shown: {text}");

    // The flag works as the variable does; an empty directory has none.
    let empty = tempfile::tempdir().unwrap();
    let out = run(
        &[
            "journal",
            "list",
            "--journal-dir",
            empty.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("no dead letters"), "{}", stdout(&out));
}

#[tokio::test]
async fn replay_applies_letters_as_they_stand_and_removes_them() {
    let dir = journal_dir();
    let db = test_db().await;
    let migrated = run(
        &["migrate"],
        &[("DATABASE_URL", db.url()), dir_env(dir.path())],
    );
    assert_eq!(migrated.status.code(), Some(0));
    let client = db.client().await.unwrap();
    // What the table holds now: a newer document, and a session alive.
    client
        .batch_execute(&format!(
            "INSERT INTO session_store (sid, sess, expire) VALUES \
               ('{SID_CHANGED}', '{{\"views\":7}}', now() + interval '1 day'), \
               ('{SID_DESTROYED}', '{{\"views\":1}}', now() + interval '1 day')"
        ))
        .await
        .unwrap();
    let env = [dir_env(dir.path()), ("DATABASE_URL", db.url())];

    let out = run(&["journal", "replay", "2", "1"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("2 of 2 dead letters replayed"), "{text}");
    assert!(!text.contains(SID_CHANGED), "{text}");
    let views: Option<String> = client
        .query_opt(
            "SELECT sess->>'views' FROM session_store WHERE sid = $1",
            &[&SID_CHANGED],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    assert_eq!(
        views.as_deref(),
        Some("2"),
        "the journaled save replaced the row"
    );
    let destroyed: i64 = client
        .query_one(
            "SELECT count(*) FROM session_store WHERE sid = $1",
            &[&SID_DESTROYED],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(destroyed, 0, "the journaled destroy deleted the row");
    assert_eq!(sids_left(dir.path()), vec![SID_TAKEN.to_owned()]);

    // What is left is numbered from 1 again; a number past the end is a
    // usage error that changes nothing.
    let out = run(&["journal", "replay", "2"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no dead letter #2"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sids_left(dir.path()), vec![SID_TAKEN.to_owned()]);

    // A letter for another table is refused, naming the settings.
    let out = run(&["journal", "replay", "--all", "--table", "other"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("PGSESSION_TABLE"), "{}", stderr(&out));

    let out = run(&["journal", "replay", "--all"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(sids_left(dir.path()).is_empty());
    let out = run(&["journal", "replay", "--all"], &env);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("no dead letters"), "{}", stdout(&out));
    // The command made no journal file of its own in the directory.
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("journal-"))
        .collect();
    assert!(files.is_empty(), "{files:?}");
}

#[test]
fn replay_keeps_the_letters_when_the_database_cannot_be_reached() {
    let dir = journal_dir();
    let url = closed_port_url();
    let out = run(
        &["journal", "replay", "1"],
        &[
            dir_env(dir.path()),
            ("DATABASE_URL", &url),
            ("PGSESSION_STARTUP_RETRIES", "0"),
            ("PGSESSION_QUERY_TIMEOUT", "2s"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot reach"), "{}", stderr(&out));
    assert_eq!(sids_left(dir.path()).len(), 3, "nothing removed");

    // No database at all: a usage error.
    let out = run(&["journal", "replay", "1"], &[dir_env(dir.path())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("DATABASE_URL"), "{}", stderr(&out));
    assert_eq!(sids_left(dir.path()).len(), 3, "nothing removed");
}

#[test]
fn discard_removes_the_letters_chosen() {
    let dir = journal_dir();
    let env = [dir_env(dir.path())];
    let out = run(&["journal", "discard", "3", "1"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("2 dead letters removed"),
        "{}",
        stdout(&out)
    );
    assert_eq!(sids_left(dir.path()), vec![SID_DESTROYED.to_owned()]);
    let out = run(&["journal", "discard", "--all"], &env);
    assert_eq!(out.status.code(), Some(0));
    assert!(sids_left(dir.path()).is_empty());
    let out = run(&["journal", "list"], &env);
    assert!(stdout(&out).contains("no dead letters"), "{}", stdout(&out));
}

#[test]
fn bad_input_is_a_clear_error_never_a_panic() {
    let dir = journal_dir();
    let env = [dir_env(dir.path())];
    for (args, needle) in [
        (&["journal", "replay"][..], "required"),
        (&["journal", "discard", "0"], "dead letter number"),
        (&["journal", "discard", "x"], "dead letter number"),
        (&["journal", "discard", "1", "--all"], "cannot be used"),
        (&["journal", "discard", "4"], "1 to 3"),
        (&["journal", "frobnicate"], "unrecognized"),
    ] {
        let out = run(args, &env);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    assert_eq!(sids_left(dir.path()).len(), 3, "nothing removed");

    // A damaged line is named; nothing is guessed or dropped.
    let path = dir.path().join("dead-letters.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.insert_str(0, "not json\n");
    std::fs::write(&path, &text).unwrap();
    for args in [&["journal", "list"][..], &["journal", "discard", "--all"]] {
        let out = run(args, &env);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains("line 1"), "{}", stderr(&out));
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

    for args in [&["journal", "--help"][..], &["journal", "replay", "--help"]] {
        let out = run(args, &[]);
        assert_eq!(out.status.code(), Some(0));
        assert!(stdout(&out).contains("dead letter"), "{}", stdout(&out));
    }
}
