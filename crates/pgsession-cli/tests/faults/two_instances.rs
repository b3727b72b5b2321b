//! Two `serve` instances on one table: A reaches PostgreSQL through the
//! fault proxy, B directly, both with the same secret (a cookie works on
//! either) and each with a journal directory of its own. A is cut off
//! (the proxy resets its connections and refuses new ones) while B goes
//! on, then A's link returns and A writes its journal back.
//!
//! - A newer write made on B while A was cut off is not undone by A's
//!   write-back: A reports a conflict and keeps its own acknowledged write
//!   as a dead letter, which `pgsession journal` lists and replays.
//! - A logout on B while A was cut off stays a logout: A's journaled write
//!   does not bring the session back.
//! - A logout on A while A is cut off clears the cookie at once, and the
//!   session is gone on B once A's link returns; the figures give how long
//!   B still accepted the old id (the window SECURITY.md states).
//! - A login (`regenerate`) on A while A is cut off leaves the old id dead
//!   on B after the write-back.

use std::path::Path;
use std::time::{Duration, Instant};

use pgsession::dead_letter::{self, Conflict, Write};
use serde_json::Value;

use crate::common::{rows_with_sid, run, sid_of, ServeProcess};
use crate::support::{base, health, http, ms, send, wait_settled, Figures, Rig};

/// A's `breaker_max_cool_down`: once its link returns, A probes within
/// this (the default, 30 s, would stretch the scenarios and the logout
/// window alike).
const A_MAX_COOL_DOWN: &str = "2s";

/// How long A may take to write its journal back once its link returns.
const SETTLE_BOUND: Duration = Duration::from_secs(60);

/// Both instances, the proxy between A and the database, and A's journal
/// directory.
struct Pair {
    /// A: through the proxy.
    a: ServeProcess,
    /// B: straight to the database.
    b: ServeProcess,
    rig: Rig,
    a_journal: tempfile::TempDir,
    _b_journal: tempfile::TempDir,
    http: reqwest::Client,
}

impl Pair {
    async fn start() -> Pair {
        let rig = Rig::new().await;
        let a_journal = tempfile::tempdir().expect("A's journal directory");
        let b_journal = tempfile::tempdir().expect("B's journal directory");
        let a_dir = a_journal.path().to_str().expect("UTF-8 path").to_owned();
        let b_dir = b_journal.path().to_str().expect("UTF-8 path").to_owned();
        let a = ServeProcess::start_ready(
            &rig.proxied_url(),
            &[
                ("PGSESSION_JOURNAL_DIR", &a_dir),
                ("PGSESSION_BREAKER_MAX_COOL_DOWN", A_MAX_COOL_DOWN),
            ],
        )
        .await;
        let b =
            ServeProcess::start_ready(rig.direct_url(), &[("PGSESSION_JOURNAL_DIR", &b_dir)]).await;
        Pair {
            a,
            b,
            rig,
            a_journal,
            _b_journal: b_journal,
            http: http(),
        }
    }

    /// A loses its link: open connections reset, new ones refused.
    fn cut_a(&self) {
        self.rig.proxy.refuse(true);
        self.rig.proxy.reset_all();
    }

    /// A's link returns.
    fn heal_a(&self) {
        self.rig.proxy.heal();
    }

    fn a_dir(&self) -> &Path {
        self.a_journal.path()
    }

