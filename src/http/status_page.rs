//! The status page at the admin listener's `/`: routes per bot, breaker
//! state and time to half-open, recent p50/p99 and SLA compliance, answer and
//! error counts, the last reload (with its diagnostics when it failed), and
//! dead letters. Server-rendered HTML, no build step, refreshes itself, fits a
//! phone. Every dynamic string is HTML-escaped; no secret is ever rendered.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tokio::time::Instant;

use crate::breaker::State;
use crate::config::model::Intent;
use crate::runtime::Gateway;

/// Queue figures and the newest dead letters, read from the store by the caller.
pub struct Deliveries {
    pub stats: crate::store::Stats,
    pub dead: Vec<crate::store::DeliverySummary>,
}

/// Renders the page (`deliveries` is `None` when the store did not answer).
pub fn render(gw: &Gateway, deliveries: Option<Deliveries>) -> String {
    let rt = gw.runtime.load();
    let now = Instant::now();
    let sla = gw.shared.limits.sla;
    let last = gw.last_reload();
    let mut h = String::with_capacity(16 * 1024);
    h.push_str(HEAD);
    let _ = write!(
        h,
        "<header><h1>cognigy-gateway</h1><p>generation <b>{}</b> · config <code>{}</code> · {} · {} · SLA {}</p></header>",
        rt.generation,
        esc(&rt.config.hash[..rt.config.hash.len().min(12)]),
        count(rt.config.bots.len(), "bot"),
        count(rt.config.routes.len(), "route"),
        esc(&humantime::format_duration(sla).to_string())
    );

    // last reload
    let _ = write!(
        h,
        "<section id=\"reload\" class=\"{}\"><h2>Last reload</h2><p>{} at {} (generation {})</p>",
        if last.ok { "ok" } else { "failed" },
        if last.ok {
            last.result
        } else {
            "<b>rejected</b>: the running configuration keeps serving"
        },
        esc(&last.at),
        last.generation
    );
    if !last.ok {
        h.push_str("<ul class=\"diags\">");
        for d in &last.diagnostics {
            let _ = write!(h, "<li><code>{}</code></li>", esc(d));
        }
        h.push_str("</ul>");
    }
    h.push_str("</section>");

    // routes per bot
    for (bot_id, bot) in &rt.config.bots {
        let _ = write!(
            h,
            "<section class=\"bot\"><h2>Bot <code>{}</code> <small>POST /webhooks/{}</small></h2>",
            esc(bot_id),
            esc(bot_id)
        );
        h.push_str("<div class=\"scroll\"><table><thead><tr><th>route</th><th>intent</th><th>breaker</th><th>p50</th><th>p99</th><th>SLA</th><th>answered</th><th>errors</th><th>last error</th><th>rate limit</th><th></th></tr></thead><tbody>");
        let mut names: Vec<&String> = bot.routes.values().collect();
        names.extend(bot.default_route.iter());
        for name in names {
            let Some(state) = rt.routes.get(name) else {
                continue;
            };
            route_row(&mut h, state, now, sla);
            // its `also` targets (SPEC §9) right below it
            for target in &state.route.also {
                if let Some(t) = rt.routes.get(&target.name) {
                    route_row(&mut h, t, now, sla);
                }
            }
        }
        h.push_str("</tbody></table></div></section>");
    }

    // dead letters
    h.push_str("<section id=\"dead-letters\"><h2>Dead letters</h2>");
    match deliveries {
        None => h.push_str("<p>The delivery store does not answer.</p>"),
        Some(d) => {
            let _ = write!(
                h,
                "<p>{} pending · {} in flight · {} dead{}</p>",
                d.stats.pending,
                d.stats.leased,
                d.stats.dead,
                d.stats
                    .oldest_pending_age
                    .map(|a| format!(" · oldest waiting {}s", a.as_secs()))
                    .unwrap_or_default()
            );
            if !d.dead.is_empty() {
                h.push_str("<div class=\"scroll\"><table><thead><tr><th>delivery</th><th>route</th><th>tries</th><th>last error</th><th></th></tr></thead><tbody>");
                for x in &d.dead {
                    let _ = write!(
                        h,
                        "<tr><td data-label=\"delivery\"><code>{id}</code></td><td data-label=\"route\">{}</td><td data-label=\"tries\">{}</td><td data-label=\"last error\">{}</td><td><form method=\"post\" action=\"/admin/deliveries/{id}/replay\"><button type=\"submit\" name=\"redirect\" value=\"/\">Replay</button></form></td></tr>",
                        esc(&x.route),
                        x.attempts,
                        esc(x.last_error.as_deref().unwrap_or("—")),
                        id = esc(&x.id),
                    );
                }
                h.push_str("</tbody></table></div>");
            }
        }
    }
    h.push_str("</section>");
    let _ = write!(
        h,
        "<footer>refreshes every 5 s · {}</footer></body></html>",
        esc(&humantime::format_rfc3339_seconds(SystemTime::now()).to_string())
    );
    h
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn secs(d: Option<std::time::Duration>) -> String {
    match d {
        Some(d) => format!("{}s", d.as_secs() + u64::from(d.subsec_nanos() > 0)),
        None => "—".into(),
    }
}

fn ago(at: SystemTime) -> String {
    let s = SystemTime::now()
        .duration_since(at)
        .unwrap_or_default()
        .as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The login page's inline style (allowed by the admin CSP by its hash).
macro_rules! login_style {
    () => {
        r#"body{font:16px system-ui,sans-serif;margin:2rem auto;max-width:24rem;padding:0 1rem}input,button{font:inherit;padding:.5rem;width:100%;box-sizing:border-box;margin:.25rem 0}"#
    };
}

/// The status page's inline style (allowed by the admin CSP by its hash).
macro_rules! page_style {
    () => {
        r#"
body{font:15px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;padding:1rem;color:#1b1f24;background:#f6f8fa}
header h1{margin:0;font-size:1.3rem}header p{margin:.25rem 0 1rem;color:#57606a}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:.75rem 1rem;margin-bottom:1rem}
h2{font-size:1.05rem;margin:.2rem 0 .6rem}h2 small{color:#57606a;font-weight:normal}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #eaeef2;white-space:nowrap}th{font-size:.8rem;color:#57606a}
.state{padding:.1rem .45rem;border-radius:1rem;font-size:.85rem}.closed{background:#dafbe1;color:#116329}.open{background:#ffebe9;color:#a40e26}
.half_open{background:#fff8c5;color:#7d4e00}.paused{background:#ddf4ff;color:#0a3069}
#reload.failed{border-color:#cf222e}.diags code{white-space:pre-wrap}form{margin:0}button{font:inherit;padding:.2rem .7rem;cursor:pointer}
footer{color:#57606a;font-size:.8rem}
@media (max-width:640px){thead{display:none}table,tbody,tr,td{display:block}tr{padding:.5rem 0;border-bottom:1px solid #d0d7de}
td{border:0;padding:.1rem 0;white-space:normal}td[data-label]::before{content:attr(data-label);display:inline-block;width:6.5rem;color:#57606a;font-size:.8rem}
td button{margin-top:.3rem;padding:.4rem 1.2rem}}"#
    };
}

/// The text of every inline `<style>` the admin pages send: the
/// `Content-Security-Policy` allows exactly these, by SHA-256. The pages have
/// no script and no `style=` attribute.
pub const INLINE_STYLES: [&str; 2] = [page_style!(), login_style!()];

/// The login form for browsers when `GATEWAY_ADMIN_TOKEN` is set.
pub const LOGIN: &str = concat!(
    r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>cognigy-gateway · sign in</title><style>"#,
    login_style!(),
    r#"</style></head><body><h1>Admin sign-in</h1><form method="post" action="/login"><label>Admin token <input type="password" name="token" autocomplete="current-password" required></label><button type="submit">Sign in</button></form></body></html>"#
);

const HEAD: &str = concat!(
    r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><meta http-equiv="refresh" content="5"><title>cognigy-gateway status</title><style>"#,
    page_style!(),
    r#"</style></head><body>"#
);

/// One route's row (an `also` target's too: its intent cell names its route).
fn route_row(
    h: &mut String,
    state: &crate::runtime::RouteState,
    now: Instant,
    sla: std::time::Duration,
) {
    let name = &state.route.name;
    let r = &state.route;
    let view = state.breaker.state(now);
    let paused = state.paused_until(now);
    let (class, label) = match (view.state, paused) {
        (State::Open, _) => (
            "open",
            format!("open · half-open in {}", secs(view.half_open_in)),
        ),
        (State::HalfOpen, _) => ("half_open", "half-open".to_string()),
        (State::Closed, Some(t)) => ("paused", format!("paused (429) · {}", secs(Some(t - now)))),
        (State::Closed, None) => ("closed", "closed".to_string()),
    };
    let lat = state.latency.end_to_end.summary(sla, now);
    let intent = match (&r.also_of, &r.intent) {
        (Some(parent), _) => format!("<i>also of</i> <code>{}</code>", esc(parent)),
        (None, Intent::Exact(i)) => esc(i),
        (None, Intent::Default) => "<i>* default</i>".to_string(),
    };
    // SPEC §9: the outbound token bucket, with the tokens free right now
    let rate = match &state.outbound {
        Some(b) => {
            let l = b.limit();
            format!(
                "{}/s · burst {} · {:.0} free",
                l.per_second(),
                l.burst(),
                b.available(now).floor()
            )
        }
        None => "—".to_string(),
    };
    let last_error = state
        .stats
        .last_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|(at, status, kind)| format!("{status} {} · {} ago", esc(kind), ago(*at)))
        .unwrap_or_else(|| "—".into());
    let (p50, p99, slap) = if lat.count == 0 {
        ("—".to_string(), "—".to_string(), "—".to_string())
    } else {
        (
            ms(lat.p50_ms),
            ms(lat.p99_ms),
            format!("{:.1}%", lat.sla_compliance * 100.0),
        )
    };
    let reset = if view.state == State::Closed {
        String::new()
    } else {
        format!(
            "<form method=\"post\" action=\"/admin/breakers/{}/reset\"><button type=\"submit\" name=\"redirect\" value=\"/\" data-route=\"{}\">Reset</button></form>",
            // an `also` target's name holds a `/`: one path segment, encoded
            esc(&name.replace('/', "%2F")),
            esc(name)
        )
    };
    let _ = write!(
        h,
        "<tr data-route=\"{n}\"><td data-label=\"route\"><code>{n}</code></td><td data-label=\"intent\">{intent}</td><td data-label=\"breaker\"><span class=\"state {class}\">{label}</span></td><td data-label=\"p50\">{p50}</td><td data-label=\"p99\">{p99}</td><td data-label=\"SLA\">{slap}</td><td data-label=\"answered\">{}</td><td data-label=\"errors\">{}</td><td data-label=\"last error\">{last_error}</td><td data-label=\"rate limit\">{}</td><td>{reset}</td></tr>",
        state.stats.answered.load(Ordering::Relaxed),
        state.stats.errors.load(Ordering::Relaxed),
        esc(&rate),
        n = esc(name),
        label = esc(&label),
    );
}

#[cfg(test)]
mod tests {
    /// The admin CSP allows inline styles by hash: every `<style>` the pages
    /// send must be one of [`super::INLINE_STYLES`], and nothing else inline.
    #[test]
    fn every_inline_style_is_one_the_policy_allows() {
        for page in [super::HEAD, super::LOGIN] {
            let mut rest = page;
            let mut seen = 0;
            while let Some(i) = rest.find("<style>") {
                let css = &rest[i + "<style>".len()..];
                let end = css.find("</style>").expect("closed");
                assert!(super::INLINE_STYLES.contains(&&css[..end]));
                seen += 1;
                rest = &css[end..];
            }
            assert_eq!(seen, 1);
            assert!(!page.contains("<script") && !page.contains(" style="));
        }
    }

    #[test]
    fn escapes() {
        assert_eq!(
            super::esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
