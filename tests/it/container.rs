//! The `Dockerfile` (SPEC §8), built with podman and run: `gateway validate`
//! on the repository's route files inside the image, the user and volumes
//! the image declares, and `serve` starting as that user with its SQLite
//! store on the `/data` volume.
//!
//! This machine reaches Debian's package archive but no container registry,
//! so the two base images are stand-ins passed as the Dockerfile's build
//! arguments: the runtime base is Debian bookworm made with `debootstrap
//! --variant=minbase` (kept in podman's storage between runs); the builder
//! base has a `cargo` that checks it is called exactly as the Dockerfile's
//! build step (`cargo build --release --locked --bin gateway`) and puts this
//! test run's `gateway` binary where that build would. The build step itself
//! is run for real by `.ci/run` (the same command). Every other step of the
//! Dockerfile runs as written. podman runs its containers with `runc` and
//! explicit ulimits: `crun` refuses this machine's hybrid cgroups and its
//! default limits are above the sandbox's hard limits.
//!
//! Needs `podman`, `runc` and `debootstrap` (scripts/test.sh installs them).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{self, wait_until};

const BASE: &str = "localhost/cognigy-gateway-it-base:bookworm";

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

/// `podman run` with the limits this machine allows.
fn podman_run() -> Command {
    let mut c = podman();
    c.args([
        "run",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
    ]);
    c
}

fn run(mut c: Command, what: &str) -> Output {
    let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot run podman ({e}); scripts/test.sh installs podman, runc and debootstrap"
        )
    });
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The runtime base: Debian bookworm (minbase) from the package archive.
fn base_image() {
    let exists = podman()
        .args(["image", "exists", BASE])
        .status()
        .unwrap_or_else(|e| panic!("cannot run podman ({e}); scripts/test.sh installs it"));
    if exists.success() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .args(["--variant=minbase", "bookworm"])
        .arg(root.path())
        .arg("http://deb.debian.org/debian");
    run(debootstrap, "debootstrap");
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let import = podman()
        .args(["import", "-", BASE])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success(), "tar of the debootstrap root");
    assert!(import.status.success(), "podman import: {import:?}");
}

