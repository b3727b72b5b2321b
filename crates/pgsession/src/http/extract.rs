//! The axum extractor: `async fn handler(session: Session)`.

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::StatusCode;

use super::Session;

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "Can't extract the session. Is `pgsession::http::SessionLayer` on this route?",
        ))
    }
}
