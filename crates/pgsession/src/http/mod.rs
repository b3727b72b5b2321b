//! The HTTP side: a tower [`SessionLayer`] that gives each request a lazy
//! [`Session`], and (with the `axum` feature) the extractor for it.
//!
//! A request's session is loaded only when the handler first reads or
//! writes it; after the handler, and before the response leaves, the
//! session is saved if it changed, or its expiry is moved with a cheap
//! touch when it would move by more than the touch step. A store failure
//! becomes a [`SessionError`], which answers 503 with `Retry-After` and a
//! short JSON body, never an empty 500.

mod backend;
mod error;
#[cfg(feature = "axum")]
mod extract;
mod layer;
mod session;
mod settings;
#[cfg(test)]
mod tests;

pub use error::SessionError;
pub use layer::{SessionLayer, SessionService};
pub use session::Session;
pub use settings::CookieSecure;
