//! Fuzzes the configuration: `Config::builder().url(..).build()`,
//! `ConfigBuilder::set` for every setting name, and `Config::from_vars`.
//! None of it may panic, and no error message, `Debug` output or log
//! target may repeat a password the URL carries.
//!
//! Input: text; the first line is the URL, the rest the value given to
//! every setting (empty without a newline).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsession::config::ENV_SETTINGS;
use pgsession::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (url, value) = text.split_once('\n').unwrap_or((text, ""));
    check(url, Some(value));
    // The value may be a URL too (it is given to `url`): its passwords.
    check(value, None);
});

/// Runs everything with `url` as the URL and `value` (if any) for every
/// setting, then looks for the URL's passwords in what came out.
fn check(url: &str, value: Option<&str>) {
    let texts = outputs(url, value);
    for secret in passwords(url) {
        let chars: Vec<char> = secret.text.chars().collect();
        if chars.len() < 4 {
            // Too short to tell a leak from a coincidence.
            continue;
        }
        // What the same run says with the password's letters and digits
        // changed (its punctuation, which steers parsing, kept): text found
        // there too (a message template, the host name, an echo of a
        // setting's value) is not a leak.
        let redacted_url = format!(
            "{}{}{}",
            &url[..secret.start],
            disguise(&url[secret.start..secret.end]),
            &url[secret.end..]
        );
        let innocent = outputs(&redacted_url, value).join("\n");
        let without = format!("{}{}", &url[..secret.start], &url[secret.end..]);
        let window = chars.len().min(6);
        for piece in chars.windows(window) {
            let piece: String = piece.iter().collect();
            if without.contains(&piece) || innocent.contains(&piece) {
                continue;
            }
            for text in &texts {
                assert!(
                    !text.contains(&piece),
                    "password piece {piece:?} of {:?} leaked: {text}",
                    secret.text
                );
            }
        }
    }
}

/// Every message and `Debug` text the configuration code produces for
/// this URL and value.
fn outputs(url: &str, value: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    record(&mut out, Config::builder().url(url).build());
    record(
        &mut out,
        Config::builder().set("url", url).and_then(|b| b.build()),
    );
    record(&mut out, Config::from_vars([("DATABASE_URL", url)]));
    let Some(value) = value else {
        return out;
    };
    for (env, setting) in ENV_SETTINGS {
        match Config::builder().url(url).set(setting, value) {
            Ok(builder) => {
                out.push(format!("{builder:?}"));
                record(&mut out, builder.build());
            }
            Err(e) => record(&mut out, Err(e)),
        }
        if *setting != "url" {
            record(
                &mut out,
                Config::from_vars([("DATABASE_URL", url), (env, value)]),
            );
        }
    }
    // The value as a setting's name.
    record(
        &mut out,
        Config::builder()
            .url(url)
            .set(value, url)
            .and_then(|b| b.build()),
    );
    out
}

fn record(out: &mut Vec<String>, result: Result<Config, pgsession::ConfigError>) {
    match result {
        Ok(config) => {
            out.push(format!("{config:?}"));
            out.push(format!("{:?}", config.postgres()));
            out.push(config.target());
        }
        Err(e) => {
            out.push(e.to_string());
            out.push(format!("{e:?}"));
        }
    }
}

/// A password in the URL, and where it is.
struct Secret {
    text: String,
    start: usize,
    end: usize,
}

/// The passwords `url` carries: the userinfo's, between the first `:` and
/// the first `@` after the scheme (as the driver reads credentials), and
/// the value of any `password=` parameter in the query. Each raw; the
/// decoded forms are checked too when they differ.
fn passwords(url: &str) -> Vec<Secret> {
    let mut found = Vec::new();
    let Some(scheme_end) = ["postgres://", "postgresql://"]
        .iter()
        .find(|p| url.starts_with(**p))
        .map(|p| p.len())
    else {
        return found;
    };
    let rest = &url[scheme_end..];
    if let Some(at) = rest.find('@') {
        if let Some(colon) = rest[..at].find(':') {
            let (start, end) = (scheme_end + colon + 1, scheme_end + at);
            found.push(Secret {
                text: url[start..end].to_owned(),
                start,
                end,
            });
        }
    }
    // `password=` parameters of the query, which starts at the first `?`
    // after the credentials.
    let credentials_end = rest
        .find(['@', '/'])
        .filter(|&i| rest[i..].starts_with('@'))
        .map_or(scheme_end, |i| scheme_end + i + 1);
    if let Some(q) = url[credentials_end..].find('?') {
        let mut start = credentials_end + q + 1;
        for pair in url[start..].split('&') {
            if let Some(value) = pair.strip_prefix("password=") {
                let value_start = start + "password=".len();
                found.push(Secret {
                    text: value.to_owned(),
                    start: value_start,
                    end: value_start + value.len(),
                });
            }
            start += pair.len() + 1;
        }
    }
    let decoded: Vec<Secret> = found
        .iter()
        .filter_map(|s| {
            let text = percent_decode(&s.text)?;
            (text != s.text).then_some(Secret {
                text,
                start: s.start,
                end: s.end,
            })
        })
        .collect();
    found.extend(decoded);
    found
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escaped = match (b, bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&hi), Some(&lo)) => hex(hi).zip(hex(lo)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `text` with every ASCII letter and digit replaced by the next one of its
/// kind, `%XX` escapes left alone: same shape for the parser, different
/// characters for the leak check.
fn disguise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '%' {
            out.push(c);
            for _ in 0..2 {
                match chars.peek() {
                    Some(h) if h.is_ascii_hexdigit() => out.push(chars.next().unwrap_or('0')),
                    _ => break,
                }
            }
            continue;
        }
        let next = |base: u8, len: u8| char::from(base + (c as u8 - base + 1) % len);
        out.push(match c {
            '0'..='9' => next(b'0', 10),
            'a'..='z' => next(b'a', 26),
            'A'..='Z' => next(b'A', 26),
            other => other,
        });
    }
    out
}
