//! Node ↔ Rust session interoperability, end to end: the reference Express
//! app in `interop/node` (express-session 1.19 + connect-pg-simple 10, real
//! npm packages) and `pgsession serve` run as two processes on 127.0.0.1,
//! share one PostgreSQL table (`session_store`) and the same secrets, and
//! each test passes the `connect.sid` cookie from one to the other by hand.
//!
//! Covered: a session made on one side is read and changed on the other (both
//! ways); logout on either side ends the session on both and deletes the row;
//! a cookie signed with the old secret is accepted by both (and one signed
//! with an unknown secret by neither); login on either side destroys the
//! session the cookie carried; the row Rust writes has express-session's
//! shape, connect-pg-simple's `expire`, and is read and rewritten by Node
//! without error; a session Node changes while the Rust server is cut off
//! from the database (through the test kit's fault proxy) and journals a
//! write of it is a write-back conflict, and Node's value is kept.
//!
//! Needs `node` (>= 20.9) and `npm`: `interop/node/node_modules` is installed
//! with `npm ci` when it is missing or older than `package-lock.json`. The
//! test fails, never skips, when they are missing.

mod common;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use pgsession::cookie::{encode_cookie_value, sign, unsign, Secrets};
use pgsession_testkit::TestDb;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime};

/// The secrets both servers get: the first signs, both verify.
const SECRETS: &str = "new-secret,old-secret";
/// The shared table.
const TABLE: &str = "session_store";
/// The cookie both sides use.
const COOKIE_NAME: &str = "connect.sid";
/// How long a server may take to become ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one scenario may take once both servers run.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(120);
/// The test database's default time zone: anything but UTC.
const DB_TIME_ZONE: &str = "America/Anchorage";
/// How long `npm ci` may take.
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------

/// Scenario 1: made by Node, read and changed by Rust, Node sees the change.
/// Keys Rust does not know (here `cart`, put in by SQL as another Node
/// handler would) survive Rust's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_session_is_read_and_changed_by_rust() {
    Interop::run(|env| async move {
        let (node, rust) = (&env.node, &env.rust);
        let login = env
            .post(node, "/login", None, json!({"user": "alice"}))
            .await?;
        login.expect(200, json!({"user": "alice"}))?;
        let cookie = login.session_cookie()?;
        let sid = env.sid_of(&cookie)?;

        env.post(node, "/counter", Some(&cookie), json!({}))
            .await?
            .expect(200, json!({"views": 1}))?;
        env.post(node, "/counter", Some(&cookie), json!({}))
            .await?
            .expect(200, json!({"views": 2}))?;
        let node_row = env
            .row(&sid)
            .await?
            .context("Node's session row is missing")?;
        check_express_session_shape(&node_row, "written by Node")?;

        // Another Node handler stored something Rust's server knows nothing about.
        env.sql
            .execute(
                "UPDATE session_store \
                 SET sess = (sess::jsonb || '{\"cart\":[1,{\"sku\":\"x\"}]}')::json \
                 WHERE sid = $1",
                &[&sid],
            )
            .await?;

        env.get(rust, "/me", Some(&cookie))
            .await?
            .expect(200, json!({"user": "alice", "views": 2}))?;
        let changed = env.post(rust, "/counter", Some(&cookie), json!({})).await?;
        changed.expect(200, json!({"views": 3}))?;
        env.same_session(&changed, &sid, "Rust's POST /counter")?;

        let row = env
            .row(&sid)
            .await?
            .context("the row is gone after Rust's write")?;
        check_express_session_shape(&row, "rewritten by Rust")?;
        ensure!(
            row.sess["views"] == json!(3) && row.sess["user"] == json!("alice"),
            "Rust's write did not store user alice, views 3: {}",
            row.sess
        );
        ensure!(
            row.sess["cart"] == json!([1, {"sku": "x"}]),
            "Rust's write dropped or changed the key `cart` it does not know: {}",
            row.sess
        );
        for key in ["originalMaxAge", "secure", "httpOnly", "path", "sameSite"] {
            ensure!(
                row.sess["cookie"][key] == node_row.sess["cookie"][key],
                "Rust changed cookie.{key} of Node's session: {} before, {} after",
                node_row.sess["cookie"],
                row.sess["cookie"]
            );
        }

        env.get(node, "/me", Some(&cookie))
            .await?
            .expect(200, json!({"user": "alice", "views": 3}))?;
        env.get(node, "/counter", Some(&cookie))
            .await?
            .expect(200, json!({"views": 3}))?;
        Ok(())
    })
    .await;
}

/// Scenario 2: made by Rust, read and changed by Node, Rust sees the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_session_is_read_and_changed_by_node() {
    Interop::run(|env| async move {
        let (node, rust) = (&env.node, &env.rust);
        let login = env
            .post(rust, "/login", None, json!({"user": "dave"}))
            .await?;
        login.expect(200, json!({"user": "dave"}))?;
        let cookie = login.session_cookie()?;
        let sid = env.sid_of(&cookie)?;

        env.post(rust, "/counter", Some(&cookie), json!({}))
            .await?
            .expect(200, json!({"views": 1}))?;
        env.post(rust, "/counter", Some(&cookie), json!({}))
            .await?
            .expect(200, json!({"views": 2}))?;

        env.get(node, "/me", Some(&cookie))
            .await?
            .expect(200, json!({"user": "dave", "views": 2}))?;
        let changed = env.post(node, "/counter", Some(&cookie), json!({})).await?;
        changed.expect(200, json!({"views": 3}))?;
        env.same_session(&changed, &sid, "Node's POST /counter")?;
        let row = env
            .row(&sid)
            .await?
            .context("the row is gone after Node's write")?;
        check_express_session_shape(&row, "rewritten by Node")?;

        env.get(rust, "/me", Some(&cookie))
            .await?
            .expect(200, json!({"user": "dave", "views": 3}))?;
        env.get(rust, "/counter", Some(&cookie))
            .await?
            .expect(200, json!({"views": 3}))?;
        Ok(())
    })
    .await;
}

