//! `gateway deliveries list [--dead] | show ID [--payload] | replay ID | replay --dead`:
//! the operator's view of the delivery store (SPEC §4). Works beside a
//! running gateway on the same store; a replayed delivery is picked up by
//! its workers like any pending one.
//!
//! Exit codes: 0 done, 1 refused (no such delivery, or not replayable),
//! 2 usage or I/O (the store cannot be opened or read).

use std::time::SystemTime;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::store::{
    self, Attempt, DEFAULT_STORE_URL, DeliveryDetail, DeliverySummary, State, Store, StoreError,
};

#[derive(Args, Debug)]
pub struct DeliveriesArgs {
    /// Delivery store URL (as for `serve`).
    #[arg(long, env = "GATEWAY_STORE", default_value = DEFAULT_STORE_URL, global = true)]
    store: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    format: OutputFormat,
    #[command(subcommand)]
    command: DeliveriesCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum DeliveriesCommand {
    /// List deliveries, newest first.
    List {
        /// Only dead letters.
        #[arg(long)]
        dead: bool,
        /// Most deliveries listed.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one delivery: its request and every try (the payload and the
    /// rendered body only with `--payload`: they may hold personal data).
    Show {
        id: String,
        /// Also print the payload and the rendered request body.
        #[arg(long)]
        payload: bool,
    },
    /// Send a dead or delivered delivery again (attempts start over), or every dead one.
    Replay {
        /// The delivery to replay.
        #[arg(required_unless_present = "dead", conflicts_with = "dead")]
        id: Option<String>,
        /// Replay every dead letter.
        #[arg(long)]
        dead: bool,
    },
}

pub fn run(args: DeliveriesArgs) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 2;
        }
    };
    rt.block_on(async move {
        // Looking must not create a store: a mistyped path would show an empty one.
        if let Some(file) = store::sqlite_file(&args.store)
            && !file.exists()
        {
            eprintln!(
                "error: no store at {} (--store / GATEWAY_STORE)",
                file.display()
            );
            return 2;
        }
        let store = match store::open(&args.store).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        };
        let code = match command(&*store, args.command, args.format).await {
            Ok(()) => 0,
            Err(e @ (StoreError::NotFound { .. } | StoreError::NotReplayable { .. })) => {
                eprintln!("error: {e}");
                1
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        };
        store.close().await;
        code
    })
}

async fn command(
    store: &dyn Store,
    command: DeliveriesCommand,
    format: OutputFormat,
) -> Result<(), StoreError> {
    let now = SystemTime::now();
    match command {
        DeliveriesCommand::List { dead, limit } => {
            let list = store.list(dead.then_some(State::Dead), limit).await?;
            match format {
                OutputFormat::Json => {
                    print_json(&Value::Array(list.iter().map(summary_json).collect()))
                }
                OutputFormat::Text => print_list(&list),
            }
        }
        DeliveriesCommand::Show { id, payload } => {
            let Some(detail) = store.get(&id).await? else {
                return Err(StoreError::NotFound { id });
            };
            match format {
                OutputFormat::Json => print_json(&detail_json(&detail, payload)),
                OutputFormat::Text => print_detail(&detail, payload),
            }
        }
        DeliveriesCommand::Replay { id: Some(id), .. } => {
            store.replay(&id, now).await?;
            match format {
                OutputFormat::Json => print_json(&json!({ "replayed": [id] })),
                OutputFormat::Text => println!("replayed {id}"),
            }
        }
        DeliveriesCommand::Replay { id: None, .. } => {
            let n = store.replay_dead(now).await?;
            match format {
                OutputFormat::Json => print_json(&json!({ "replayed_dead": n })),
                OutputFormat::Text => println!("replayed {n} dead deliveries"),
            }
        }
    }
    Ok(())
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON serializes")
    );
}

fn summary_json(d: &DeliverySummary) -> Value {
    json!({
        "id": d.id,
        "bot": d.bot,
        "route": d.route,
        "state": d.state.as_str(),
        "attempts": d.attempts,
        "next_attempt_at": time(d.next_attempt_at),
        "created_at": time(d.created_at),
        "updated_at": time(d.updated_at),
        "last_error": d.last_error,
    })
}

