//! Operational events: each is one function that logs and counts, so logs
//! and metrics cannot disagree. Never given payload values or secrets.

use crate::breaker::{State, Transition};
use crate::telemetry::metrics::*;

pub fn breaker_transition(m: &Metrics, route: &str, t: &Transition) {
    tracing::warn!(
        route,
        from = t.from.as_str(),
        to = t.to.as_str(),
        reason = t.reason.as_str(),
        "breaker transition"
    );
    m.breaker_transitions
        .get_or_create(&TransitionLabels {
            route: route.into(),
            from: t.from.as_str().into(),
            to: t.to.as_str().into(),
        })
        .inc();
}

pub fn breaker_state(m: &Metrics, route: &str, state: State) {
    for s in [State::Closed, State::Open, State::HalfOpen] {
        m.breaker_state
            .get_or_create(&StateLabels {
                route: route.into(),
                state: s.as_str().into(),
            })
            .set(i64::from(s == state));
    }
}

/// A sync call waited for an outbound rate-limit token (SPEC §9).
pub fn rate_limit_wait(m: &Metrics, route: &str) {
    if !m.enabled {
        return;
    }
    m.rate_limit_waits
        .get_or_create(&RouteLabels {
            route: route.into(),
        })
        .inc();
}

pub fn rejected(m: &Metrics, route: &str, reason: &'static str) {
    tracing::debug!(route, reason, "call not made");
    if !m.enabled {
        return;
    }
    m.breaker_rejections
        .get_or_create(&ReasonLabels {
            route: route.into(),
            reason: reason.into(),
        })
        .inc();
}

pub fn health_probe(m: &Metrics, route: &str, ok: bool) {
    tracing::info!(route, ok, "health probe");
    m.health_probes
        .get_or_create(&ProbeLabels {
            route: route.into(),
            result: if ok { "ok" } else { "failed" }.into(),
        })
        .inc();
}

/// A reload ended: `result` is `applied`, `unchanged` or `rejected`, counted
/// as `ok`, `unchanged` and `error` in `gateway_reloads_total`.
pub fn reload(m: &Metrics, result: &str, generation: u64) {
    let label = match result {
        "applied" => "ok",
        "unchanged" => "unchanged",
        _ => "error",
    };
    m.reloads
        .get_or_create(&ResultLabels {
            result: label.into(),
        })
        .inc();
    m.config_generation.set(generation as i64);
}

pub fn request(m: &Metrics, bot: &str, route: &str, status: u16, seconds: f64) {
    if !m.enabled {
        return;
    }
    m.requests
        .get_or_create(&RequestLabels {
            bot: bot.into(),
            route: route.into(),
            status: status_class(status),
        })
        .inc();
    m.request_duration
        .get_or_create(&BotRouteLabels {
            bot: bot.into(),
            route: route.into(),
        })
        .observe(seconds);
}