/// Scenario 3: logout on either side ends the session on both, and deletes
/// the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_on_either_side_ends_the_session_on_both() {
    Interop::run(|env| async move {
        let (node, rust) = (&env.node, &env.rust);

        // Logged in on Node, logged out on Rust.
        let login = env
            .post(node, "/login", None, json!({"user": "frank"}))
            .await?;
        login.expect(200, json!({"user": "frank"}))?;
        let cookie = login.session_cookie()?;
        let sid = env.sid_of(&cookie)?;
        env.get(rust, "/me", Some(&cookie))
            .await?
            .expect(200, json!({"user": "frank", "views": 0}))?;
        env.post(rust, "/logout", Some(&cookie), json!({}))
            .await?
            .expect_status(204)?;
        ensure!(
            env.row(&sid).await?.is_none(),
            "the row is still there after logout on Rust"
        );
        env.get(node, "/me", Some(&cookie))
            .await?
            .expect_status(401)?;
        env.get(rust, "/me", Some(&cookie))
            .await?
            .expect_status(401)?;

        // Logged in on Rust, logged out on Node.
        let login = env
            .post(rust, "/login", None, json!({"user": "grace"}))
            .await?;
        login.expect(200, json!({"user": "grace"}))?;
        let cookie = login.session_cookie()?;
        let sid = env.sid_of(&cookie)?;
        env.get(node, "/me", Some(&cookie))
            .await?
            .expect(200, json!({"user": "grace", "views": 0}))?;
        env.post(node, "/logout", Some(&cookie), json!({}))
            .await?
            .expect_status(204)?;
        ensure!(
            env.row(&sid).await?.is_none(),
            "the row is still there after logout on Node"
        );
        env.get(rust, "/me", Some(&cookie))
            .await?
            .expect_status(401)?;
        env.get(node, "/me", Some(&cookie))
            .await?
            .expect_status(401)?;
        ensure!(env.row_count().await? == 0, "rows left after both logouts");
        Ok(())
    })
    .await;
}

/// Scenario 4: a cookie signed with the old secret (second in the list) is
/// accepted by both servers, for a session made by either; Rust sends it
/// back signed with the new one. A cookie signed with a secret neither knows
/// is refused by both, and does not destroy the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_signed_with_the_old_secret_is_accepted_by_both() {
    Interop::run(|env| async move {
        let old = Secrets::new(["old-secret"])?;
        let unknown = Secrets::new(["not-a-secret-of-theirs"])?;
        let new_only = Secrets::new(["new-secret"])?;
        for (maker, user) in [(&env.node, "carol"), (&env.rust, "heidi")] {
            let login = env
                .post(maker, "/login", None, json!({"user": user}))
                .await?;
            login.expect(200, json!({"user": user}))?;
            let cookie = login.session_cookie()?;
            let sid = env.sid_of(&cookie)?;
            ensure!(
                unsign(&cookie, &new_only).is_some(),
                "{} signed its cookie {cookie:?} with another secret than the first \
                 of PGSESSION_SECRET",
                maker.name
            );

            let old_cookie = encode_cookie_value(&sign(&sid, &old));
            ensure!(
                old_cookie != cookie,
                "signing with the old secret changed nothing"
            );
            for server in [&env.node, &env.rust] {
                let me = env.get(server, "/me", Some(&old_cookie)).await?;
                me.expect(200, json!({"user": user, "views": 0}))
                    .with_context(|| {
                        format!(
                            "{} refused a cookie signed with the old secret (session made by {})",
                            server.name, maker.name
                        )
                    })?;
                if server.name == RUST {
                    // The layer re-signs a cookie an older secret verified.
                    let resigned = me.session_cookie().with_context(|| {
                        "Rust did not re-sign a cookie verified by the old secret"
                    })?;
                    let verified = unsign(&resigned, &new_only).with_context(|| {
                        format!("Rust re-signed it, not with the first secret: {resigned:?}")
                    })?;
                    ensure!(
                        verified.sid.as_str() == sid,
                        "Rust's re-signed cookie carries another session id"
                    );
                }
            }
            // Changing the session through the old cookie works on both, same session.
            let one = env
                .post(&env.node, "/counter", Some(&old_cookie), json!({}))
                .await?;
            one.expect(200, json!({"views": 1}))?;
            env.same_session(
                &one,
                &sid,
                "Node's POST /counter with the old-secret cookie",
            )?;
            let two = env
                .post(&env.rust, "/counter", Some(&old_cookie), json!({}))
                .await?;
            two.expect(200, json!({"views": 2}))?;
            env.same_session(
                &two,
                &sid,
                "Rust's POST /counter with the old-secret cookie",
            )?;

            let forged = encode_cookie_value(&sign(&sid, &unknown));
            for server in [&env.node, &env.rust] {
                env.get(server, "/me", Some(&forged))
                    .await?
                    .expect_status(401)
                    .with_context(|| {
                        format!(
                            "{} accepted a cookie signed with an unknown secret",
                            server.name
                        )
                    })?;
                // A request with the forged cookie must not touch the real session.
                env.post(server, "/logout", Some(&forged), json!({}))
                    .await?
                    .expect_status(204)?;
            }
            let row = env
                .row(&sid)
                .await?
                .with_context(|| "a logout with a forged cookie destroyed the real session")?;
            ensure!(row.sess["views"] == json!(2), "unexpected row {}", row.sess);
            env.get(&env.node, "/me", Some(&cookie))
                .await?
                .expect(200, json!({"user": user, "views": 2}))?;
        }
        Ok(())
    })
    .await;
}

