//! Fuzzes the stored session document: `SessionRecord::from_json` never
//! panics, and what it accepts survives `to_json` → `from_json` unchanged
//! (so a session read and written back, by this crate or by Node, stays the
//! same). Also runs what the HTTP layer does with a stored document: the
//! row's expiry, a rolling renewal, the `Set-Cookie`, the size check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsession::cookie::{Secrets, SessionId};
use pgsession::record::{SessionRecord, DEFAULT_LIFETIME, DEFAULT_MAX_SESSION_BYTES};
use time::macros::datetime;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(record) = SessionRecord::from_json(text) else {
        return;
    };
    let json = record.to_json();
    let again = match SessionRecord::from_json(&json) {
        Ok(again) => again,
        Err(e) => panic!("own output refused: {e}\ninput: {text}\noutput: {json}"),
    };
    assert_eq!(again, record, "\ninput: {text}\noutput: {json}");
    assert_eq!(again.to_json(), json, "to_json is stable");
    // serde's way in agrees with from_json.
    let via_serde: SessionRecord = serde_json::from_str(&json).expect("own output parses");
    assert_eq!(via_serde, record);

    // What the layer does with a loaded session must not panic either.
    let now = datetime!(2026-11-26 18:00:00.5 UTC);
    let _ = record.expire_for_row(now, DEFAULT_LIFETIME);
    let _ = record.check_size(DEFAULT_MAX_SESSION_BYTES);
    let mut renewed = record.clone();
    renewed.cookie.reset_max_age(now);
    let _ = renewed.expire_for_row(now, DEFAULT_LIFETIME);
    let _ = renewed.to_json_limited(DEFAULT_MAX_SESSION_BYTES);
    let secrets = Secrets::new(["keyboard cat"]).expect("valid secret");
    let sid = SessionId::parse("fuzz-session-id").expect("valid id");
    if let Ok(header) = record
        .cookie
        .to_set_cookie("connect.sid", &sid, &secrets)
        .to_header_value()
    {
        // Nothing stored may inject a header or another attribute line.
        assert!(!header.contains(['\r', '\n', '\0']), "{header:?}");
    }
});
