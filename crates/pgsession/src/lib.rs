//! pgsession: HTTP sessions in PostgreSQL that keep working when the
//! database does not.
//!
//! The crate has three layers, each usable alone:
//!
//! - the store engine ([`Store`]): a dedicated pool, the session table,
//!   operations retried on transient errors, and a pruner;
//! - express-session compatibility ([`cookie`], [`record`]): signed cookies
//!   and stored documents a Node service can share;
//! - the HTTP layer ([`http`]): a tower `Layer` and an axum extractor.
//!
//! ```no_run
//! use axum::{routing::post, Router};
//! use pgsession::{cookie::Secrets, http::{Session, SessionError, SessionLayer}, Config, Store};
//!
//! async fn count(session: Session) -> Result<String, SessionError> {
//!     let views = session.get::<u64>("views").await?.unwrap_or(0) + 1;
//!     session.insert("views", views).await?; // saved before the response leaves
//!     Ok(views.to_string())
//! }
//!
//! # async fn app() -> Result<Router, Box<dyn std::error::Error>> {
//! let store = Store::new(Config::from_env()?)?; // DATABASE_URL, PGSESSION_*
//! let secrets = Secrets::parse_list(&std::env::var("SESSION_SECRET")?)?;
//! Ok(Router::new().route("/count", post(count)).layer(SessionLayer::new(store, secrets)))
//! # }
//! ```

mod backend;
pub mod config;
pub mod cookie;
mod error;
mod health;
pub mod http;
mod memory;
pub mod metrics;
mod pool;
pub mod record;
mod resilience;
pub mod schema;
mod sizing;
mod store;
pub mod tls;
#[cfg(feature = "tower-sessions")]
pub mod tower_sessions;

pub use backend::SessionBackend;
pub use config::{Config, ConfigBuilder, ConfigError, PoolerMode, SslMode, TlsConfig};
pub use error::{Error, ErrorKind};
pub use health::{
    CheckResult, CheckSource, Event, HealthStatus, JournalHealth, StoreHealth, TimelineEntry,
    WriteBackProgress,
};
pub use memory::MemoryStore;
pub use pool::{connect_one, each_host, PoolStatus};
pub use record::StoredSession;
pub use resilience::breaker::BreakerState;
pub use resilience::dead_letter;
pub use schema::{DoctorQueries, Identifier};
pub use store::{PruneOutcome, ServerInfo, Store};
