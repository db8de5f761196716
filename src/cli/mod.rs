//! The command line: raw arguments → validated commands. Exit codes are
//! decided here only: 0 ok, 1 invalid configuration (or a refused render),
//! 2 usage or I/O error.

mod check;
mod deliveries;
pub mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::diagnostic::Format;

#[derive(Parser, Debug)]
#[command(
    name = "gateway",
    version,
    about = "Integration gateway between Cognigy.AI bots and CRMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of `serve`'s settings does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Serve(Box<serve::ServeArgs>),
    /// Check route files as `serve` would, with no network and no secrets.
    Validate {
        /// Route files or directories (default: the routes directory).
        paths: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// A missing environment variable is an error (as for `serve`), not a warning.
        #[arg(long)]
        require_env: bool,
        /// Routes directory used when no path is given.
        #[arg(long, env = "GATEWAY_ROUTES", default_value = "routes")]
        routes: PathBuf,
    },
    /// Print the request a route would send for a payload, without sending it (secrets masked).
    Render {
        /// Route name.
        #[arg(long)]
        route: String,
        /// JSON payload file.
        #[arg(long)]
        payload: PathBuf,
        /// Bot to render as (default: the route's first bot).
        #[arg(long)]
        bot: Option<String>,
        /// Inbound header for the `header` helper, `Name: value`; repeatable.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// Routes directory.
        #[arg(long, env = "GATEWAY_ROUTES", default_value = "routes")]
        routes: PathBuf,
    },
    /// Print the JSON Schema of route files.
    Schema,
    /// List, show and replay stored async deliveries.
    Deliveries(deliveries::DeliveriesArgs),
}

/// Runs the command line; the process exit code.
pub fn run() -> ExitCode {
    // reqwest is built without a default TLS provider (avoids aws-lc's C build): install ring once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let code = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Validate {
            paths,
            format,
            require_env,
            routes,
        } => {
            let paths = if paths.is_empty() {
                vec![routes]
            } else {
                paths
            };
            check::validate(&paths, format, require_env)
        }
        Command::Render {
            route,
            payload,
            bot,
            headers,
            routes,
        } => check::render(&routes, &route, &payload, bot.as_deref(), &headers),
        Command::Deliveries(args) => deliveries::run(args),
        Command::Schema => {
            let s = serde_json::to_string_pretty(&crate::config::raw::route_file_schema())
                .expect("schema serializes");
            println!("{s}");
            0
        }
    };
    ExitCode::from(code)
}

/// The process environment, for `${VAR}`.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}