fn attempt_json(a: &Attempt) -> Value {
    json!({
        "number": a.number,
        "at": time(a.at),
        "status": a.status,
        "latency_ms": a.latency.as_millis() as u64,
        "error": a.error,
    })
}

/// One delivery as JSON; `payload` and `request.body` only when `with_payload`.
fn detail_json(detail: &DeliveryDetail, with_payload: bool) -> Value {
    let d = &detail.delivery;
    let mut v = json!({
        "id": d.id,
        "bot": d.bot,
        "route": d.route,
        "state": d.state.as_str(),
        "attempts": d.attempts,
        "next_attempt_at": time(d.next_attempt_at),
        "created_at": time(d.created_at),
        "updated_at": time(d.updated_at),
        "lease_owner": d.lease_owner,
        "leased_until": d.leased_until.map(time),
        "last_error": d.last_error,
        "idempotency_key": d.idempotency_key,
        "request": {
            "method": d.request.method,
            "url": d.request.url,
            "headers": d.request.headers.iter().map(|(n, v)| json!([n, v])).collect::<Vec<_>>(),
            "body": d.request.body,
        },
        "payload": serde_json::from_str::<Value>(&d.payload).unwrap_or(Value::String(d.payload.clone())),
        "tries": detail.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
    });
    if !with_payload && let Some(o) = v.as_object_mut() {
        o.remove("payload");
        if let Some(r) = o.get_mut("request").and_then(Value::as_object_mut) {
            r.remove("body");
        }
    }
    v
}

fn print_list(list: &[DeliverySummary]) {
    if list.is_empty() {
        println!("no deliveries");
        return;
    }
    let route_w = list.iter().map(|d| d.route.len()).max().unwrap_or(0).max(5);
    println!(
        "{:<36}  {:<9}  {:>5}  {:<route_w$}  {:<20}  LAST ERROR",
        "ID", "STATE", "TRIES", "ROUTE", "CREATED"
    );
    for d in list {
        println!(
            "{:<36}  {:<9}  {:>5}  {:<route_w$}  {:<20}  {}",
            d.id,
            d.state.as_str(),
            d.attempts,
            d.route,
            time(d.created_at),
            d.last_error.as_deref().unwrap_or("-")
        );
    }
}

fn print_detail(detail: &DeliveryDetail, with_payload: bool) {
    let d = &detail.delivery;
    println!("id:              {}", d.id);
    println!("state:           {}", d.state);
    println!("bot / route:     {} / {}", d.bot, d.route);
    println!("created:         {}", time(d.created_at));
    println!("updated:         {}", time(d.updated_at));
    println!("next attempt:    {}", time(d.next_attempt_at));
    println!("tries:           {}", d.attempts);
    if let (Some(owner), Some(until)) = (&d.lease_owner, d.leased_until) {
        println!("leased by:       {owner} until {}", time(until));
    }
    if let Some(e) = &d.last_error {
        println!("last error:      {e}");
    }
    if let Some(k) = &d.idempotency_key {
        println!("idempotency key: {k}");
    }
    println!("request:         {} {}", d.request.method, d.request.url);
    for (n, v) in &d.request.headers {
        println!("  {n}: {v}");
    }
    println!("  (downstream auth and secret headers are added when sent)");
    if with_payload {
        if let Some(b) = &d.request.body {
            println!("body:            {b}");
        }
        println!("payload:         {}", d.payload);
    } else {
        println!("payload:         (not shown: it may hold personal data; --payload shows it)");
    }
    if detail.attempts.is_empty() {
        println!("no tries yet");
    }
    for a in &detail.attempts {
        println!(
            "try {:>2}  {}  {:>6} ms  {}",
            a.number,
            time(a.at),
            a.latency.as_millis(),
            match (&a.status, &a.error) {
                (_, Some(e)) => e.clone(),
                (Some(s), None) => format!("status {s}"),
                (None, None) => "-".into(),
            }
        );
    }
}