    async fn call(
        &self,
        on: &ServeProcess,
        method: &str,
        path: &str,
        cookie: Option<&str>,
        body: Option<&str>,
    ) -> crate::common::Answer {
        send(&self.http, &base(on), method, path, cookie, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"))
    }

    /// `POST /counter` on `on`, which must answer 200 with `views`.
    async fn count(&self, on: &ServeProcess, cookie: &str, views: u64) {
        let a = self.call(on, "POST", "/counter", Some(cookie), None).await;
        assert_eq!(a.status, 200, "POST /counter: {}\n{}", a.body, on.stderr());
        assert_eq!(a.json()["views"].as_u64(), Some(views), "{}", a.body);
    }

    /// A user logged in on B, with `views` counted on B, whose session A
    /// has read (and so holds in its cache).
    async fn user_read_by_a(&self, name: &str, views: u64) -> String {
        let body = format!(r#"{{"user":"{name}"}}"#);
        let login = self
            .call(&self.b, "POST", "/login", None, Some(&body))
            .await;
        assert_eq!(login.status, 200, "{}", login.body);
        let cookie = login.cookie.expect("login sets a cookie");
        for n in 1..=views {
            self.count(&self.b, &cookie, n).await;
        }
        let me = self.call(&self.a, "GET", "/me", Some(&cookie), None).await;
        assert_eq!(me.status, 200, "A reads the session: {}", me.body);
        assert_eq!(me.json()["views"].as_u64(), Some(views), "{}", me.body);
        cookie
    }

    /// A's `/health`.
    async fn a_health(&self) -> Value {
        health(&self.http, &base(&self.a))
            .await
            .expect("A's /health")
    }

    /// A's journal entries (from `/health`).
    async fn a_journal_entries(&self) -> u64 {
        self.a_health().await["journal"]["entries"]
            .as_u64()
            .unwrap_or(0)
    }

    /// `views` and `user` of the row of `sid`, read directly; `None` when
    /// there is no row.
    async fn row(&self, sid: &str) -> Option<(Option<u64>, Option<String>)> {
        let client = self.rig.db.client().await.expect("direct connection");
        client
            .query_opt(
                "SELECT (sess->>'views')::bigint, sess->>'user' FROM session_store WHERE sid = $1",
                &[&sid],
            )
            .await
            .expect("read a row")
            .map(|row| (row.get::<_, Option<i64>>(0).map(|v| v as u64), row.get(1)))
    }
}

/// Events of `kind` in a `/health` body.
fn events(h: &Value, kind: &str) -> Vec<String> {
    h["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Whether a response clears the session cookie.
fn clears_cookie(answer: &crate::common::Answer) -> bool {
    answer
        .set_cookies
        .iter()
        .any(|c| c.starts_with("connect.sid=;") && c.contains("1970"))
}

/// Scenario 1, and the dead letter it leaves (D): the user counts to 1 on
/// B, A reads it, A is cut off and acknowledges one increment (views 2)
/// from its journal, B counts on to 6. After A's link returns the table
/// holds 6, A reports a `changed` conflict, and its write is a dead letter,
/// which `pgsession journal` lists (without the id) and replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_back_never_undoes_a_newer_write_on_the_other_instance() {
    let pair = Pair::start().await;
    let cookie = pair.user_read_by_a("ann", 1).await;
    let sid = sid_of(&cookie);

    pair.cut_a();
    let cut_at = Instant::now();
    // A answers from its cache and journal.
    pair.count(&pair.a, &cookie, 2).await;
    assert_eq!(pair.a_journal_entries().await, 1, "A journaled the write");
    // B goes on from the database's state.
    for views in 2..=6 {
        pair.count(&pair.b, &cookie, views).await;
    }
    pair.heal_a();
    let healed = Instant::now();
    let settle = wait_settled(&pair.http, &pair.a, SETTLE_BOUND).await;
    let h = pair.a_health().await;

    let stored = pair.row(&sid).await;
    let letters = dead_letter::read(pair.a_dir()).expect("A's dead letters");
    let conflicts = h["journal"]["conflicts"].as_u64().unwrap_or(0);
    let on_b = pair
        .call(&pair.b, "GET", "/counter", Some(&cookie), None)
        .await;
    let on_a = pair
        .call(&pair.a, "GET", "/counter", Some(&cookie), None)
        .await;

    Figures::new("two_instances_newer_write")
        .set("cut_ms", ms(healed - cut_at))
        .set("settle_ms", ms(settle))
        .set(
            "stored_views",
            stored.as_ref().and_then(|r| r.0).map_or(-1, |v| v as i64),
        )
        .set("conflicts", conflicts)
        .set("dead_letters", letters.len())
        .set("views_on_a", &on_a.body)
        .set("views_on_b", &on_b.body)
        .print();

    assert_eq!(
        stored.as_ref().and_then(|r| r.0),
        Some(6),
        "B's acknowledged writes were undone: row {stored:?}\n{}",
        pair.a.stderr()
    );
    assert_eq!(on_b.json()["views"], 6, "{}", on_b.body);
    assert_eq!(
        on_a.json()["views"],
        6,
        "A serves the table's state: {}",
        on_a.body
    );
    assert!(conflicts >= 1, "no conflict reported: {h}");
    assert!(!events(&h, "conflict").is_empty(), "no conflict event: {h}");
    assert!(
        !events(&h, "dead_letter").is_empty(),
        "no dead_letter event: {h}"
    );
    assert!(h["journal"]["dead_letters"].as_u64() >= Some(1), "{h}");
    assert!(
        pair.a.stderr().contains("write-back conflict (changed)"),
        "no WARN log of the conflict\n{}",
        pair.a.stderr()
    );
    let mine: Vec<_> = letters.iter().filter(|l| l.sid == sid).collect();
    assert_eq!(mine.len(), 1, "{letters:?}");
    let letter = mine[0];
    assert_eq!(letter.kind, Conflict::Changed);
    let Write::Save { json, .. } = &letter.write else {
        panic!("the dead letter is not A's save: {letter:?}");
    };
    let kept: Value = serde_json::from_str(json).expect("the letter's document");
    assert_eq!(kept["views"], 2, "A's acknowledged write is kept aside");
    assert_eq!(kept["user"], "ann");

    // D: the command lists the letter (without the whole id) and, asked
    // to, replays it: the operator chose A's write over B's.
    let dir = pair.a_dir().to_str().expect("UTF-8 path").to_owned();
    let listed = run(&["journal", "list"], &[("PGSESSION_JOURNAL_DIR", &dir)]);
    assert_eq!(listed.status.code(), Some(0));
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        text.contains("1 dead letter") && text.contains("changed") && text.contains("save"),
        "{text}"
    );
    assert!(text.contains(&sid[..6]), "the id's prefix is shown: {text}");
    assert!(
        !text.contains(&sid),
        "the whole session id is shown: {text}"
    );
    let replayed = run(
        &["journal", "replay", "1"],
        &[
            ("PGSESSION_JOURNAL_DIR", &dir),
            ("DATABASE_URL", pair.rig.direct_url()),
        ],
    );
    assert_eq!(replayed.status.code(), Some(0));
    assert_eq!(pair.row(&sid).await.and_then(|r| r.0), Some(2));
    assert!(dead_letter::read(pair.a_dir()).unwrap().is_empty());
}

/// Scenario 2: the user logs out on B while A, cut off, holds a journaled
/// write of the session. A's write-back does not bring it back: no row,
/// the old cookie logged out on both, a `destroyed` conflict reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_the_other_instance_stays_a_logout() {
    let pair = Pair::start().await;
    let cookie = pair.user_read_by_a("bob", 1).await;
    let sid = sid_of(&cookie);

    pair.cut_a();
    pair.count(&pair.a, &cookie, 2).await;
    assert_eq!(pair.a_journal_entries().await, 1, "A journaled the write");
    let out = pair
        .call(&pair.b, "POST", "/logout", Some(&cookie), None)
        .await;
    assert_eq!(out.status, 204, "{}", out.body);
    pair.heal_a();
    let settle = wait_settled(&pair.http, &pair.a, SETTLE_BOUND).await;
    let h = pair.a_health().await;

    let rows = rows_with_sid(&pair.rig.db, &sid).await;
    let me_a = pair.call(&pair.a, "GET", "/me", Some(&cookie), None).await;
    let me_b = pair.call(&pair.b, "GET", "/me", Some(&cookie), None).await;
    let letters = dead_letter::read(pair.a_dir()).expect("A's dead letters");

    Figures::new("two_instances_logout_on_b")
        .set("settle_ms", ms(settle))
        .set("rows_after", rows)
        .set("me_on_a", me_a.status)
        .set("me_on_b", me_b.status)
        .set("conflicts", &h["journal"]["conflicts"])
        .set("dead_letters", letters.len())
        .print();

    assert_eq!(
        rows,
        0,
        "the logged-out session was brought back\n{}",
        pair.a.stderr()
    );
    assert_eq!(me_a.status, 401, "A: {}", me_a.body);
    assert_eq!(me_b.status, 401, "B: {}", me_b.body);
    assert!(h["journal"]["conflicts"].as_u64() >= Some(1), "{h}");
    assert!(
        events(&h, "conflict")
            .iter()
            .any(|m| m.contains("destroyed")),
        "no destroyed conflict event: {h}"
    );
    assert!(
        letters
            .iter()
            .any(|l| l.sid == sid && l.kind == Conflict::Destroyed),
        "{letters:?}"
    );
}

/// Scenario 2, the other way: the user logs out on A while A is cut off.
/// The answer clears the cookie; B still accepts the old id until A's
/// journaled destroy lands, and not after. The window is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_during_the_cut_ends_the_session_on_both_once_written_back() {
    /// How long A stays cut off after the logout.
    const CUT: Duration = Duration::from_secs(2);
    let pair = Pair::start().await;
    let cookie = pair.user_read_by_a("cat", 1).await;
    let sid = sid_of(&cookie);