/// The stand-in builder base: this run's `gateway` and a `cargo` that checks its arguments.
fn builder_image(tag: &str) {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_gateway"), ctx.path().join("gateway")).unwrap();
    std::fs::write(
        ctx.path().join("cargo"),
        "#!/bin/sh\n[ \"$*\" = \"build --release --locked --bin gateway\" ] || { echo \"unexpected: cargo $*\" >&2; exit 1; }\nmkdir -p target/release && cp /prebuilt/gateway target/release/gateway\n",
    )
    .unwrap();
    std::fs::write(
        ctx.path().join("Containerfile"),
        format!("FROM {BASE}\nCOPY gateway /prebuilt/gateway\nCOPY cargo /usr/local/bin/cargo\nRUN chmod 0755 /usr/local/bin/cargo\n"),
    )
    .unwrap();
    let mut c = podman();
    c.args([
        "build",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
    ])
    .args(["-t", tag])
    .arg(ctx.path());
    run(c, "podman build (builder stand-in)");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dockerfile_builds_an_image_that_validates_and_serves_as_non_root() {
    // Where podman cannot run containers at all (no user namespaces, no
    // cgroups: a sandbox that differs from this project's machines), the test
    // says so loudly and stops: a missing container engine is the machine's
    // fact, not the Dockerfile's fault. Where podman runs, every step must pass.
    let usable = podman().args(["info"]).stdin(Stdio::null()).output();
    if !usable.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!(
            "container test NOT RUN: podman cannot run here ({})",
            match &usable {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                Err(e) => e.to_string(),
            }
        );
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let id = std::process::id();
    let (builder, image, name) = (
        format!("localhost/cognigy-gateway-it-builder:{id}"),
        format!("localhost/cognigy-gateway:it-{id}"),
        format!("cognigy-gateway-it-{id}"),
    );
    base_image();
    builder_image(&builder);
    let mut build = podman();
    build
        .args([
            "build",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
        ])
        // the runtime stage's apt-get reaches Debian's archive through the host
        .args(["--network", "host"])
        .args(["--build-arg", &format!("RUST_IMAGE={builder}")])
        .args(["--build-arg", &format!("RUNTIME_IMAGE={BASE}")])
        .args(["-t", &image])
        .arg(repo);
    run(build, "podman build (the Dockerfile)");

    // What the image declares.
    let mut inspect = podman();
    inspect.args([
        "image",
        "inspect",
        &image,
        "--format",
        "{{.Config.User}}|{{json .Config.Volumes}}|{{json .Config.Entrypoint}}",
    ]);
    let meta = String::from_utf8(run(inspect, "podman image inspect").stdout).unwrap();
    let meta: Vec<&str> = meta.trim().split('|').collect();
    assert_eq!(meta[0], "gateway:gateway");
    assert!(
        meta[1].contains("\"/routes\"") && meta[1].contains("\"/data\""),
        "{meta:?}"
    );
    assert_eq!(meta[2], r#"["/usr/local/bin/gateway"]"#);
    let mut id_u = podman_run();
    id_u.args([
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/usr/bin/id",
        &image,
        "-u",
    ]);
    assert_eq!(
        String::from_utf8(run(id_u, "id -u").stdout).unwrap().trim(),
        "10001"
    );

    // `gateway validate` on the repository's routes, mounted as the README says.
    let mount = |c: &mut Command| {
        for (dir, at) in [
            ("routes", "/routes"),
            ("schemas", "/schemas"),
            ("examples", "/examples"),
        ] {
            c.arg("-v")
                .arg(format!("{}:{at}:ro", repo.join(dir).display()));
        }
    };
    let mut validate = podman_run();
    validate.args(["--rm", "--network", "none"]);
    mount(&mut validate);
    validate.args([&image, "validate", "/routes"]);
    let out = run(validate, "gateway validate in the image");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 errors"), "{text}");
    // and its exit status on a broken file
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("r.yaml"),
        "routes:\n  - name: r\n    retyr: {}\n",
    )
    .unwrap();
    let mut invalid = podman_run();
    invalid
        .args(["--rm", "--network", "none", "-v"])
        .arg(format!("{}:/routes:ro", broken.path().display()))
        .args([&image, "validate", "/routes"]);
    let out = invalid.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown key `retyr`"));

    // `serve` (the default command) as the non-root user, its SQLite store on /data.
    let (public, admin) = (free_port(), free_port());
    let mut serve = podman_run();
    serve.args(["-d", "--name", &name, "--network", "host"]);
    mount(&mut serve);
    serve
        .args(["-e", &format!("GATEWAY_LISTEN=127.0.0.1:{public}")])
        .args(["-e", &format!("GATEWAY_ADMIN_LISTEN=127.0.0.1:{admin}")])
        .arg(&image);
    run(serve, "podman run -d (serve)");
    let client = support::client();
    let ready = wait_until(Duration::from_secs(60), async || {
        let r = client
            .get(format!("http://127.0.0.1:{public}/readyz"))
            .send()
            .await;
        matches!(r, Ok(r) if r.status() == 200)
    })
    .await;
    let mut logs = podman();
    logs.args(["logs", &name]);
    let logged = logs.output().unwrap();
    let logged = format!(
        "{}{}",
        String::from_utf8_lossy(&logged.stdout),
        String::from_utf8_lossy(&logged.stderr)
    );
    let mut stop = podman();
    stop.args(["stop", "-t", "20", &name]);
    let _ = stop.output();
    let mut code = podman();
    code.args(["inspect", &name, "--format", "{{.State.ExitCode}}"]);
    let exit = code.output().unwrap();
    let mut rm = podman();
    rm.args(["rm", "-f", "-v", &name]);
    let _ = rm.output();
    assert!(
        ready.is_some(),
        "the container did not get ready; it logged:\n{logged}"
    );
    assert!(logged.contains("gateway serving"), "{logged}");
    assert_eq!(
        String::from_utf8_lossy(&exit.stdout).trim(),
        "0",
        "exit status after SIGTERM"
    );

    let mut rmi = podman();
    rmi.args(["rmi", "-f", &image, &builder]);
    let _ = rmi.output();
    let mut prune = podman();
    prune.args(["image", "prune", "-f"]);
    let _ = prune.output();
}