/// Scenario 5: the row Rust writes has express-session's shape and
/// connect-pg-simple's `expire`, Node reads it without error, and the row
/// Node writes back has the same cookie fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_written_by_rust_has_express_session_shape_and_node_reads_it() {
    Interop::run(|env| async move {
        let (node, rust) = (&env.node, &env.rust);
        let before = OffsetDateTime::now_utc();
        let login = env
            .post(rust, "/login", None, json!({"user": "bob"}))
            .await?;
        login.expect(200, json!({"user": "bob"}))?;
        let cookie = login.session_cookie()?;
        let sid = env.sid_of(&cookie)?;
        env.post(rust, "/counter", Some(&cookie), json!({}))
            .await?
            .expect(200, json!({"views": 1}))?;

        let rust_row = env.row(&sid).await?.context("Rust stored no row")?;
        check_express_session_shape(&rust_row, "written by Rust")?;
        ensure!(
            rust_row.sess["user"] == json!("bob") && rust_row.sess["views"] == json!(1),
            "Rust's row does not hold user bob, views 1: {}",
            rust_row.sess
        );
        let rust_cookie = &rust_row.sess["cookie"];
        if let Some(max_age) = rust_cookie["originalMaxAge"].as_i64() {
            let expires = parse_js_date(&rust_cookie["expires"])?
                .context("cookie.originalMaxAge is set but cookie.expires is null")?;
            let expected = before + time::Duration::milliseconds(max_age);
            ensure!(
                (expires - expected).abs() < time::Duration::seconds(60),
                "cookie.expires {expires} is not about now + originalMaxAge ({expected})"
            );
        }
        // The same checks in SQL, as connect-pg-simple and a DBA see the row.
        let shape: (String, String, Option<String>, bool, String, bool) = {
            let row = env
                .sql
                .query_one(
                    "SELECT json_typeof(sess), json_typeof(sess->'cookie'), \
                            json_typeof(sess->'cookie'->'originalMaxAge'), \
                            (sess->'cookie'->>'httpOnly')::boolean, \
                            sess->'cookie'->>'path', \
                            (sess->'cookie')::jsonb \
                                ?& array['originalMaxAge', 'expires', 'httpOnly', 'path'] \
                     FROM session_store WHERE sid = $1",
                    &[&sid],
                )
                .await?;
            (
                row.get(0),
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
            )
        };
        ensure!(
            shape.0 == "object" && shape.1 == "object" && shape.3 && shape.4 == "/" && shape.5,
            "in SQL, Rust's row is not express-session shaped: {shape:?} ({})",
            rust_row.sess
        );
        ensure!(
            matches!(shape.2.as_deref(), Some("number" | "null")),
            "cookie.originalMaxAge is a JSON {:?}, expected number or null",
            shape.2
        );

        // Node's connect-pg-simple reads Rust's row and express-session uses it.
        env.get(node, "/me", Some(&cookie))
            .await?
            .expect(200, json!({"user": "bob", "views": 1}))?;
        env.get(node, "/counter", Some(&cookie))
            .await?
            .expect(200, json!({"views": 1}))?;
        let changed = env.post(node, "/counter", Some(&cookie), json!({})).await?;
        changed.expect(200, json!({"views": 2}))?;
        env.same_session(&changed, &sid, "Node's POST /counter")?;
        let node_row = env
            .row(&sid)
            .await?
            .context("the row is gone after Node's write")?;
        check_express_session_shape(&node_row, "rewritten by Node")?;
        for key in [
            "originalMaxAge",
            "secure",
            "httpOnly",
            "path",
            "sameSite",
            "domain",
        ] {
            ensure!(
                node_row.sess["cookie"][key] == rust_row.sess["cookie"][key],
                "Node read cookie.{key} of Rust's session differently: Rust stored {}, \
                 Node wrote back {}",
                rust_row.sess["cookie"],
                node_row.sess["cookie"]
            );
        }
        env.get(rust, "/me", Some(&cookie))
            .await?
            .expect(200, json!({"user": "bob", "views": 2}))?;

        // A session Node makes from scratch has the same cookie fields as Rust's.
        let node_login = env
            .post(node, "/login", None, json!({"user": "ivan"}))
            .await?;
        node_login.expect(200, json!({"user": "ivan"}))?;
        let node_sid = env.sid_of(&node_login.session_cookie()?)?;
        let fresh = env.row(&node_sid).await?.context("Node stored no row")?;
        let keys = |row: &Row| -> BTreeSet<String> {
            row.sess["cookie"]
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let (node_keys, rust_keys) = (keys(&fresh), keys(&rust_row));
        ensure!(
            node_keys.is_subset(&rust_keys),
            "cookie keys differ: Node writes {node_keys:?}, Rust writes {rust_keys:?}"
        );
        Ok(())
    })
    .await;
}

