//! Pruning: only expired rows, in batches, one instance at a time.

use std::time::Duration;

use pgsession::PruneOutcome;

use crate::common::*;

async fn fill(db: &pgsession_testkit::TestDb, expired: usize, live: usize) {
    let client = db.client().await.unwrap();
    client
        .execute(
            "INSERT INTO session_store (sid, sess, expire) \
             SELECT 'old' || g, '{}', (now() AT TIME ZONE 'UTC') - interval '1 hour' FROM generate_series(1, $1::int) g",
            &[&(expired as i32)],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO session_store (sid, sess, expire) \
             SELECT 'new' || g, '{}', (now() AT TIME ZONE 'UTC') + interval '1 hour' FROM generate_series(1, $1::int) g",
            &[&(live as i32)],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn prune_deletes_only_expired_rows_in_batches() {
    let db = test_db().await;
    let store = store_with(config(db.url()).prune_batch_size(10)).await;
    fill(&db, 35, 5).await;

    let mut progress = Vec::new();
    let outcome = store
        .prune_with_progress(|n| progress.push(n))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        PruneOutcome::Pruned {
            deleted: 35,
            batches: 4
        }
    );
    assert_eq!(progress, vec![10, 20, 30, 35]);
    let left: i64 = scalar(&db, "SELECT count(*) FROM session_store").await;
    let live_left: i64 = scalar(
        &db,
        "SELECT count(*) FROM session_store WHERE sid LIKE 'new%'",
    )
    .await;
    assert_eq!((left, live_left), (5, 5));
    // Nothing left to do.
    assert_eq!(
        store.prune().await.unwrap(),
        PruneOutcome::Pruned {
            deleted: 0,
            batches: 1
        }
    );
    store.close().await;
}

#[tokio::test]
async fn a_prune_is_skipped_while_another_instance_holds_the_lock() {
    let db = test_db().await;
    let store = store(&db).await;
    fill(&db, 3, 0).await;
    let other = db.client().await.unwrap();
    let key = "pgsession:prune:public.session_store";
    let locked: bool = other
        .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(locked);
    assert_eq!(store.prune().await.unwrap(), PruneOutcome::Skipped);
    let left: i64 = scalar(&db, "SELECT count(*) FROM session_store").await;
    assert_eq!(left, 3);

    other
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&key])
        .await
        .unwrap();
    assert_eq!(
        store.prune().await.unwrap(),
        PruneOutcome::Pruned {
            deleted: 3,
            batches: 1
        }
    );
    store.close().await;
}

#[tokio::test]
async fn two_pruners_at_once_never_both_run() {
    let db = test_db().await;
    let a = store_with(config(db.url()).prune_batch_size(5)).await;
    let b = store_with(config(db.url()).prune_batch_size(5)).await;
    fill(&db, 3000, 0).await;
    let (ra, rb) = tokio::join!(a.prune(), b.prune());
    let outcomes = [ra.unwrap(), rb.unwrap()];
    let ran: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, PruneOutcome::Pruned { .. }))
        .collect();
    let skipped = outcomes
        .iter()
        .filter(|o| **o == PruneOutcome::Skipped)
        .count();
    // Started together on 600 batches of work: one holds the lock, the
    // other finds it taken.
    assert_eq!((ran.len(), skipped), (1, 1), "{outcomes:?}");
    assert_eq!(
        *ran[0],
        PruneOutcome::Pruned {
            deleted: 3000,
            batches: 601
        }
    );
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn the_pruner_runs_on_its_schedule_and_stops_with_the_store() {
    let db = test_db().await;
    let store = store_with(config(db.url()).prune_interval(Duration::from_millis(200))).await;
    fill(&db, 20, 2).await;
    // No call: the store prunes by default.
    let rows = "SELECT count(*) FROM session_store";
    wait_for_count(&db, rows, 2, "the pruner to prune").await;
    store.close().await;
    // Closed: its pruner has ended (`close` waits for its tasks) and its
    // connections go away, so nothing of it is left to delete rows. Wait
    // until the server has seen the last of them go, rather than for a
    // while.
    let connections = "SELECT count(*) FROM pg_stat_activity \
                       WHERE datname = current_database() AND application_name = 'pgsession'";
    wait_for_count(&db, connections, 0, "the closed store's connections to go").await;
    // Expired rows written now stay: no connection of the store comes back.
    fill(&db, 5, 0).await;
    let left: i64 = scalar(&db, "SELECT count(*) FROM session_store").await;
    assert_eq!(left, 7);
    let open: i64 = scalar(&db, connections).await;
    assert_eq!(open, 0, "the closed store connected again");
}

/// Polls `sql` (a count) until it is `want`; fails after 30 s.
async fn wait_for_count(db: &pgsession_testkit::TestDb, sql: &str, want: i64, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let count: i64 = scalar(db, sql).await;
        if count == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {count}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
