//! PostgreSQL for tests: [`url`] gives each test its own empty schema on a
//! real server.
//!
//! The server is `GATEWAY_TEST_PG_URL` when set (`scripts/test.sh` may set
//! it for a whole run). Otherwise the first call starts a throwaway cluster
//! for this test process (once, however many tests ask at the same time):
//! `initdb` into a fresh directory under the temp dir, `postgres` on a free
//! loopback port with its socket in that directory and `fsync=on`; as root
//! both run as the `postgres` user (Debian's server refuses root). A small
//! watchdog shell stops the server and deletes the directory when this
//! process is gone, however it ended.
//!
//! Without PostgreSQL binaries the call panics, telling to run
//! `scripts/test.sh` (which installs them): PostgreSQL tests never skip.
//!
//! Also included by `benches/store.rs`, with [`super::wait`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::Connection;
use tokio::sync::OnceCell;

use super::wait::wait_until;

/// The environment variable naming an existing server to use instead.
const URL_VAR: &str = "GATEWAY_TEST_PG_URL";

/// A URL whose `search_path` is a new, empty schema on the test server.
pub async fn url() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = server_url().await;
    let schema = format!(
        "gw_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = connect_with_retry(base).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .expect("create a test schema");
    let _ = conn.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options[search_path]={schema}")
}

/// The base URL of the test server, started by the first caller; the others
/// wait for it.
async fn server_url() -> &'static str {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_init(async || match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => url,
        _ => start_cluster().await,
    })
    .await
}

async fn connect_with_retry(url: &str) -> sqlx::PgConnection {
    let mut last = String::new();
    let conn = wait_until(
        Duration::from_secs(20),
        async || match sqlx::PgConnection::connect(url).await {
            Ok(c) => Some(c),
            Err(e) => {
                last = e.to_string();
                None
            }
        },
    )
    .await;
    conn.unwrap_or_else(|| {
        panic!("cannot connect to the test PostgreSQL server within 20 s: {last}")
    })
}

/// Directories holding `initdb` and `postgres`: Debian's versioned ones
/// (newest first), then PATH.
fn find_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort_by_key(|d| {
        std::cmp::Reverse(
            d.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
}

/// Runs `cmd` to its end on a blocking thread (the runtime keeps going).
async fn output(mut cmd: Command) -> std::io::Result<std::process::Output> {
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("the command's thread")
}

async fn is_root() -> bool {
    let mut id = Command::new("id");
    id.arg("-u");
    output(id)
        .await
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `cmd args…`, as the `postgres` user when we are root.
fn as_server_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL cluster of one test's own, for a test that stops and starts
/// its server (the shared one of [`url`] must stay up for the others). Like
/// that one, it is stopped and deleted when the test process ends.
#[allow(dead_code)] // used by tests/it, not by benches/store.rs (which includes this file)
pub struct Cluster {
    root: bool,
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    url: String,
}

/// Runs `fut` to its end on a thread of its own (callable from sync code and
/// from inside a runtime alike).
fn run_on_own_thread<T: Send + 'static, F: Future<Output = T>>(
    make: impl FnOnce() -> F + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(make())
    })
    .join()
    .expect("the helper thread")
}

#[allow(dead_code)]
impl Cluster {
    /// Runs `initdb` and starts the server on a free loopback port. Blocking.
    pub fn start() -> Cluster {
        run_on_own_thread(|| async {
            let (root, bin, dir) = init_cluster().await;
            for _ in 0..5 {
                let port = free_port();
                if let Some(url) = start_server(root, &bin, &dir, port).await {
                    return Cluster {
                        root,
                        bin,
                        dir,
                        port,
                        url,
                    };
                }
            }
            panic!(
                "PostgreSQL did not start; see {}",
                dir.join("log").display()
            );
        })
    }

