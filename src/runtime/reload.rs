//! Load → compile → build → swap: the one path of start-up (a reload from
//! nothing), SIGHUP, the file watcher and `POST /admin/reload`. Reloads run
//! one at a time (the gateway's reload lock). A configuration with errors is
//! never applied: the running one keeps serving, and the failure is logged,
//! counted and reported at `/admin/status`. A load whose configuration hash
//! equals the running one changes nothing (`Unchanged`: generation and hash
//! kept, not counted as applied).

use std::sync::Arc;
use std::time::Duration;

use super::Runtime;
use super::gateway::{Gateway, ReloadReport};
use crate::config::compile::{LoadOptions, Loaded, current_hash, load};
use crate::config::diagnostic::{Diagnostic, display_path};
use crate::config::model::OutboundAuth;

/// Most loads when files keep changing under us.
const MAX_LOADS: u32 = 5;

/// What one reload did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// A new generation is serving.
    Applied(ReloadReport),
    /// The files compile to the running configuration: nothing was swapped.
    Unchanged(ReloadReport),
    /// The configuration has errors: the running one (if any) keeps serving.
    /// The diagnostics are kept whole for start-up's error output.
    Rejected {
        report: ReloadReport,
        diagnostics: Vec<Diagnostic>,
    },
}

impl ReloadOutcome {
    pub fn report(&self) -> &ReloadReport {
        match self {
            ReloadOutcome::Applied(r) | ReloadOutcome::Unchanged(r) => r,
            ReloadOutcome::Rejected { report, .. } => report,
        }
    }
    pub fn is_rejected(&self) -> bool {
        matches!(self, ReloadOutcome::Rejected { .. })
    }
}

/// Reloads `gw.routes_dir` into `gw`, one reload at a time. Blocking.
pub fn apply(gw: &Gateway) -> ReloadOutcome {
    let _serial = gw.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
    let loaded = load_settled(gw);
    let outcome = swap(gw, loaded);
    let report = outcome.report();
    crate::telemetry::events::reload(&gw.shared.metrics, report.result, report.generation);
    *gw.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
    outcome
}

/// Loads until no file changed during the load: a file being written while we
/// read it (truncate, then write) can read as empty, and an empty route file is valid.
fn load_settled(gw: &Gateway) -> Loaded {
    let inputs = [gw.routes_dir.clone()];
    let mut loads = 0;
    loop {
        let loaded = load(
            &inputs,
            &LoadOptions {
                env: &gw.env,
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
            _ => return loaded,
        }
    }
}

fn swap(gw: &Gateway, loaded: Loaded) -> ReloadOutcome {
    let base = std::env::current_dir().unwrap_or_default();
    let texts: Vec<String> = loaded
        .diagnostics
        .iter()
        .map(|d| d.to_text(&base))
        .collect();
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let prev = gw.runtime.load_full();
    let report = |result, generation, hash: &str, diagnostics| ReloadReport {
        at: at.clone(),
        result,
        ok: result != "rejected",
        generation,
        hash: hash.to_owned(),
        diagnostics,
    };
    let Some(config) = loaded.config else {
        for d in &texts {
            tracing::warn!(diagnostic = %d, "reload rejected");
        }
        tracing::error!(
            errors = loaded.diagnostics.iter().filter(|d| d.is_error()).count(),
            generation = prev.generation,
            "reload rejected: the running configuration keeps serving"
        );
        return ReloadOutcome::Rejected {
            report: report("rejected", prev.generation, &prev.config.hash, texts),
            diagnostics: loaded.diagnostics,
        };
    };
    // from now on, no log line shows a `${VAR}` value of this configuration
    crate::telemetry::log_redact::remember(&config.redactor);
    if prev.generation > 0 && config.hash == prev.config.hash {
        return ReloadOutcome::Unchanged(report(
            "unchanged",
            prev.generation,
            &prev.config.hash,
            texts,
        ));
    }
    // Each downstream `tls` setting gets its client now, not on the first call.
    if let Err(e) = gw.shared.prepare_clients(&config) {
        tracing::error!(error = %e, "reload rejected: the running configuration keeps serving");
        let mut texts = texts;
        texts.push(format!("error: {e}"));
        return ReloadOutcome::Rejected {
            report: report("rejected", prev.generation, &prev.config.hash, texts),
            diagnostics: vec![Diagnostic::error(&gw.routes_dir, e)],
        };
    }
    for d in &texts {
        tracing::warn!(diagnostic = %d, "configuration warning");
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
    let dir = display_path(&gw.routes_dir, &base);
    tracing::info!(generation, hash = %hash, dir = %dir, "configuration applied");
    ReloadOutcome::Applied(report("applied", generation, &hash, texts))
}
