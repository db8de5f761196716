//! Running the real `gateway` binary in tests: [`gateway_cmd`] (an empty
//! environment but for `PATH`), start it and wait (bounded) for its
//! "gateway serving" log line, read the addresses it bound, signal it, wait
//! (bounded) for it to exit.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::wait::wait_until;

/// `gateway` (this crate's binary) with an environment emptied but for
/// `PATH`: every test that runs the binary starts from this and adds what
/// it needs with `.env(…)`, so nothing of the test process's environment
/// (which the tests never change) leaks into a run.
pub fn gateway_cmd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

/// How long a gateway may take to start, or to stop after a signal.
const START_STOP: Duration = Duration::from_secs(30);

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

impl Proc {
    /// Sends `sig` (e.g. `-TERM`) and waits (bounded) for the process to
    /// exit: its exit status and the stderr lines not read yet.
    pub async fn stop(self, sig: &str) -> (ExitStatus, Vec<String>) {
        kill(&self.child, sig);
        self.stop_wait().await
    }

    /// Waits (bounded) for the process to exit (after a signal sent before):
    /// its exit status and the stderr lines not read yet.
    pub async fn stop_wait(mut self) -> (ExitStatus, Vec<String>) {
        let status = wait_until(START_STOP, async || self.child.try_wait().unwrap())
            .await
            .unwrap_or_else(|| panic!("the gateway did not exit within {START_STOP:?}"));
        // It has exited, so its stderr ends: read to the end (bounded all the same).
        let deadline = Instant::now() + START_STOP;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the gateway's stderr did not end after it exited")
                }
            }
        }
        (status, lines)
    }
}

/// Starts `cmd` (a `gateway serve … --log-format json`) and waits (bounded)
/// for its "gateway serving" line.
pub fn start(cmd: Command) -> Proc {
    start_parsing(cmd, |line| {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        (
            v["listen"].as_str().unwrap().into(),
            v["admin"].as_str().unwrap().into(),
        )
    })
}

/// Starts `cmd` (a `gateway serve … --log-format text`) and waits (bounded)
/// for its "gateway serving" line, reading the addresses from its fields.
pub fn start_text(cmd: Command) -> Proc {
    start_parsing(cmd, |line| {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_default()
                .to_owned()
        };
        (field("listen="), field("admin="))
    })
}

/// Starts `cmd` and waits (bounded) for its "gateway serving" line, whose
/// (listen, admin) addresses `addrs` reads.
fn start_parsing(mut cmd: Command, addrs: impl Fn(&str) -> (String, String)) -> Proc {
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
    // A blocking receive with one deadline for the whole start (the lines
    // arrive on a channel; nothing is polled).
    let deadline = Instant::now() + START_STOP;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|e| {
            panic!(
                "the gateway did not log \"gateway serving\" within {START_STOP:?} ({e}); it logged:\n{}",
                seen.join("\n")
            )
        });
        if line.contains("gateway serving") {
            (p.listen, p.admin) = addrs(&line);
            p.lines = rx;
            return p;
        }
        seen.push(line);
    }
}

/// Starts `gateway serve` on free loopback ports with `routes` and `store`,
/// `extra` flags, and an environment of only PATH and `env`. It logs JSON:
/// warnings, and the start-up and delivery-worker lines.
pub fn serve(routes: &Path, store: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = gateway_cmd();
    cmd.args(["serve", "--routes"])
        .arg(routes)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--log-format", "json", "--store", store])
        .args(extra)
        .env(
            "GATEWAY_LOG",
            "warn,cognigy_gateway::server=info,cognigy_gateway::delivery=info",
        )
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    start(cmd)
}

/// Sends `sig` (e.g. `-HUP`) to the process.
pub fn kill(p: &Child, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &p.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}
