//! `pgsession migrate`, `pgsession prune`, and the command line's exit codes.

use crate::common::{closed_port_url, run, scalar, test_db};

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts that `output`'s stdout contains `needle`, showing the whole of it if not.
#[track_caller]
fn assert_stdout_contains(output: &std::process::Output, needle: &str) {
    let text = stdout(output);
    assert!(text.contains(needle), "{text}");
}

/// Asserts that `output`'s stderr contains `needle`, showing the whole of it if not.
#[track_caller]
fn assert_stderr_contains(output: &std::process::Output, needle: &str) {
    let text = stderr(output);
    assert!(text.contains(needle), "{text}");
}

/// `pgsession migrate` on `db`, which must exit 0.
#[track_caller]
fn migrate(db: &pgsession_testkit::TestDb) -> std::process::Output {
    let out = run(&["migrate"], &[("DATABASE_URL", db.url())]);
    assert_eq!(out.status.code(), Some(0));
    out
}

#[tokio::test]
async fn migrate_creates_the_table_and_can_run_again() {
    let db = test_db().await;
    let exists = "SELECT to_regclass('public.session_store') IS NOT NULL";
    assert!(!scalar::<bool>(&db, exists).await);

    let out = migrate(&db);
    assert_stdout_contains(&out, r#""public"."session_store""#);
    assert!(scalar::<bool>(&db, exists).await);
    let index: bool = scalar(
        &db,
        "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = 'public.session_store'::regclass \
         AND NOT indisprimary)",
    )
    .await;
    assert!(index, "no index on expire");

    let out = migrate(&db);
    assert_stdout_contains(&out, "0 active, 0 expired");

    // Another schema and table, from flags.
    let out = run(
        &[
            "migrate",
            "--database-url",
            db.url(),
            "--schema",
            "auth",
            "--table",
            "web_sessions",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(scalar::<bool>(&db, "SELECT to_regclass('auth.web_sessions') IS NOT NULL").await);
}

#[tokio::test]
async fn migrate_fails_with_1_when_the_database_cannot_be_reached() {
    let url = closed_port_url();
    let out = run(
        &["migrate"],
        &[
            ("DATABASE_URL", &url),
            ("PGSESSION_STARTUP_RETRIES", "1"),
            ("PGSESSION_STARTUP_BACKOFF", "100ms"),
            ("PGSESSION_QUERY_TIMEOUT", "2s"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_contains(&out, "error: cannot reach the session database");
    assert_stderr_contains(&out, "2 attempts");
}

#[test]
fn usage_errors_exit_2_and_name_the_setting() {
    let out = run(
        &["migrate"],
        &[
            ("DATABASE_URL", "postgres://localhost/x"),
            ("PGSESSION_POOL_SIZE", "many"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("pool_size") && err.contains("PGSESSION_POOL_SIZE"),
        "{err}"
    );

    let out = run(
        &["migrate", "--idle-timeout", "soon"],
        &[("DATABASE_URL", "postgres://localhost/x")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_contains(&out, "--idle-timeout");

    let out = run(&["prune"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_contains(&out, "DATABASE_URL");

    let out = run(&["serve", "--cookie-secure", "sometimes"], &[]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(
        &["serve"],
        &[("PGSESSION_SECRET", "a,,b"), ("PATH", "/nonexistent")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_contains(&out, "PGSESSION_SECRET");

    let out = run(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let out = run(
        &["serve", "--help"],
        &[("DATABASE_URL", "postgres://u:hunter2@db/x")],
    );
    assert_eq!(out.status.code(), Some(0));
    let help = stdout(&out);
    assert!(
        help.contains("--database-url") && help.contains("PGSESSION_POOL_SIZE"),
        "{help}"
    );
    assert!(
        !help.contains("hunter2"),
        "the URL's password is shown in --help"
    );
}

#[tokio::test]
async fn prune_deletes_expired_rows_and_says_how_many() {
    let db = test_db().await;
    migrate(&db);
    let client = db.client().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO session_store (sid, sess, expire) \
               SELECT 'old' || i, '{\"cookie\":{}}', (now() AT TIME ZONE 'UTC') - interval '1 hour' \
               FROM generate_series(1, 25) i; \
             INSERT INTO session_store (sid, sess, expire) \
               SELECT 'live' || i, '{\"cookie\":{}}', (now() AT TIME ZONE 'UTC') + interval '1 hour' \
               FROM generate_series(1, 3) i;",
        )
        .await
        .unwrap();

    let out = run(
        &["prune"],
        &[
            ("DATABASE_URL", db.url()),
            ("PGSESSION_PRUNE_BATCH_SIZE", "10"),
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_stdout_contains(&out, "25 expired sessions");
    assert_stdout_contains(&out, "deleted 25 expired sessions in 3 batches");
    assert_eq!(
        scalar::<i64>(&db, "SELECT count(*) FROM session_store").await,
        3
    );

    let out = run(&["prune"], &[("DATABASE_URL", db.url())]);
    assert_stdout_contains(&out, "deleted 0 expired sessions in 1 batch\n");
}

#[tokio::test]
async fn prune_many_rows() {
    let db = test_db().await;
    assert_eq!(
        run(&["migrate"], &[("DATABASE_URL", db.url())])
            .status
            .code(),
        Some(0)
    );
    let client = db.client().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO session_store (sid, sess, expire) \
               SELECT 'old' || i, '{\"cookie\":{}}', (now() AT TIME ZONE 'UTC') - interval '1 day' \
               FROM generate_series(1, 12000) i",
        )
        .await
        .unwrap();
    let out = run(&["prune"], &[("DATABASE_URL", db.url())]);
    assert_eq!(out.status.code(), Some(0));
    assert_stdout_contains(&out, "deleted 12000 expired sessions in 13 batches");
    assert_eq!(
        scalar::<i64>(&db, "SELECT count(*) FROM session_store").await,
        0
    );
}

#[tokio::test]
async fn prune_says_when_another_instance_is_pruning() {
    let db = test_db().await;
    assert_eq!(
        run(&["migrate"], &[("DATABASE_URL", db.url())])
            .status
            .code(),
        Some(0)
    );
    let holder = db.client().await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_lock(hashtext('pgsession:prune:public.session_store'))",
            &[],
        )
        .await
        .unwrap();
    let out = run(&["prune"], &[("DATABASE_URL", db.url())]);
    assert_eq!(out.status.code(), Some(0));
    assert_stdout_contains(&out, "another instance is pruning");
}
