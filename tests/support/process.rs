//! Running the real `gateway` binary in tests: start it, wait (bounded) for
//! its "gateway serving" log line, read the addresses it bound, signal it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};
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

pub fn kill(p: &Child, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &p.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}
