//! Reload on file changes: watch the routes directory and every directory
//! holding a referenced schema (recursively, debounced), and the directory of
//! every file read for a `${file:…}` value or a downstream `tls` file (not
//! recursively: a secret rotated in place, or a Kubernetes Secret's `..data`
//! swap, is an event there); on any event rescan
//! and reload through the one reload path (`Gateway::reload`), which compares
//! the content hash, so editor temp+rename, truncate-then-write, `git
//! checkout`, deletions, new folders and a ConfigMap's `..data` symlink swap
//! all end in the same place. An optional slow poll covers filesystems
//! without events.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};

use crate::runtime::Gateway;

/// Keeps the watcher alive; dropping it stops watching.
pub struct WatchHandle {
    _task: tokio::task::JoinHandle<()>,
}

/// Starts watching `gw.routes_dir` (and schema directories) and reloading on change.
pub fn spawn(
    gw: Arc<Gateway>,
    debounce: Duration,
    poll: Option<Duration>,
) -> notify::Result<WatchHandle> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut debouncer = new_debouncer(debounce, None, move |res: DebounceEventResult| match res {
        Ok(events) if !events.is_empty() => {
            let _ = tx.send(());
        }
        Ok(_) => {}
        Err(errors) => {
            for e in errors {
                tracing::warn!(error = %e, "file watcher error");
            }
        }
    })?;
    debouncer.watch(&gw.routes_dir, RecursiveMode::Recursive)?;
    let debouncer = Arc::new(Mutex::new(debouncer));
    let mut watched: BTreeSet<PathBuf> = BTreeSet::new();
    watch_schema_dirs(&gw, &debouncer, &mut watched);
    let dir = gw.routes_dir.display().to_string();
    let task = tokio::spawn(async move {
        let mut ticker = poll.map(tokio::time::interval);
        loop {
            let event = async {
                match ticker.as_mut() {
                    Some(t) => {
                        tokio::select! {
                            e = rx.recv() => e.is_some(),
                            _ = t.tick() => true,
                        }
                    }
                    None => rx.recv().await.is_some(),
                }
            };
            if !event.await {
                return;
            }
            while rx.try_recv().is_ok() {} // coalesce a burst into one reload
            let g = gw.clone();
            let _ = tokio::task::spawn_blocking(move || g.reload()).await;
            watch_schema_dirs(&gw, &debouncer, &mut watched);
        }
    });
    tracing::info!(dir = %dir, debounce_ms = debounce.as_millis() as u64, "watching route files");
    Ok(WatchHandle { _task: task })
}

type Debouncer = notify_debouncer_full::Debouncer<
    notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

/// Adds a watch on each directory holding a referenced schema (recursively) or
/// a referenced file (`${file:…}`, `tls`; that directory only), outside the routes dir.
fn watch_schema_dirs(gw: &Gateway, debouncer: &Mutex<Debouncer>, watched: &mut BTreeSet<PathBuf>) {
    let rt = gw.runtime.load();
    let routes = gw
        .routes_dir
        .canonicalize()
        .unwrap_or_else(|_| gw.routes_dir.clone());
    let schemas = rt
        .config
        .schema_files
        .iter()
        .map(|f| (f, RecursiveMode::Recursive));
    let files = rt
        .config
        .referenced_files
        .iter()
        .map(|f| (f, RecursiveMode::NonRecursive));
    for (f, mode) in schemas.chain(files) {
        let Some(dir) = f.parent() else { continue };
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        if dir.starts_with(&routes) || watched.contains(&dir) {
            continue;
        }
        let mut d = debouncer.lock().unwrap_or_else(|e| e.into_inner());
        match d.watch(&dir, mode) {
            Ok(()) => {
                watched.insert(dir);
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a referenced directory")
            }
        }
    }
}
