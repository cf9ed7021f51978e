//! `dory orchestrator`: the daemon. Takes leadership, reconciles, serves `/healthz`,
//! `/metrics` and `/status`, logs every event.

use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use dory_core::orchestrator::{Event, Orchestrator, OrchestratorHandle};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::backends;
use crate::config::Loaded;
use crate::metrics::Metrics;

/// Runs the orchestrator until SIGINT or SIGTERM. Instances keep running after it stops
/// (local processes each in a session of their own, or pods); the next orchestrator
/// re-adopts them.
///
/// One body for every placement: the orchestrator takes its backends as trait objects, and
/// [`backends::placed`] gives the placement, its control channel and the leadership (on
/// Kubernetes the store's inside a Lease).
pub(crate) async fn run(loaded: Loaded, supervisor: Vec<String>) -> Result<()> {
    let store = backends::store(&loaded).await?;
    let config = backends::config_source(&loaded, &store).await?;
    let placed = backends::placed(&loaded, &store, supervisor).await?;
    let orchestrator = Orchestrator::builder(
        config,
        placed.placement,
        placed.control,
        store.store.clone(),
        placed.leadership,
    )
    .status_sink(store.status.clone())
    .settings(loaded.settings.clone())
    .build();
    let handle = orchestrator.handle();
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    // Subscribed here, before the orchestrator runs: a subscription taken inside the task
    // would miss whatever is emitted before the task first runs, such as the `Leading` event
    // the `dory_leader` and `dory_term` gauges come from.
    tokio::spawn(follow_events(handle.events(), metrics.clone()));
    tokio::spawn(follow_views(handle.clone(), metrics.clone()));

    let listen = loaded.config.orchestrator.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen} (`orchestrator.listen`)"))?;
    // The address actually bound: with port 0 in the config, this is the only place that
    // says where /metrics and /status are.
    let bound = listener
        .local_addr()
        .with_context(|| format!("the address bound for {listen}"))?;
    let app = router(handle, metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(target: "dory::daemon", error = %e, "the HTTP server stopped");
        }
    });
    tracing::info!(
        target: "dory::daemon",
        config = %loaded.path.display(),
        listen = %bound,
        placement = %placed.describe,
        "orchestrator starting"
    );
    orchestrator
        .run_until(shutdown_signal())
        .await
        .context("the orchestrator stopped")?;
    tracing::info!(target: "dory::daemon", "orchestrator stopped; instances keep running");
    Ok(())
}

fn router(handle: OrchestratorHandle, metrics: Arc<Mutex<Metrics>>) -> Router {
    let health = handle.clone();
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let view = health.view();
                async move {
                    match view.term {
                        Some(term) => (StatusCode::OK, format!("leading, term {term}\n")),
                        None => (StatusCode::OK, "standing by (not leading)\n".to_string()),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.lock().unwrap_or_else(|e| e.into_inner()).render();
                async move {
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
                }
            }),
        )
        .route(
            "/status",
            get(move || {
                let view = handle.view();
                async move {
                    let statuses: Vec<_> = view.status.values().cloned().collect();
                    match serde_json::to_string_pretty(&statuses) {
                        Ok(body) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, "application/json")],
                            body,
                        )
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        )
}

async fn follow_events(mut events: broadcast::Receiver<Event>, metrics: Arc<Mutex<Metrics>>) {
    loop {
        match events.recv().await {
            Ok(event) => {
                tracing::info!(target: "dory::events", "{event}");
                metrics
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .event(&event);
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(target: "dory::events", missed = n, "events were dropped; metrics undercount them");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

async fn follow_views(mut handle: OrchestratorHandle, metrics: Arc<Mutex<Metrics>>) {
    loop {
        let view = handle.next_view().await;
        metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .view(&view);
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(target: "dory::daemon", error = %e, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!(target: "dory::daemon", "shutting down: letting operations in flight finish");
}
