//! The no-store ceiling: an axum server answering `GET /counter` with the
//! same `{"views":1}` as a session server, without any session or store.
//! What the HTTP stack alone costs on this machine; the `http` mode
//! measures the read workload against it in the same run.

use std::net::SocketAddr;

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

/// `pgsession-bench ceiling-server`.
#[derive(Debug, clap::Args)]
pub(crate) struct CeilingArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3002")]
    listen: SocketAddr,
}

/// Runs the ceiling server until SIGTERM or SIGINT.
pub(crate) async fn serve(args: CeilingArgs) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/counter", get(counter))
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::peer::shutdown_signal())
        .await?;
    Ok(())
}

async fn counter() -> Json<Value> {
    Json(json!({ "views": 1 }))
}