/// Login on either side destroys the session the request's cookie carried,
/// whoever made it (no session fixation across the two services).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_on_either_side_destroys_the_previous_session() {
    Interop::run(|env| async move {
        for (maker, login_on) in [(&env.node, &env.rust), (&env.rust, &env.node)] {
            let anonymous = env.post(maker, "/counter", None, json!({})).await?;
            anonymous.expect(200, json!({"views": 1}))?;
            let old_cookie = anonymous.session_cookie()?;
            let old_sid = env.sid_of(&old_cookie)?;
            ensure!(
                env.row(&old_sid).await?.is_some(),
                "{} stored no row",
                maker.name
            );

            let login = env
                .post(
                    login_on,
                    "/login",
                    Some(&old_cookie),
                    json!({"user": "erin"}),
                )
                .await?;
            login.expect(200, json!({"user": "erin"}))?;
            let new_sid = env.sid_of(&login.session_cookie()?)?;
            ensure!(
                new_sid != old_sid,
                "{} kept the session id at login",
                login_on.name
            );
            ensure!(
                env.row(&old_sid).await?.is_none(),
                "{} did not destroy the session made by {} at login",
                login_on.name,
                maker.name
            );
            env.get(maker, "/counter", Some(&old_cookie))
                .await?
                .expect(200, json!({"views": 0}))?;
            env.get(maker, "/me", Some(&old_cookie))
                .await?
                .expect_status(401)?;
        }
        Ok(())
    })
    .await;
}

