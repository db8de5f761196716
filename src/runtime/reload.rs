//! Load → compile → build → swap, shared by start-up, SIGHUP, the file
//! watcher and `POST /admin/reload`. A configuration with errors is never
//! applied: the running one keeps serving, and the failure is logged, counted
//! and reported at `/admin/status`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Runtime;
use crate::config::compile::{LoadOptions, Loaded, current_hash, load};
use crate::config::diagnostic::display_path;
use crate::config::model::OutboundAuth;
use crate::http::{Gateway, ReloadReport};

/// Most loads when files keep changing under us.
const MAX_LOADS: u32 = 5;

/// Reloads `routes_dir` into `gw`; the report of what happened.
pub fn reload(
    gw: &Gateway,
    routes_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> ReloadReport {
    // A file being written while we read it (truncate, then write) can read as empty,
    // and an empty route file is valid. Load again until no file changed during the load.
    let inputs = [routes_dir.to_path_buf()];
    let mut loads = 0;
    let loaded = loop {
        let loaded = load(
            &inputs,
            &LoadOptions {
                env,
                require_env: true,
                check_examples: false,
                cache: Some(&gw.parse_cache),
            },
        );
        loads += 1;
        match &loaded.config {
            Some(c) if loads < MAX_LOADS && current_hash(&inputs, c) != c.hash => {
                tracing::debug!("route files changed during the load; loading again");
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => break loaded,
        }
    };
    let report = apply(gw, routes_dir, loaded);
    crate::telemetry::events::reload(&gw.shared.metrics, report.ok, report.generation);
    *gw.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
    report
}

fn apply(gw: &Gateway, routes_dir: &Path, loaded: Loaded) -> ReloadReport {
    let base = std::env::current_dir().unwrap_or_default();
    let diagnostics: Vec<String> = loaded
        .diagnostics
        .iter()
        .map(|d| d.to_text(&base))
        .collect();
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let prev = gw.runtime.load_full();
    let Some(config) = loaded.config else {
        for d in &diagnostics {
            tracing::warn!(diagnostic = %d, "reload rejected");
        }
        tracing::error!(
            errors = loaded.diagnostics.iter().filter(|d| d.is_error()).count(),
            generation = prev.generation,
            "reload rejected: the running configuration keeps serving"
        );
        return ReloadReport {
            at,
            ok: false,
            generation: prev.generation,
            hash: prev.config.hash.clone(),
            diagnostics,
        };
    };
    if config.hash == prev.config.hash {
        return ReloadReport {
            at,
            ok: true,
            generation: prev.generation,
            hash: prev.config.hash.clone(),
            diagnostics,
        };
    }
    let rt = Runtime::build(Arc::new(config), Some(&prev), tokio::time::Instant::now());
    let (generation, hash) = (rt.generation, rt.config.hash.clone());
    // Tokens for credentials no route uses any more are dropped.
    gw.shared.tokens.retain(
        rt.config
            .routes
            .values()
            .filter_map(|r| match &r.downstream.auth {
                OutboundAuth::OAuth2(c) => Some(c),
                _ => None,
            }),
    );
    gw.runtime.store(Arc::new(rt));
    tracing::info!(generation, hash = %hash, dir = %display_path(routes_dir, &base), "configuration reloaded");
    ReloadReport {
        at,
        ok: true,
        generation,
        hash,
        diagnostics,
    }
}
