//! Fuzzes the session cookie: finding it in `Cookie` headers
//! (`parse_cookie_header`), checking its signature with a few secrets
//! (`unsign`), and the property that any id the store accepts survives
//! sign → encode → header → unsign under the right secret only.
//!
//! Input: the bytes, split at `\n` into `Cookie` header values; as text,
//! also a raw cookie value and a session id.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use pgsession::cookie::{
    parse_cookie_header, sign, signed_cookie_value, unsign, CookieLookup, Secrets, SessionId,
    MAX_COOKIE_HEADER_BYTES, MAX_SECRETS, MAX_SESSION_ID_BYTES,
};

const NAME: &str = "connect.sid";

struct Keys {
    /// What the seeds were signed with: the current secret, then the old one.
    rotated: Secrets,
    current: Secrets,
    old_only: Secrets,
    /// Another application's secrets: nothing signed above verifies here.
    other_app: Secrets,
    /// The most secrets allowed, the current one last.
    many: Secrets,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let secrets = |list: &[&str]| Secrets::new(list.iter().copied()).expect("valid secrets");
    let mut many: Vec<String> = (1..MAX_SECRETS).map(|i| format!("filler-{i}")).collect();
    many.push("keyboard cat".into());
    Keys {
        rotated: secrets(&["keyboard cat", "old-secret"]),
        current: secrets(&["keyboard cat"]),
        old_only: secrets(&["old-secret"]),
        other_app: secrets(&["another application", "its old secret"]),
        many: Secrets::new(many).expect("MAX_SECRETS secrets"),
    }
});

fuzz_target!(|data: &[u8]| {
    let headers: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    check_lookup(&headers);
    check_lookup(&[data]);
    if let Ok(text) = std::str::from_utf8(data) {
        // The whole input as a cookie value, and as a session id.
        for secrets in all_keys() {
            check_unsigned(text, secrets);
        }
        round_trip(text);
    }
});

fn all_keys() -> [&'static Secrets; 5] {
    let k = &*KEYS;
    [&k.rotated, &k.current, &k.old_only, &k.other_app, &k.many]
}

fn check_lookup(headers: &[&[u8]]) {
    let total: usize = headers.iter().map(|h| h.len()).sum();
    match parse_cookie_header(headers.iter().copied(), NAME) {
        CookieLookup::Found(value) => {
            assert!(total <= MAX_COOKIE_HEADER_BYTES, "read {total} bytes");
            let from_a_header = value.is_empty()
                || headers
                    .iter()
                    .any(|h| h.windows(value.len()).any(|w| w == value.as_bytes()));
            assert!(from_a_header, "the value must come from a header");
            for secrets in all_keys() {
                check_unsigned(value, secrets);
            }
        }
        CookieLookup::TooLarge => assert!(total > MAX_COOKIE_HEADER_BYTES),
        CookieLookup::Missing | CookieLookup::Duplicate | CookieLookup::NotUtf8 => {}
    }
}

/// Whatever verifies is a well-formed id that verifies again when re-signed.
fn check_unsigned(value: &str, secrets: &Secrets) {
    if let Some(unsigned) = unsign(value, secrets) {
        let sid = unsigned.sid.as_str();
        assert!(!sid.is_empty() && sid.len() <= MAX_SESSION_ID_BYTES);
        assert!(unsigned.secret_index < secrets.len());
        round_trip(sid);
    }
}

fn round_trip(sid: &str) {
    let keys = &*KEYS;
    let Ok(id) = SessionId::parse(sid) else {
        // An id the store refuses is refused in a cookie too, signed or not.
        assert!(unsign(&sign(sid, &keys.current), &keys.current).is_none());
        return;
    };
    assert_eq!(id.as_str(), sid);

    // Signed, encoded, sent among other cookies, found, verified.
    let value = signed_cookie_value(&id, &keys.current);
    let header = format!("theme=dark; {NAME}={value}; lang=en");
    assert_eq!(
        parse_cookie_header([header.as_bytes()], NAME),
        CookieLookup::Found(value.as_str())
    );
    let unsigned = unsign(&value, &keys.current).expect("own cookie verifies");
    assert_eq!(unsigned.sid, id);
    assert_eq!(unsigned.secret_index, 0);
    assert!(!unsigned.needs_resign());
    let unsigned = unsign(&value, &keys.rotated).expect("verifies under the rotated list");
    assert_eq!((unsigned.sid.as_str(), unsigned.secret_index), (sid, 0));
    let unsigned = unsign(&value, &keys.many).expect("verifies with the last of 16");
    assert_eq!(unsigned.secret_index, MAX_SECRETS - 1);

    // The unencoded form verifies too when there is nothing to decode.
    if !sid.contains('%') {
        let raw = sign(sid, &keys.current);
        assert_eq!(unsign(&raw, &keys.current).map(|u| u.sid), Some(id.clone()));
    }

    // After a rotation, the old secret still verifies and asks for a re-sign.
    let old = signed_cookie_value(&id, &keys.old_only);
    let unsigned = unsign(&old, &keys.rotated).expect("old secret still verifies");
    assert_eq!(unsigned.sid, id);
    assert_eq!(unsigned.secret_index, 1);
    assert!(unsigned.needs_resign());
    assert!(unsign(&old, &keys.current).is_none(), "retired secret");

    // Another application's secret, or any change to the MAC, is refused.
    assert!(unsign(&value, &keys.other_app).is_none());
    let dot = value.rfind('.').expect("signed value has a dot");
    let mut tampered = value.clone().into_bytes();
    let first = &mut tampered[dot + 1];
    *first = if *first == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ASCII MAC");
    assert!(
        unsign(&tampered, &keys.rotated).is_none(),
        "tampered MAC accepted"
    );
}
