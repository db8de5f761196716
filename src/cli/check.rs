//! `gateway validate` and `gateway render`: the CI-facing commands.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::config::compile::{LoadOptions, load};
use crate::config::diagnostic::{self, Format};
use crate::config::model::OutboundAuth;
use crate::template::RenderMeta;

pub fn validate(paths: &[PathBuf], format: Format, require_env: bool) -> u8 {
    for p in paths {
        if let Err(e) = std::fs::metadata(p) {
            eprintln!("gateway validate: {}: {e}", p.display());
            return 2;
        }
    }
    let loaded = load(
        paths,
        &LoadOptions {
            env: &super::process_env,
            require_env,
            check_examples: true,
            cache: None,
        },
    );
    let base = std::env::current_dir().unwrap_or_default();
    let out = diagnostic::render(&loaded.diagnostics, format, &base);
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(out.as_bytes()).is_err() {
        return 2;
    }
    if loaded.error_count() > 0 { 1 } else { 0 }
}

pub fn render(
    routes: &Path,
    route: &str,
    payload: &Path,
    bot: Option<&str>,
    headers: &[String],
) -> u8 {
    let loaded = load(
        &[routes.to_path_buf()],
        &LoadOptions {
            env: &super::process_env,
            require_env: false,
            check_examples: false,
            cache: None,
        },
    );
    let base = std::env::current_dir().unwrap_or_default();
    let Some(config) = loaded.config else {
        eprint!(
            "{}",
            diagnostic::render(&loaded.diagnostics, Format::Text, &base)
        );
        return 1;
    };
    let Some(r) = config.routes.get(route) else {
        let hint = diagnostic::did_you_mean(route, config.routes.keys().map(String::as_str))
            .map(|m| format!("; did you mean `{m}`?"))
            .unwrap_or_default();
        eprintln!("gateway render: no route named `{route}`{hint}");
        return 1;
    };
    let text = match std::fs::read_to_string(payload) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gateway render: {}: {e}", payload.display());
            return 2;
        }
    };
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("gateway render: {}: not valid JSON: {e}", payload.display());
            return 1;
        }
    };
    let bot_id = bot
        .map(str::to_owned)
        .or_else(|| r.bots.first().cloned())
        .unwrap_or_default();
    if let Some(b) = config.bots.get(&bot_id) {
        for s in b.schema.iter().chain(r.schema.as_ref()) {
            let v = s.violations(&value);
            if !v.is_empty() {
                eprintln!(
                    "gateway render: payload fails the schema {}:",
                    s.path.display()
                );
                for v in v {
                    eprintln!(
                        "  {}: {}",
                        if v.path.is_empty() { "/" } else { &v.path },
                        v.message
                    );
                }
                return 1;
            }
        }
    }
    let mut meta = RenderMeta::new(&bot_id, &r.name);
    let pairs: Vec<(String, String)> = headers
        .iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    meta.set_header_pairs(&pairs);
    let ctx = handlebars::Context::from(value);
    let req = match crate::config::render::build(r, &ctx, &meta) {
        Ok(req) => req,
        Err(e) => {
            eprintln!("gateway render: {e}");
            return 1;
        }
    };
    let mut out = format!("{} {}\n", req.method, req.url);
    match &r.downstream.auth {
        OutboundAuth::None => {}
        OutboundAuth::Bearer(_) => out.push_str("authorization: Bearer ***\n"),
        OutboundAuth::Basic(..) => out.push_str("authorization: Basic ***\n"),
        OutboundAuth::OAuth2(o) => out.push_str(&format!(
            "authorization: Bearer *** (OAuth2 client credentials from {})\n",
            o.token_url
        )),
    }
    for (name, value, secret) in &req.headers {
        let shown = if *secret || crate::config::render::is_sensitive_header(name.as_str()) {
            "***"
        } else {
            value.to_str().unwrap_or("(binary)")
        };
        out.push_str(&format!("{name}: {shown}\n"));
    }
    if let Some(body) = &req.body {
        out.push('\n');
        // masked before pretty-printing, which could re-escape a value
        let body = config.redactor.redact(body);
        let pretty = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or(body);
        out.push_str(&pretty);
        out.push('\n');
    }
    // every `${VAR}` value, wherever it landed (URL, body, token URL), as `***`
    print!("{}", config.redactor.redact(&out));
    0
}
