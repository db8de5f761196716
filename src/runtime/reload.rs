//! Load → compile → build → swap, shared by start-up, SIGHUP and
//! `POST /admin/reload`. A configuration with errors is never applied: the
//! running one keeps serving, and the failure is logged and reported.

use std::path::Path;
use std::sync::Arc;

use super::Runtime;
use crate::config::compile::{LoadOptions, load};
use crate::config::diagnostic::display_path;
use crate::http::{Gateway, ReloadReport};

/// Reloads `routes_dir` into `gw`; the report of what happened.
pub fn reload(
    gw: &Gateway,
    routes_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> ReloadReport {
    let loaded = load(
        &[routes_dir.to_path_buf()],
        &LoadOptions {
            env,
            require_env: true,
            check_examples: false,
        },
    );
    let base = std::env::current_dir().unwrap_or_default();
    let diagnostics: Vec<String> = loaded
        .diagnostics
        .iter()
        .map(|d| d.to_text(&base))
        .collect();
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let report = match loaded.config {
        Some(config) => {
            let prev = gw.runtime.load_full();
            if config.hash == prev.config.hash {
                ReloadReport {
                    at,
                    ok: true,
                    generation: prev.generation,
                    hash: prev.config.hash.clone(),
                    diagnostics,
                }
            } else {
                let rt = Runtime::build(Arc::new(config), Some(&prev), tokio::time::Instant::now());
                let (generation, hash) = (rt.generation, rt.config.hash.clone());
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
        }
        None => {
            let prev = gw.runtime.load();
            for d in &diagnostics {
                tracing::warn!(diagnostic = %d, "reload rejected");
            }
            tracing::error!(
                errors = loaded.error_count(),
                generation = prev.generation,
                "reload rejected: the running configuration keeps serving"
            );
            ReloadReport {
                at,
                ok: false,
                generation: prev.generation,
                hash: prev.config.hash.clone(),
                diagnostics,
            }
        }
    };
    *gw.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
    report
}