    /// The `postgres` database of this cluster.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server (fast shutdown: sessions are ended) and waits (bounded) until it is gone.
    pub fn stop(&self) {
        let pidfile = self.dir.join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&pidfile).expect("the server is running");
        let pid = text.lines().next().unwrap_or_default().trim().to_owned();
        let killed = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("run kill");
        assert!(killed.success(), "kill -INT {pid}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while pidfile.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the stopped server again, on the same port and data. Blocking.
    pub fn restart(&self) {
        let (root, bin, dir, port) = (self.root, self.bin.clone(), self.dir.clone(), self.port);
        let url =
            run_on_own_thread(move || async move { start_server(root, &bin, &dir, port).await })
                .expect("PostgreSQL starts again on its port");
        assert_eq!(url, self.url);
    }
}

async fn start_cluster() -> String {
    Cluster::start().url
}

/// `initdb` into a new temp dir (owned by `postgres` when we are root):
/// (root?, the binaries' directory, the cluster's directory).
async fn init_cluster() -> (bool, PathBuf, PathBuf) {
    let bin = find_bin_dir().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, postgres) were not found in \
             /usr/lib/postgresql/*/bin or on PATH. Run scripts/test.sh, which installs them \
             (Debian package `postgresql`), or set {URL_VAR} to a server the tests may use."
        )
    });
    let root = is_root().await;
    let dir = tempfile::Builder::new()
        .prefix("gw-pg-")
        .tempdir()
        .expect("make a temp dir for PostgreSQL")
        .keep();
    if root {
        let mut chown = Command::new("chown");
        chown.args(["postgres:postgres"]).arg(&dir);
        let out = output(chown).await.expect("run chown");
        assert!(
            out.status.success(),
            "chown postgres {} failed (is there a `postgres` user? scripts/test.sh installs \
             PostgreSQL and creates it)",
            dir.display()
        );
    }
    let data = dir.join("data");
    let mut initdb = as_server_user(root, &bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ])
        .stdin(Stdio::null());
    let out = output(initdb).await.expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (root, bin, dir)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// Starts the server with its watchdog; `None` if it exited (port taken).
async fn start_server(root: bool, bin: &Path, dir: &Path, port: u16) -> Option<String> {
    use std::os::unix::process::CommandExt;
    // $1 postgres, $2 dir, $3 port, $4 our pid. Stops the server (fast
    // shutdown) and removes the directory once our process is gone.
    const WATCHDOG: &str = r#"
"$1" -D "$2/data" -p "$3" -k "$2" -c listen_addresses=127.0.0.1 -c fsync=on \
     -c max_connections=300 -c shared_buffers=64MB >"$2/log" 2>&1 &
pg=$!
while [ -d "/proc/$4" ] && kill -0 "$pg" 2>/dev/null; do sleep 0.2; done
kill -INT "$pg" 2>/dev/null
wait "$pg"
[ -d "/proc/$4" ] || rm -rf "$2"
"#;
    let log = dir.join("log");
    let _ = std::fs::remove_file(&log);
    let mut watchdog = as_server_user(root, Path::new("sh"))
        .args(["-c", WATCHDOG, "sh"])
        .arg(bin.join("postgres"))
        .arg(dir)
        .arg(port.to_string())
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C of the test run does not kill the
        // watchdog before it cleans up.
        .process_group(0)
        .spawn()
        .expect("start postgres");
    // Reaped when it ends (after this process's tests, or at once if the port was taken).
    std::thread::spawn(move || watchdog.wait());
    // postmaster.pid's 8th line says "ready" once connections are accepted.
    let pidfile = dir.join("data").join("postmaster.pid");
    let ready = wait_until(Duration::from_secs(30), async || {
        if let Ok(text) = std::fs::read_to_string(&pidfile)
            && text.lines().nth(7).is_some_and(|l| l.trim() == "ready")
            && text
                .lines()
                .nth(3)
                .is_some_and(|l| l.trim() == port.to_string())
        {
            return Some(Started::Ready);
        }
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        if log_text.contains("could not bind") || log_text.contains("could not create any TCP") {
            return Some(Started::PortTaken);
        }
        if log_text.contains("FATAL") && !pidfile.exists() {
            panic!("PostgreSQL failed to start:\n{log_text}");
        }
        None
    })
    .await;
    match ready {
        Some(Started::Ready) => Some(format!("postgres://postgres@127.0.0.1:{port}/postgres")),
        Some(Started::PortTaken) => {
            // Someone took the port between our probe and the server's bind:
            // the next try starts once this server is gone.
            let gone = wait_until(Duration::from_secs(10), async || !pidfile.exists()).await;
            assert!(
                gone.is_some(),
                "PostgreSQL on a taken port did not exit within 10 s: {}",
                pidfile.display()
            );
            None
        }
        None => panic!(
            "PostgreSQL was not ready within 30 s; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    }
}

/// How a server start ended.
enum Started {
    Ready,
    /// It could not bind its port: try another.
    PortTaken,
}
