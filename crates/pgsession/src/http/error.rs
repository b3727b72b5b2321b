//! What a handler gets when its session cannot be read or written, and the
//! response that error becomes.

use http::{header, HeaderValue, Response, StatusCode};

use crate::record::RecordError;
use crate::{Error, ErrorKind};

/// A session operation failed.
///
/// As a response: 503 with `Retry-After: 1` when the store is unavailable
/// (see [`SessionError::status`]), 413 when the session is over its size
/// limit, 500 otherwise; each with a JSON body `{"error": "..."}`. An
/// application that wants to go on without a session can match on it
/// instead.
///
/// Each variant shows its cause in its message and does not return it again
/// from `source()`, so a chain printer (anyhow's `{:#}`) says it once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The store could not be reached or failed; a session over the size
    /// limit is [`Error::TooLarge`] here too.
    #[error("session store unavailable: {0}")]
    Store(Error),
    /// A value could not be stored (e.g. the reserved key `cookie`).
    #[error("invalid session value: {0}")]
    Value(RecordError),
}

impl From<Error> for SessionError {
    fn from(error: Error) -> Self {
        SessionError::Store(error)
    }
}

impl From<RecordError> for SessionError {
    fn from(error: RecordError) -> Self {
        match error {
            // One "too large" for the handler, whichever layer measured it.
            RecordError::TooLarge { size, limit } => {
                SessionError::Store(Error::TooLarge { size, limit })
            }
            other => SessionError::Value(other),
        }
    }
}

impl SessionError {
    /// The status this error answers with.
    ///
    /// 503 (with `Retry-After`) whenever the store cannot serve now with
    /// nothing wrong in the request: a transient failure (the database away
    /// or busy, the pool saturated), a journal that cannot take a write
    /// while the database is away, and a configuration error, whether the
    /// database reports it (a certificate, TLS, a password, a missing
    /// database) or the store found it (a missing table with
    /// `create_table` off). Each of those is mended outside the request (a
    /// password reset, a certificate renewed, `pgsession migrate`), the
    /// store serves again by itself once it is, and `/health` names the
    /// setting meanwhile: to the client it is an unavailable service, not a
    /// failed one. 500 is left for what no waiting mends.
    pub fn status(&self) -> StatusCode {
        match self {
            SessionError::Store(Error::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            SessionError::Store(e)
                if e.is_transient()
                    || e.config_hint().is_some()
                    || e.kind() == ErrorKind::Journal =>
            {
                StatusCode::SERVICE_UNAVAILABLE
            }
            SessionError::Store(_) | SessionError::Value(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error as an HTTP response with a JSON body.
    pub fn to_response<B: From<String>>(&self) -> Response<B> {
        let status = self.status();
        let message = match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                "session store unavailable, try again shortly".to_owned()
            }
            StatusCode::PAYLOAD_TOO_LARGE => match self {
                SessionError::Store(e) => e.to_string(),
                other => other.to_string(),
            },
            _ => "session error".to_owned(),
        };
        let body = serde_json::json!({ "error": message }).to_string();
        let mut response = Response::new(B::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for SessionError {
    fn into_response(self) -> axum::response::Response {
        if self.status().is_server_error() {
            tracing::warn!(target: "session_store", error = %self, "session unavailable for this request");
        }
        self.to_response()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn status(error: Error) -> StatusCode {
        SessionError::Store(error).status()
    }

    #[test]
    fn what_no_request_caused_is_a_503_and_the_rest_a_500() {
        let unavailable = [
            Error::Unavailable,
            Error::AcquireTimeout(Duration::from_secs(1)),
            Error::JournalUnavailable {
                reason: "full".to_owned(),
            },
            Error::Config(crate::ConfigError::invalid(
                "create_table",
                "the table is missing",
            )),
            Error::Batched(std::sync::Arc::new(Error::Unavailable)),
        ];
        for error in unavailable {
            let text = error.to_string();
            let response: Response<String> = SessionError::Store(error).to_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{text}");
            assert!(
                response.headers().contains_key(header::RETRY_AFTER),
                "{text}"
            );
        }
        assert_eq!(
            status(Error::StoreClosed),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status(Error::TooLarge { size: 2, limit: 1 }),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[test]
    fn the_cause_is_said_once() {
        use std::error::Error as _;
        let error = SessionError::Store(Error::Unavailable);
        assert!(
            error.to_string().contains("circuit breaker open"),
            "{error}"
        );
        assert!(
            error.source().is_none(),
            "the cause is in the message already"
        );
        let error = SessionError::from(RecordError::ReservedKey);
        assert!(error.to_string().contains("reserved"), "{error}");
        assert!(error.source().is_none());
    }
}