/// Cut off: Node changes a session while the Rust server, which had
/// read it, is cut off from the database and journals a write of the same
/// session. When Rust's link returns, its write-back finds a document it
/// never saw: the conflict is counted and shown, Rust's write is kept as a
/// dead letter, and Node's value stays in the table (and is what both
/// serve from then on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_change_while_rust_is_cut_off_is_a_conflict_and_node_wins() {
    Interop::run_with(RustLink::Proxied, |env| async move {
        let (node, rust) = (&env.node, &env.rust);
        let cut = env.cut.as_ref().context("a proxied Rust server")?;
        let login = env
            .post(node, "/login", None, json!({"user": "erin"}))
            .await?;
        login.expect(200, json!({"user": "erin"}))?;
        let cookie = login.session_cookie()?;
        let sid = env.sid_of(&cookie)?;
        env.post(node, "/counter", Some(&cookie), json!({}))
            .await?
            .expect(200, json!({"views": 1}))?;
        // Rust reads it (and so has it in its cache).
        env.get(rust, "/me", Some(&cookie))
            .await?
            .expect(200, json!({"user": "erin", "views": 1}))?;

        // Rust is cut off, and acknowledges an increment from its journal.
        cut.proxy.refuse(true);
        cut.proxy.reset_all();
        env.post(rust, "/counter", Some(&cookie), json!({}))
            .await?
            .expect(200, json!({"views": 2}))?;
        let health = env.get(rust, "/health", None).await?;
        ensure!(
            health.body["journal"]["entries"] == json!(1),
            "Rust did not journal its write: {}",
            health.body
        );
        // Node, still connected, changes the same session meanwhile.
        for views in [2, 3] {
            env.post(node, "/counter", Some(&cookie), json!({}))
                .await?
                .expect(200, json!({"views": views}))?;
        }

        // The link returns; Rust writes its journal back.
        cut.proxy.heal();
        let deadline = Instant::now() + Duration::from_secs(60);
        let health = loop {
            let health = env.get(rust, "/health", None).await?;
            let h = &health.body;
            if h["breaker"] == json!("closed") && h["journal"]["entries"] == json!(0) {
                break health;
            }
            ensure!(
                Instant::now() < deadline,
                "Rust did not write its journal back within 60 s: {h}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let h = &health.body;
        let conflicts = h["journal"]["conflicts"].as_u64().unwrap_or(0);
        let events: Vec<&Value> = h["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["kind"] == json!("conflict"))
            .collect();
        let letters = pgsession::dead_letter::read(cut.journal_dir.path())?;
        let row = env.row(&sid).await?.context("the session row is gone")?;
        println!(
            "FIGURES node_interop_conflict conflicts={conflicts} conflict_events={} \
             dead_letters={} stored_views={}",
            events.len(),
            letters.len(),
            row.sess["views"]
        );

        ensure!(conflicts >= 1, "no conflict counted: {h}");
        ensure!(
            events
                .iter()
                .any(|e| e["message"].as_str().is_some_and(|m| m.contains("changed"))),
            "no `changed` conflict event: {h}"
        );
        ensure!(
            row.sess["views"] == json!(3) && row.sess["user"] == json!("erin"),
            "Node's write was undone: {}",
            row.sess
        );
        check_express_session_shape(&row, "kept from Node")?;
        let letter = letters
            .iter()
            .find(|l| l.sid == sid)
            .with_context(|| format!("no dead letter for the session: {letters:?}"))?;
        ensure!(
            letter.kind == pgsession::dead_letter::Conflict::Changed,
            "{letter:?}"
        );
        let pgsession::dead_letter::Write::Save { json: doc, .. } = &letter.write else {
            bail!("the dead letter is not Rust's save: {letter:?}");
        };
        let doc: Value = serde_json::from_str(doc)?;
        ensure!(
            doc["views"] == json!(2),
            "Rust's write is not kept aside: {doc}"
        );

        // Both serve Node's value.
        for server in [node, rust] {
            env.get(server, "/counter", Some(&cookie))
                .await?
                .expect(200, json!({"views": 3}))?;
        }
        Ok(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// Checks on stored rows
// ---------------------------------------------------------------------------

/// One row of the session table.
#[derive(Debug)]
struct Row {
    sess: Value,
    /// The `expire` column (UTC, no time zone).
    expire: PrimitiveDateTime,
}

/// express-session's document: an object with a `cookie` object holding
/// `originalMaxAge`, `expires`, `httpOnly` and `path` (Cookie#toJSON), and
/// connect-pg-simple's `expire`: `ceil(cookie.expires)` to the second, or
/// about a day from now without one.
fn check_express_session_shape(row: &Row, what: &str) -> Result<()> {
    let sess = row
        .sess
        .as_object()
        .with_context(|| format!("session {what}: sess is not a JSON object: {}", row.sess))?;
    let cookie = sess
        .get("cookie")
        .and_then(Value::as_object)
        .with_context(|| format!("session {what}: no cookie object: {}", row.sess))?;
    for key in ["originalMaxAge", "expires", "httpOnly", "path"] {
        ensure!(
            cookie.contains_key(key),
            "session {what}: cookie.{key} is missing: {}",
            row.sess
        );
    }
    ensure!(
        cookie["originalMaxAge"].is_null() || cookie["originalMaxAge"].is_i64(),
        "session {what}: cookie.originalMaxAge is neither null nor an integer: {}",
        row.sess
    );
    ensure!(
        cookie["httpOnly"] == json!(true) && cookie["path"] == json!("/"),
        "session {what}: expected httpOnly true and path \"/\": {}",
        row.sess
    );
    let expire = row.expire.assume_utc();
    match parse_js_date(&cookie["expires"]).with_context(|| format!("session {what}"))? {
        Some(expires) => {
            let ceil = if expires.nanosecond() == 0 {
                expires
            } else {
                expires.replace_nanosecond(0)? + time::Duration::SECOND
            };
            // A touch (Node's or Rust's) moves the column without rewriting
            // the document, so the column may run a few seconds ahead of
            // the stored cookie.expires, never behind it, and never by hours.
            ensure!(
                expire >= ceil && expire - ceil <= time::Duration::MINUTE,
                "session {what}: expire column {expire} is not connect-pg-simple's \
                 ceil(cookie.expires) = {ceil}, or at most a minute after it \
                 (cookie.expires {expires}); a time zone mix-up?"
            );
        }
        None => {
            let expected = OffsetDateTime::now_utc() + time::Duration::DAY;
            ensure!(
                (expire - expected).abs() < time::Duration::minutes(2),
                "session {what}: without cookie.expires, expire {expire} should be about a day \
                 from now"
            );
        }
    }
    Ok(())
}

/// `cookie.expires` as express-session writes it: `null`, or JavaScript's
/// `Date#toJSON` (`2026-11-27T18:00:00.000Z`, UTC, milliseconds).
fn parse_js_date(value: &Value) -> Result<Option<OffsetDateTime>> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => {
            let shaped =
                text.len() == 24 && text.ends_with('Z') && text.as_bytes().get(19) == Some(&b'.');
            ensure!(
                shaped,
                "cookie.expires {text:?} is not in Date#toJSON's form YYYY-MM-DDTHH:MM:SS.mmmZ"
            );
            Ok(Some(OffsetDateTime::parse(text, &Rfc3339).with_context(
                || format!("cookie.expires {text:?} is not a date"),
            )?))
        }
        other => bail!("cookie.expires is {other}, expected a date string or null"),
    }
}

// ---------------------------------------------------------------------------
// The environment: one database, both servers, an HTTP client
// ---------------------------------------------------------------------------

/// The name under which the Rust server appears in messages.
const RUST: &str = "pgsession serve";
/// The name under which the Node server appears in messages.
const NODE: &str = "Node (express-session + connect-pg-simple)";

/// A running server: its name, base URL and process.
struct Server {
    name: &'static str,
    base: String,
    process: Running,
}

/// The process behind a [`Server`].
enum Running {
    Node(Process),
    Rust(common::ServeProcess),
}

impl Server {
    /// Its output so far, for a failure message.
    fn report(&self) -> String {
        match &self.process {
            Running::Node(process) => {
                process.reported.store(true, Ordering::Relaxed);
                process.report()
            }
            Running::Rust(serve) => format!(
                "===== {} =====\n--- stdout ---\n{}\n--- stderr ---\n{}\n",
                self.name,
                serve.stdout(),
                serve.stderr()
            ),
        }
    }

    /// What it wrote to stderr so far.
    fn stderr(&self) -> String {
        match &self.process {
            Running::Node(process) => process.stderr(),
            Running::Rust(serve) => serve.stderr(),
        }
    }
}

/// Both servers on one database. Fields drop in order: the processes stop
/// before the database goes away.
struct Interop {
    node: Server,
    rust: Server,
    /// With [`RustLink::Proxied`]: the proxy between Rust and the database,
    /// and Rust's journal directory.
    cut: Option<CutOff>,
    http: reqwest::Client,
    sql: tokio_postgres::Client,
    secrets: Secrets,
    _db: TestDb,
}

/// How the Rust server reaches the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RustLink {
    /// Straight (Node always is).
    Direct,
    /// Through a fault proxy, to be cut off; the database is then in a
    /// throwaway cluster of its own.
    Proxied,
}

/// What a scenario with a Rust server that can be cut off has.
struct CutOff {
    proxy: pgsession_testkit::FaultProxy,
    journal_dir: tempfile::TempDir,
}

impl Interop {
    /// Starts everything, runs `scenario` within [`SCENARIO_TIMEOUT`], and
    /// panics with both servers' output if it fails.
    async fn run<F, Fut>(scenario: F)
    where
        F: FnOnce(Arc<Interop>) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        Interop::run_with(RustLink::Direct, scenario).await;
    }

    /// [`Interop::run`], with Rust reaching the database as `link` says.
    /// With [`RustLink::Proxied`], Rust's warnings are expected (the cut
    /// itself, and the conflicts it leads to); its errors are not.
    async fn run_with<F, Fut>(link: RustLink, scenario: F)
    where
        F: FnOnce(Arc<Interop>) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let env = Arc::new(match Interop::start(link).await {
            Ok(env) => env,
            Err(e) => panic!("setting up the interop test failed: {e:#}"),
        });
        let outcome = tokio::time::timeout(SCENARIO_TIMEOUT, scenario(Arc::clone(&env))).await;
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!(
                "the scenario took longer than {SCENARIO_TIMEOUT:?}"
            )),
        };
        // Whatever the scenario did, neither side may have logged an error:
        // Node's connect-pg-simple errorLog or 500 handler, or an error of
        // Rust's or a warning of its store (such as a stored session it
        // could not read, which it treats as no session).
        let error = error.or_else(|| {
            let stderr = env.node.stderr();
            let lines: Vec<&str> = stderr
                .lines()
                .filter(|line| line.to_lowercase().contains("error"))
                .collect();
            (!lines.is_empty()).then(|| format!("Node logged errors:\n{}", lines.join("\n")))
        });
        let error = error.or_else(|| {
            let stderr = env.rust.stderr();
            let lines: Vec<&str> = stderr
                .lines()
                .filter(|line| {
                    line.contains(" ERROR ")
                        || (link == RustLink::Direct && line.contains(" WARN session_store"))
                })
                .collect();
            (!lines.is_empty()).then(|| format!("{RUST} logged:\n{}", lines.join("\n")))
        });
        if let Some(error) = error {
            panic!("{error}\n\n{}\n{}", env.node.report(), env.rust.report());
        }
    }

    async fn start(link: RustLink) -> Result<Interop> {
        let node_dir = node_dir();
        ensure_node_modules(&node_dir)?;
        let db = match link {
            RustLink::Direct => TestDb::new().await,
            RustLink::Proxied => TestDb::throwaway().await,
        }
        .context("creating the test database")?;
        let sql = db
            .client()
            .await
            .context("connecting to the test database")?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;

        // A database whose default time zone is not UTC: `expire` has none,
        // so both sides must write and compare it in UTC whatever the server
        // says (the Node app sets TimeZone=UTC on its pool, as the docs ask).
        sql.batch_execute(&format!(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET TimeZone TO %L', \
             current_database(), '{DB_TIME_ZONE}'); END $$"
        ))
        .await
        .context("setting the database's time zone")?;

        let cut = match link {
            RustLink::Direct => None,
            RustLink::Proxied => {
                let cluster = db.cluster().context("a throwaway cluster")?;
                Some(CutOff {
                    proxy: pgsession_testkit::FaultProxy::start(cluster.socket_addr())
                        .await
                        .context("starting the fault proxy")?,
                    journal_dir: tempfile::tempdir()?,
                })
            }
        };
        let (rust_url, journal_dir) = match &cut {
            None => (db.url().to_owned(), None),
            Some(cut) => (
                cut.proxy.url_for(db.name()),
                Some(
                    cut.journal_dir
                        .path()
                        .to_str()
                        .context("a UTF-8 temporary path")?
                        .to_owned(),
                ),
            ),
        };
        let mut extra = Vec::new();
        if let Some(dir) = &journal_dir {
            // A short ceiling on the breaker's cool-down: Rust probes soon
            // after its link returns.
            extra.push(("PGSESSION_JOURNAL_DIR", dir.as_str()));
            extra.push(("PGSESSION_BREAKER_MAX_COOL_DOWN", "2s"));
        }

        // Rust first, so that the table Node finds is the one Rust made.
        let rust = start_rust(&rust_url, &extra, &http).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let row = sql
                .query_one(
                    "SELECT to_regclass('public.' || quote_ident($1)) IS NOT NULL",
                    &[&TABLE],
                )
                .await?;
            if row.get::<_, bool>(0) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{RUST} is ready but created no table public.{TABLE} within 15 s, so Node \
                     would make its own\n{}",
                    rust.report()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let node = start_node(&node_dir, db.url(), &http).await?;
        Ok(Interop {
            node,
            rust,
            cut,
            http,
            sql,
            secrets: Secrets::parse_list(SECRETS)?,
            _db: db,
        })
    }

    async fn get(&self, server: &Server, path: &str, cookie: Option<&str>) -> Result<Response> {
        self.send(server, reqwest::Method::GET, path, cookie, None)
            .await
    }

    async fn post(
        &self,
        server: &Server,
        path: &str,
        cookie: Option<&str>,
        body: Value,
    ) -> Result<Response> {
        self.send(server, reqwest::Method::POST, path, cookie, Some(body))
            .await
    }

    async fn send(
        &self,
        server: &Server,
        method: reqwest::Method,
        path: &str,
        cookie: Option<&str>,
        body: Option<Value>,
    ) -> Result<Response> {
        let what = format!("{method} {path} on {}", server.name);
        let mut request = self.http.request(method, format!("{}{path}", server.base));
        if let Some(cookie) = cookie {
            request = request.header(reqwest::header::COOKIE, format!("{COOKIE_NAME}={cookie}"));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| what.clone())?;
        let status = response.status().as_u16();
        let set_cookies = response
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let text = response.text().await.with_context(|| what.clone())?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Response {
            what,
            status,
            body,
            set_cookies,
        })
    }

    /// The session id a cookie value carries (checked with both secrets).
    fn sid_of(&self, cookie: &str) -> Result<String> {
        unsign(cookie, &self.secrets)
            .map(|u| u.sid.into_string())
            .with_context(|| format!("cookie value {cookie:?} does not verify with {SECRETS:?}"))
    }

    /// When a response sets the session cookie, it carries the same session.
    fn same_session(&self, response: &Response, sid: &str, what: &str) -> Result<()> {
        if let Ok(cookie) = response.session_cookie() {
            let got = self.sid_of(&cookie)?;
            ensure!(got == sid, "{what} switched to another session id");
        }
        Ok(())
    }

    async fn row(&self, sid: &str) -> Result<Option<Row>> {
        let row = self
            .sql
            .query_opt(
                "SELECT sess::text, expire FROM session_store WHERE sid = $1",
                &[&sid],
            )
            .await?;
        row.map(|row| {
            let text: String = row.get(0);
            Ok(Row {
                sess: serde_json::from_str(&text)
                    .with_context(|| format!("sess is not JSON: {text}"))?,
                expire: row.get(1),
            })
        })
        .transpose()
    }

    async fn row_count(&self) -> Result<i64> {
        Ok(self
            .sql
            .query_one("SELECT count(*) FROM session_store", &[])
            .await?
            .get(0))
    }
}

