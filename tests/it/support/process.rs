//! Running the real `gateway` binary in tests: start it, wait (bounded) for
//! its "gateway serving" log line, read the addresses it bound, signal it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running gateway process; killed and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub listen: String,
    pub admin: String,
    /// Its stderr, line by line.
    pub lines: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` (a `gateway serve … --log-format json`) and waits for its "gateway serving" line (bounded).
pub fn start(mut cmd: Command) -> Proc {
    let child = cmd.spawn().unwrap();
    // Owned by `Proc` at once, so every path (even a panic below) kills and waits.
    let mut p = Proc {
        child,
        listen: String::new(),
        admin: String::new(),
        lines: mpsc::channel().1,
    };
    let stderr = p.child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("gateway starts and logs");
        if line.contains("gateway serving") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            p.listen = v["listen"].as_str().unwrap().into();
            p.admin = v["admin"].as_str().unwrap().into();
            p.lines = rx;
            return p;
        }
    }
}

/// Starts `gateway serve` on free loopback ports with `routes` and `store`,
/// `extra` flags, and an environment of only PATH and `env`. It logs JSON:
/// warnings, and the start-up and delivery-worker lines.
pub fn serve(routes: &Path, store: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args(["serve", "--routes"])
        .arg(routes)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--log-format", "json", "--store", store])
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "GATEWAY_LOG",
            "warn,cognigy_gateway::server=info,cognigy_gateway::delivery=info",
        )
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    start(cmd)
}

pub fn kill(p: &Child, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &p.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}
