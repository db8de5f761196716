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
    let outcome = at_low_priority(|| swap(gw, load_settled(gw)));
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

/// How much lower than the serving threads a reload's load and compile run
/// (a `nice` increment).
const RELOAD_NICENESS: libc::c_int = 10;

/// Runs `f` (a load: reading, parsing, compiling every route file; ~90 ms
/// of CPU at 1,000 routes) on a thread of its own at a lower CPU priority,
/// and waits for it. On a small machine a reload otherwise takes a core from
/// the webhooks for its whole length and shows in their p99 (bench/reload.sh).
/// Linux keeps a nice value per thread, so only this thread is lowered; the
/// thread ends with the load, so no pooled thread stays lowered.
fn at_low_priority<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    // Kept here, so the load can still run on the caller's thread when no
    // thread can be had (the process is at its thread limit).
    let job = std::sync::Mutex::new(Some(f));
    let run = || {
        job.lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|f| f())
    };
    let on_thread = std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("reload".into())
            .spawn_scoped(scope, || {
                // SAFETY: setpriority takes plain integers and changes only the
                // calling thread's nice value (`who` 0 on Linux: this thread).
                // Failing (e.g. a seccomp filter) only leaves it at normal priority.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, RELOAD_NICENESS);
                }
                run()
            });
        spawned.ok().map(|handle| {
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    });
    on_thread.flatten().or_else(run).expect("the load ran once")
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
    let outcome = ReloadOutcome::Applied(report("applied", generation, &hash, texts));
    // (a thread of its own, so the reload lock and the caller wait for none of it)
    let _ = std::thread::Builder::new()
        .name("reload-free".into())
        .spawn(move || free_here(prev));
    outcome
}

/// Most time [`free_here`] waits for the requests still on the old generation.
const FREE_WAIT: Duration = Duration::from_secs(2);

/// Drops the old generation on the calling thread (spawned by the reload,
/// so at its lowered priority) once the requests still running on it are
/// done, bounded by [`FREE_WAIT`]. Freeing a
/// generation of 1,000 compiled routes takes milliseconds; done by whichever
/// request let go of it last, it would land on a serving thread and in the
/// webhooks' p99.
fn free_here<T>(prev: Arc<T>) {
    let until = std::time::Instant::now() + FREE_WAIT;
    while Arc::strong_count(&prev) > 1 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(prev);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn niceness() -> libc::c_int {
        // SAFETY: getpriority reads the calling thread's nice value.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    /// Records the name of the thread it is dropped on.
    struct Witness(std::sync::mpsc::Sender<Option<String>>);

    impl Drop for Witness {
        fn drop(&mut self) {
            let _ = self
                .0
                .send(std::thread::current().name().map(str::to_owned));
        }
    }

    #[test]
    fn the_old_generation_is_freed_by_the_reload_not_by_its_last_request() {
        let (tx, rx) = std::sync::mpsc::channel();
        let generation = Arc::new(Witness(tx));
        let request = generation.clone(); // a request still running on it
        let free = std::thread::Builder::new()
            .name("reload-free".into())
            .spawn(move || free_here(generation))
            .unwrap();
        drop(request); // the request ends: not the last holder
        free.join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("reload-free"));
    }

    #[test]
    fn a_load_runs_on_a_lowered_thread_and_the_caller_stays_as_it_was() {
        let before = niceness();
        let (inside, name) =
            at_low_priority(|| (niceness(), std::thread::current().name().map(str::to_owned)));
        assert_eq!(inside, (before + RELOAD_NICENESS).min(19));
        assert_eq!(name.as_deref(), Some("reload"));
        assert_eq!(niceness(), before, "the caller's priority is untouched");
    }
}