    pair.cut_a();
    let out = pair
        .call(&pair.a, "POST", "/logout", Some(&cookie), None)
        .await;
    let logged_out = Instant::now();
    assert_eq!(out.status, 204, "{}\n{}", out.body, pair.a.stderr());
    assert!(
        clears_cookie(&out),
        "the cookie is not cleared: {:?}",
        out.set_cookies
    );
    assert_eq!(pair.a_journal_entries().await, 1, "A journaled the destroy");
    let me_a = pair.call(&pair.a, "GET", "/me", Some(&cookie), None).await;
    assert_eq!(
        me_a.status, 401,
        "A still accepts the old id: {}",
        me_a.body
    );

    // B accepts the old id meanwhile: its row is still there.
    let mut accepted_on_b = 0usize;
    let mut healed = None;
    let gone_on_b = loop {
        let me = pair.call(&pair.b, "GET", "/me", Some(&cookie), None).await;
        match me.status {
            200 => accepted_on_b += 1,
            401 => break Instant::now(),
            other => panic!("B: /me {other} {}", me.body),
        }
        if healed.is_none() && logged_out.elapsed() >= CUT {
            pair.heal_a();
            healed = Some(Instant::now());
        }
        assert!(
            logged_out.elapsed() < CUT + SETTLE_BOUND,
            "B still accepts the old id {SETTLE_BOUND:?} after A's link returned\n{}",
            pair.a.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let healed = healed.expect("A's link returned before B saw the logout");
    let settle = wait_settled(&pair.http, &pair.a, SETTLE_BOUND).await;
    let rows = rows_with_sid(&pair.rig.db, &sid).await;
    let h = pair.a_health().await;

    Figures::new("logout_window")
        .set("cut_after_logout_ms", ms(healed - logged_out))
        .set("logout_to_gone_on_b_ms", ms(gone_on_b - logged_out))
        .set(
            "link_back_to_gone_on_b_ms",
            ms(gone_on_b.saturating_duration_since(healed)),
        )
        .set("b_accepted_old_id", accepted_on_b)
        .set("a_breaker_max_cool_down", A_MAX_COOL_DOWN)
        .set("settle_ms", ms(settle))
        .set("rows_after", rows)
        .set("conflicts", &h["journal"]["conflicts"])
        .print();

    assert!(
        gone_on_b >= healed,
        "B saw the logout before A's link returned"
    );
    assert_eq!(rows, 0);
    assert_eq!(h["journal"]["conflicts"], 0, "a destroy always lands: {h}");
}

/// Scenario 3: a login (`regenerate`) on A while A is cut off, with the
/// cookie of an existing session: once A's journal is written back, the
/// old id is dead on B and the new one is logged in there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_during_the_cut_leaves_the_old_id_dead() {
    let pair = Pair::start().await;
    let cookie = pair.user_read_by_a("dan", 2).await;
    let old_sid = sid_of(&cookie);

    pair.cut_a();
    let login = pair
        .call(
            &pair.a,
            "POST",
            "/login",
            Some(&cookie),
            Some(r#"{"user":"dan2"}"#),
        )
        .await;
    assert_eq!(login.status, 200, "{}\n{}", login.body, pair.a.stderr());
    let new_cookie = login.cookie.expect("login sets a cookie");
    let new_sid = sid_of(&new_cookie);
    assert_ne!(new_sid, old_sid, "regenerate gave a new id");
    assert_eq!(
        pair.a_journal_entries().await,
        2,
        "the destroy and the new session"
    );
    pair.heal_a();
    let settle = wait_settled(&pair.http, &pair.a, SETTLE_BOUND).await;
    let h = pair.a_health().await;

    let old_rows = rows_with_sid(&pair.rig.db, &old_sid).await;
    let new_row = pair.row(&new_sid).await;
    let old_on_b = pair.call(&pair.b, "GET", "/me", Some(&cookie), None).await;
    let old_on_a = pair.call(&pair.a, "GET", "/me", Some(&cookie), None).await;
    let new_on_b = pair
        .call(&pair.b, "GET", "/me", Some(&new_cookie), None)
        .await;

    Figures::new("two_instances_regenerate")
        .set("settle_ms", ms(settle))
        .set("old_rows_after", old_rows)
        .set("old_id_on_b", old_on_b.status)
        .set("old_id_on_a", old_on_a.status)
        .set("new_id_on_b", new_on_b.status)
        .set("conflicts", &h["journal"]["conflicts"])
        .print();

    assert_eq!(old_rows, 0, "the old id's row is still there");
    assert_eq!(old_on_b.status, 401, "B: {}", old_on_b.body);
    assert_eq!(old_on_a.status, 401, "A: {}", old_on_a.body);
    assert_eq!(new_on_b.status, 200, "B: {}", new_on_b.body);
    assert_eq!(new_on_b.json()["user"], "dan2");
    assert_eq!(new_row.and_then(|r| r.1).as_deref(), Some("dan2"));
    assert_eq!(h["journal"]["conflicts"], 0, "{h}");
}