/// One HTTP answer.
#[derive(Debug)]
struct Response {
    what: String,
    status: u16,
    body: Value,
    set_cookies: Vec<String>,
}

impl Response {
    fn expect_status(&self, status: u16) -> Result<&Self> {
        ensure!(
            self.status == status,
            "{}: expected {status}, got {} {}",
            self.what,
            self.status,
            self.body
        );
        Ok(self)
    }

    fn expect(&self, status: u16, body: Value) -> Result<&Self> {
        self.expect_status(status)?;
        ensure!(
            self.body == body,
            "{}: expected {body}, got {}",
            self.what,
            self.body
        );
        Ok(self)
    }

    /// The raw value of the `connect.sid` cookie this response sets (not a
    /// removal).
    fn session_cookie(&self) -> Result<String> {
        let prefix = format!("{COOKIE_NAME}=");
        self.set_cookies
            .iter()
            .filter_map(|header| header.strip_prefix(&prefix))
            .map(|rest| rest.split(';').next().unwrap_or_default().trim().to_owned())
            .find(|value| !value.is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "{}: no {COOKIE_NAME} cookie set (Set-Cookie: {:?})",
                    self.what,
                    self.set_cookies
                )
            })
    }
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A child process with its output collected; killed (and reaped) on drop,
/// also on panic, when its output is printed unless a failure message
/// already carried it.
#[derive(Debug)]
struct Process {
    name: &'static str,
    child: Mutex<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    reported: AtomicBool,
}

