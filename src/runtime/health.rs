//! Health probes: for a route with `breaker.health`, a task that GETs the
//! health URL every `interval` while (and only while) the breaker is open; a
//! success moves the breaker to half-open early. The route's credentials
//! (bearer or OAuth2 token) are sent only when the health URL is on the
//! downstream's own origin (`HealthSettings::credentials`, SPEC §7.4).
//!
//! One task per route state identity: it follows the route across reloads
//! that keep its state, and ends when the route is changed or removed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::time::Instant;

use crate::config::model::OutboundAuth;
use crate::runtime::Gateway;
use crate::telemetry::events;

/// Starts the probe task of every route that has a health probe and none running yet.
pub fn start_probes(gw: &Arc<Gateway>) {
    let rt = gw.runtime.load();
    for (name, state) in &rt.routes {
        if state.route.health.is_some() && !state.identity.swap(true, Ordering::SeqCst) {
            let identity = Arc::downgrade(&state.identity);
            tokio::spawn(probe_loop(Arc::downgrade(gw), name.clone(), identity));
        }
    }
}

async fn probe_loop(
    gw: Weak<Gateway>,
    name: String,
    identity: Weak<std::sync::atomic::AtomicBool>,
) {
    loop {
        // The current route and its settings (secrets may have rotated on reload).
        let interval = {
            let Some(gw) = gw.upgrade() else { return };
            let rt = gw.runtime.load();
            let Some(state) = rt.routes.get(&name) else {
                return;
            };
            let Some(me) = identity.upgrade() else { return };
            if !Arc::ptr_eq(&state.identity, &me) {
                return; // the route changed: its new state has its own task
            }
            let Some(h) = &state.route.health else { return };
            h.interval
        };
        tokio::time::sleep(interval).await;
        let Some(gw) = gw.upgrade() else { return };
        let rt = gw.runtime.load_full();
        let Some(state) = rt.routes.get(&name) else {
            return;
        };
        if state.breaker.blocked_until(Instant::now()).is_none() {
            continue; // only while open
        }
        let route = &state.route;
        let Some(h) = &route.health else { return };
        // The route's credentials, its client certificate included, go only to
        // its own origin (decided at load); every probe goes through the egress proxy.
        let (auth, tls) = if h.credentials {
            (&route.downstream.auth, route.downstream.tls.as_deref())
        } else {
            (&OutboundAuth::None, None)
        };
        let Some(client) = gw.shared.client_for(tls) else {
            events::health_probe(&gw.shared.metrics, &name, false);
            continue;
        };
        let mut req = client.get(&h.url).timeout(route.downstream.timeout);
        match auth {
            OutboundAuth::OAuth2(creds) => match gw.shared.tokens.token_via(creds, &client).await {
                Ok(t) => req = req.header(http::header::AUTHORIZATION, t.bearer_header()),
                Err(_) => {
                    events::health_probe(&gw.shared.metrics, &name, false);
                    continue;
                }
            },
            other => {
                if let Some(v) = other.static_header() {
                    req = req.header(http::header::AUTHORIZATION, v);
                }
            }
        }
        let ok = matches!(req.send().await, Ok(r) if r.status().is_success());
        events::health_probe(&gw.shared.metrics, &name, ok);
        if ok && let Some(t) = state.breaker.force_half_open(Instant::now()) {
            events::breaker_transition(&gw.shared.metrics, &name, &t);
        }
    }
}
