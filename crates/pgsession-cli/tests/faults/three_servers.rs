//! Three servers on one database, each user's requests spread over them:
//! every read sees the latest acknowledged write, and a logout on one
//! server is seen by the others.

use std::time::Instant;

use crate::common::{rows_with_sid, ServeProcess};
use crate::support::{base, check_stored, http, login, ms, send, Figures, Rig, User};

const USERS: usize = 8;
const ROUNDS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_one_database() {
    let rig = Rig::new().await;
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(ServeProcess::start_ready(rig.direct_url(), &[]).await);
    }
    let bases: Vec<String> = servers.iter().map(base).collect();
    let http = http();
    let t0 = Instant::now();

    let tasks: Vec<_> = (0..USERS)
        .map(|i| {
            let (http, bases) = (http.clone(), bases.clone());
            tokio::spawn(async move {
                let mut user = User::anonymous(format!("user{i}"));
                login(&http, &bases[i % 3], &mut user).await;
                let mut stale = Vec::new();
                let (mut writes, mut reads) = (0usize, 0usize);
                let mut latencies = Vec::new();
                for round in 0..ROUNDS {
                    let [w, r, m] = [0, 1, 2].map(|k| &bases[(i + round + k) % 3]);
                    let sent = Instant::now();
                    let a = send(&http, w, "POST", "/counter", user.cookie.as_deref(), None)
                        .await
                        .expect("answer");
                    latencies.push(sent.elapsed());
                    assert_eq!(a.status, 200, "{}", a.body);
                    writes += 1;
                    let expected = user.acked() + 1;
                    if a.json()["views"].as_u64() != Some(expected) {
                        stale.push(format!(
                            "{} write on {w}: {} (expected {expected})",
                            user.name, a.body
                        ));
                    }
                    user.sessions.last_mut().expect("session").1 += 1;
                    // Read it back on the other two servers.
                    let a = send(&http, r, "GET", "/counter", user.cookie.as_deref(), None)
                        .await
                        .expect("answer");
                    reads += 1;
                    if a.status != 200 || a.json()["views"].as_u64() != Some(user.acked()) {
                        stale.push(format!(
                            "{} read on {r}: {} {}",
                            user.name, a.status, a.body
                        ));
                    }
                    let a = send(&http, m, "GET", "/me", user.cookie.as_deref(), None)
                        .await
                        .expect("answer");
                    reads += 1;
                    let me = (a.status == 200).then(|| a.json());
                    if me.as_ref().and_then(|m| m["views"].as_u64()) != Some(user.acked())
                        || me
                            .as_ref()
                            .and_then(|m| m["user"].as_str().map(str::to_owned))
                            != Some(user.name.clone())
                    {
                        stale.push(format!("{} /me on {m}: {} {}", user.name, a.status, a.body));
                    }
                }
                (user, writes, reads, stale, latencies)
            })
        })
        .collect();
    let mut users = Vec::new();
    let (mut writes, mut reads, mut stale, mut latencies) = (0, 0, Vec::new(), Vec::new());
    for task in tasks {
        let (user, w, r, s, l) = task.await.expect("user task");
        users.push(user);
        writes += w;
        reads += r;
        stale.extend(s);
        latencies.extend(l);
    }
    let spread_took = t0.elapsed();
    let stored = check_stored(&rig.db, &users).await;

    // Logout on one server; the other two see it at once.
    let mut not_seen = Vec::new();
    let mut rows_left = 0;
    for (i, user) in users.iter().enumerate() {
        let a = send(
            &http,
            &bases[i % 3],
            "POST",
            "/logout",
            user.cookie.as_deref(),
            None,
        )
        .await
        .expect("answer");
        assert_eq!(a.status, 204, "{}", a.body);
        for other in [&bases[(i + 1) % 3], &bases[(i + 2) % 3]] {
            let me = send(&http, other, "GET", "/me", user.cookie.as_deref(), None)
                .await
                .expect("answer");
            let counter = send(
                &http,
                other,
                "GET",
                "/counter",
                user.cookie.as_deref(),
                None,
            )
            .await
            .expect("answer");
            if me.status != 401 || counter.json()["views"] != 0 {
                not_seen.push(format!(
                    "{} after logout, on {other}: /me {} {}, /counter {}",
                    user.name, me.status, me.body, counter.body
                ));
            }
        }
        rows_left += rows_with_sid(&rig.db, user.sid().expect("sid")).await;
    }

    Figures::new("three_servers")
        .set("servers", 3)
        .set("users", USERS)
        .set("writes", writes)
        .set("reads", reads)
        .set("stale_reads", stale.len())
        .set(
            "write_p50_ms",
            ms(crate::support::quantile(latencies.clone(), 0.5)),
        )
        .set("write_max_ms", ms(crate::support::quantile(latencies, 1.0)))
        .set("logouts", USERS)
        .set("logout_not_seen", not_seen.len())
        .set("rows_after_logout", rows_left)
        .set("took_ms", ms(spread_took))
        .stored(&stored)
        .print();

    assert!(stale.is_empty(), "stale reads:\n{}", stale.join("\n"));
    assert!(not_seen.is_empty(), "{}", not_seen.join("\n"));
    assert_eq!(rows_left, 0);
    stored.assert_nothing_lost("");
}
