//! `pgsession migrate`, `pgsession prune`, and the command line's exit codes.

use crate::common::{closed_port_url, run, scalar, test_db};

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn migrate_creates_the_table_and_can_run_again() {
    let db = test_db().await;
    let exists = "SELECT to_regclass('public.session_store') IS NOT NULL";
    assert!(!scalar::<bool>(&db, exists).await);

    let out = run(&["migrate"], &[("DATABASE_URL", db.url())]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains(r#""public"."session_store""#),
        "{}",
        stdout(&out)
    );
    assert!(scalar::<bool>(&db, exists).await);
    let index: bool = scalar(
        &db,
        "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = 'public.session_store'::regclass \
         AND NOT indisprimary)",
    )
    .await;
    assert!(index, "no index on expire");

    let out = run(&["migrate"], &[("DATABASE_URL", db.url())]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("0 active, 0 expired"),
        "{}",
        stdout(&out)
    );

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
    let err = stderr(&out);
    assert!(
        err.contains("error: cannot reach the session database"),
        "{err}"
    );
    assert!(err.contains("2 attempts"), "{err}");
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
    assert!(stderr(&out).contains("--idle-timeout"), "{}", stderr(&out));

    let out = run(&["prune"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("DATABASE_URL"), "{}", stderr(&out));

    let out = run(&["serve", "--cookie-secure", "sometimes"], &[]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(
        &["serve"],
        &[("PGSESSION_SECRET", "a,,b"), ("PATH", "/nonexistent")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("PGSESSION_SECRET"),
        "{}",
        stderr(&out)
    );

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
    let out = run(&["migrate"], &[("DATABASE_URL", db.url())]);
    assert_eq!(out.status.code(), Some(0));
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
    let text = stdout(&out);
    assert!(text.contains("25 expired sessions"), "{text}");
    assert!(
        text.contains("deleted 25 expired sessions in 3 batches"),
        "{text}"
    );
    assert_eq!(
        scalar::<i64>(&db, "SELECT count(*) FROM session_store").await,
        3
    );

    let out = run(&["prune"], &[("DATABASE_URL", db.url())]);
    assert!(
        stdout(&out).contains("deleted 0 expired sessions in 1 batch\n"),
        "{}",
        stdout(&out)
    );
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
    assert!(
        stdout(&out).contains("deleted 12000 expired sessions in 13 batches"),
        "{}",
        stdout(&out)
    );
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
    assert!(
        stdout(&out).contains("another instance is pruning"),
        "{}",
        stdout(&out)
    );
}