impl Process {
    fn spawn(name: &'static str, mut command: Command) -> Result<Process> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take(), Arc::clone(&stdout));
        collect(child.stderr.take(), Arc::clone(&stderr));
        Ok(Process {
            name,
            child: Mutex::new(child),
            stdout,
            stderr,
            reported: AtomicBool::new(false),
        })
    }

    fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `Some(status)` once the process has exited.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    fn report(&self) -> String {
        let mut out = format!("===== {} =====\n", self.name);
        if let Some(status) = self.exited() {
            let _ = writeln!(out, "(exited: {status})");
        }
        let _ = write!(
            out,
            "--- stdout ---\n{}\n--- stderr ---\n{}\n",
            self.stdout(),
            self.stderr()
        );
        out
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        {
            let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() && !self.reported.load(Ordering::Relaxed) {
            eprintln!("{}", self.report());
        }
    }
}

/// Appends everything `pipe` gives to `buffer`, on a thread of its own.
fn collect(pipe: Option<impl Read + Send + 'static>, buffer: Arc<Mutex<String>>) {
    let Some(pipe) = pipe else { return };
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        while let Ok(n) = reader.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            buffer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    });
}

/// Waits until `ready` answers `Some`, the process exits, or `timeout`.
async fn wait_ready<T, F, Fut>(process: &Process, timeout: Duration, mut ready: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = ready().await {
            return Ok(value);
        }
        if let Some(status) = process.exited() {
            bail!(
                "{} exited before it was ready ({status})\n{}",
                process.name,
                process.report()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} was not ready within {timeout:?}\n{}",
                process.name,
                process.report()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Only what the child needs from our environment: where programs are.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
}

/// `pgsession serve` (through the shared harness, which picks a free port
/// and waits for `/healthz`), ready once `/readyz` answers 200 too.
async fn start_rust(
    database_url: &str,
    extra_env: &[(&str, &str)],
    http: &reqwest::Client,
) -> Result<Server> {
    let mut env = vec![
        ("PGSESSION_SECRET", SECRETS),
        ("PGSESSION_TABLE", TABLE),
        ("PGSESSION_COOKIE_SECURE", "false"),
        ("RUST_LOG", "info"),
    ];
    env.extend_from_slice(extra_env);
    let serve = common::ServeProcess::start(Some(database_url), &env).await;
    let base = serve.url("");
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let ready = http
            .get(serve.url("/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200);
        if ready {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{RUST} did not answer 200 on /readyz within {STARTUP_TIMEOUT:?}\n\
                 --- stdout ---\n{}\n--- stderr ---\n{}",
                serve.stdout(),
                serve.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Server {
        name: RUST,
        base,
        process: Running::Rust(serve),
    })
}

/// `node server.js` on a port it picks itself (`PORT=0`, no race), ready
/// once it printed `listening <port>` and answers `GET /counter`.
async fn start_node(node_dir: &Path, database_url: &str, http: &reqwest::Client) -> Result<Server> {
    let mut command = clean_command("node");
    command
        .arg("server.js")
        .current_dir(node_dir)
        .env("DATABASE_URL", database_url)
        .env("PGSESSION_SECRET", SECRETS)
        .env("PGSESSION_TABLE", TABLE)
        .env("PORT", "0");
    let process = Process::spawn(NODE, command)?;
    let port = wait_ready(&process, STARTUP_TIMEOUT, || async {
        process
            .stdout()
            .lines()
            .find_map(|line| line.strip_prefix("listening ")?.trim().parse::<u16>().ok())
    })
    .await?;
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&process, STARTUP_TIMEOUT, || async {
        let response = http.get(format!("{base}/counter")).send().await.ok()?;
        (response.status().as_u16() == 200).then_some(())
    })
    .await?;
    Ok(Server {
        name: NODE,
        base,
        process: Running::Node(process),
    })
}

// ---------------------------------------------------------------------------
// Node and its packages
// ---------------------------------------------------------------------------

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/node")
}

/// Checks that `node` and `npm` are there and runs `npm ci` when
/// `node_modules` is missing or older than `package-lock.json`: once per
/// test process, and under a lock directory against other test processes.
fn ensure_node_modules(node_dir: &Path) -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| install_node_modules(node_dir).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn install_node_modules(node_dir: &Path) -> Result<()> {
    for (tool, args) in [("node", ["--version"]), ("npm", ["--version"])] {
        let output = Command::new(tool).args(args).output();
        let ok = output.as_ref().is_ok_and(|o| o.status.success());
        ensure!(
            ok,
            "`{tool} --version` failed ({}): the Node ↔ Rust interop test needs Node.js >= 20.9 \
             and npm on PATH (e.g. `apt-get install nodejs npm`)",
            match &output {
                Ok(o) => format!(
                    "{}, {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => e.to_string(),
            }
        );
    }
    if !node_modules_stale(node_dir)? {
        return Ok(());
    }
    let _lock = DirLock::acquire(&node_dir.join(".npm-ci.lock"), NPM_CI_TIMEOUT)?;
    if !node_modules_stale(node_dir)? {
        return Ok(()); // another test process installed them meanwhile
    }
    let mut npm = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(node_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting npm ci")?;
    let output = Arc::new(Mutex::new(String::new()));
    collect(npm.stdout.take(), Arc::clone(&output));
    collect(npm.stderr.take(), Arc::clone(&output));
    let deadline = Instant::now() + NPM_CI_TIMEOUT;
    let status = loop {
        if let Some(status) = npm.try_wait().context("waiting for npm ci")? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = npm.kill();
            let _ = npm.wait();
            bail!(
                "`npm ci` in {} took longer than {NPM_CI_TIMEOUT:?}:\n{}",
                node_dir.display(),
                output.lock().unwrap_or_else(|e| e.into_inner())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Let the reader threads drain the pipes.
    std::thread::sleep(Duration::from_millis(100));
    ensure!(
        status.success(),
        "`npm ci` in {} failed ({status}):\n{}",
        node_dir.display(),
        output.lock().unwrap_or_else(|e| e.into_inner())
    );
    ensure!(
        !node_modules_stale(node_dir)?,
        "`npm ci` succeeded but {} is still missing or older than package-lock.json",
        node_dir.join("node_modules/.package-lock.json").display()
    );
    Ok(())
}

/// npm writes `node_modules/.package-lock.json` last, on every install.
fn node_modules_stale(node_dir: &Path) -> Result<bool> {
    let modified = |path: PathBuf| -> Option<SystemTime> { path.metadata().ok()?.modified().ok() };
    let lock = modified(node_dir.join("package-lock.json"))
        .with_context(|| format!("{} has no package-lock.json", node_dir.display()))?;
    Ok(
        match modified(node_dir.join("node_modules/.package-lock.json")) {
            Some(installed) => installed < lock,
            None => true,
        },
    )
}

/// A directory used as a lock between processes (mkdir is atomic); a lock
/// older than the timeout is taken as left behind by a killed process.
#[derive(Debug)]
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(path: &Path, timeout: Duration) -> Result<DirLock> {
        let deadline = Instant::now() + timeout;
        loop {
            match std::fs::create_dir(path) {
                Ok(()) => return Ok(DirLock(path.to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = path
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|age| age > timeout) {
                        let _ = std::fs::remove_dir(path);
                        continue;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "waited {timeout:?} for {} (another npm ci?)",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
