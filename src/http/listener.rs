//! The accept loop of both listeners (SPEC §7.1): HTTP/1 connections served
//! by hyper with our own timers, a cap on open connections, and graceful
//! shutdown. axum's `serve` sets no timers and no cap, so a client trickling
//! one header byte at a time could hold a connection (and a file descriptor)
//! for ever.
//!
//! Each connection is in one of three phases, tracked by [`ConnClock`]:
//! - **head**: from accept, or from the first byte after an idle period,
//!   until the request's headers are complete (the service is called). Closed
//!   when it lasts longer than `header_timeout`.
//! - **request**: the service runs (the body's own timeout is the handler's:
//!   408 `body_timeout`).
//! - **idle**: after an answer, until the next byte. Closed after `idle_timeout`.
//!
//! hyper's own header-read timer is not used: it also runs while a keep-alive
//! connection is idle, so it cannot tell a slow header from an idle client.
//!
//! With TLS (the public listener with `--tls-cert`, SPEC §8) the handshake is
//! part of the first head: it must end, and the headers arrive, within
//! `header_timeout` of the accept. Each connection takes the certificate in
//! force when it was accepted ([`super::tls::ServerTls`] swaps it when the
//! files change), so a renewal never touches open connections.
//!
//! Never reads request bodies or decides answers: that is the router's.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tower::Service;

/// The accept queue asked of the kernel (Linux caps it at
/// `net.core.somaxconn`, 4096 by default since 5.4).
///
/// tokio's `TcpListener::bind` asks for 128, the standard library's value. A
/// burst of more new connections than that (a flood of slow clients, or many bots reconnecting at once)
/// overflows the queue while the accept loop catches up: the kernel then
/// drops SYNs (a 1 s retransmit for the client) or answers with SYN cookies,
/// some of which fail and reset a connection that already sent its request.
/// The hostile test's 2,200-connection burst did exactly that, now and then.
pub const BACKLOG: u32 = 4096;

/// Binds a listening socket on `addr` with [`BACKLOG`] (and `SO_REUSEADDR`, as
/// tokio's own bind sets it, so a restart can listen while old connections
/// are in TIME_WAIT).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Connection limits of a listener (flags and `GATEWAY_*`; SPEC §7.1).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A connection whose request headers are not complete by then is closed.
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub idle_timeout: Duration,
    /// Open connections at most; more wait in the kernel's backlog.
    pub max_connections: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` turns true, then stops
/// accepting, asks every open connection to finish its request in flight and
/// close, and returns once they all have.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<Arc<super::tls::ServerTls>>,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // A permit first: over the cap, new connections wait in the backlog
        // while the open ones keep working.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stopped(&mut shutdown) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept:
                    // wait a little, never stop serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        while conns.try_join_next().is_some() {}
        conns.spawn(connection(
            stream,
            router.clone(),
            limits,
            shutdown.clone(),
            permit,
            tls.as_ref().map(|t| t.acceptor()),
        ));
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    Ok(())
}

async fn connection(
    stream: TcpStream,
    router: Router,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let _ = stream.set_nodelay(true);
    let clock = Arc::new(ConnClock::new(Instant::now()));
    let Some(acceptor) = tls else {
        return http1(stream, router, limits, shutdown, clock).await;
    };
    // The handshake runs on the first head's clock (header_timeout from accept).
    let deadline = clock.deadline(&limits).unwrap_or_else(Instant::now);
    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(s)) => s,
            // too slow, not TLS, no common version or cipher: just close
            Ok(Err(_)) | Err(_) => return,
        },
        _ = stopped(&mut shutdown) => return,
    };
    http1(stream, router, limits, shutdown, clock).await
}

/// Serves HTTP/1 on one connection (plain or TLS) under its [`ConnClock`].
async fn http1<S>(
    stream: S,
    router: Router,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
    clock: Arc<ConnClock>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Tracked {
        inner: stream,
        clock: clock.clone(),
    });
    let svc_clock = clock.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut router = router.clone();
        let clock = svc_clock.clone();
        clock.request_started();
        async move {
            let resp = router.call(req.map(Body::new)).await;
            clock.request_done(Instant::now());
            resp.map_err(|e: Infallible| match e {})
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None).keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let deadline = clock.deadline(&limits);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = sleep_until(deadline) => {
                if clock.expired(&limits, Instant::now()) {
                    return; // dropping the connection closes the socket
                }
            }
            _ = stopped(&mut shutdown), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Completes once shutdown is asked for (the watch guard never crosses an await).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Where a connection is in its request cycle, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request's headers since then.
    Head(Instant),
    /// A request is being handled.
    Request,
    /// Idle since then (an answer was given).
    Idle(Instant),
}

/// The phase of one connection, updated by its reads and its service.
#[derive(Debug)]
pub struct ConnClock {
    phase: Mutex<Phase>,
}

impl ConnClock {
    /// A new connection: waiting for its first request's headers.
    pub fn new(now: Instant) -> Self {
        ConnClock {
            phase: Mutex::new(Phase::Head(now)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Phase) -> T) -> T {
        f(&mut self.phase.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Bytes arrived: an idle connection starts a new request's head.
    pub fn bytes_read(&self, now: Instant) {
        self.with(|p| {
            if let Phase::Idle(_) = p {
                *p = Phase::Head(now);
            }
        })
    }

    /// The headers are complete: the service runs.
    pub fn request_started(&self) {
        self.with(|p| *p = Phase::Request)
    }

    /// The answer is ready: idle until the next byte.
    pub fn request_done(&self, now: Instant) {
        self.with(|p| *p = Phase::Idle(now))
    }

    /// When the current phase runs out (`None` while a request is handled).
    pub fn deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        self.with(|p| match *p {
            Phase::Head(since) => Some(since + limits.header_timeout),
            Phase::Idle(since) => Some(since + limits.idle_timeout),
            Phase::Request => None,
        })
    }

    /// Whether the connection should be closed now.
    pub fn expired(&self, limits: &ConnLimits, now: Instant) -> bool {
        self.deadline(limits).is_some_and(|d| now >= d)
    }
}

/// A stream that tells its [`ConnClock`] when bytes arrive.
struct Tracked<S> {
    inner: S,
    clock: Arc<ConnClock>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read(Instant::now());
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1,
        }
    }

    /// Every connection of a burst larger than tokio's default backlog (128)
    /// completes its handshake before the server accepts any: none waits for a
    /// SYN retransmit (1 s) or depends on a SYN cookie.
    #[test]
    fn a_burst_of_connections_fits_the_accept_queue() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(4096);
        let open_files: usize = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|t| {
                let l = t.lines().find(|l| l.starts_with("Max open files"))?;
                l.split_whitespace().nth(3)?.parse().ok()
            })
            .unwrap_or(1024);
        // 2,000 here (scripts/test.sh raises the open-files limit); fewer where
        // the kernel caps every backlog lower or the limit allows fewer sockets.
        let n = 2000.min(somaxconn).min(open_files.saturating_sub(100));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(async { bind("127.0.0.1:0".parse().unwrap()).unwrap() });
        let addr = listener.local_addr().unwrap();
        let mut open = Vec::with_capacity(n);
        for i in 0..n {
            // A queued connection completes at once on loopback; a dropped SYN
            // would be retried only after 1 s.
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => open.push(s),
                Err(e) => panic!("connection {i} of {n} did not fit the accept queue: {e}"),
            }
        }
        drop(listener);
    }

    #[test]
    fn a_new_connection_has_the_header_timeout() {
        let t0 = Instant::now();
        let c = ConnClock::new(t0);
        assert_eq!(c.deadline(&limits()), Some(t0 + Duration::from_secs(10)));
        // trickled bytes do not extend it
        c.bytes_read(t0 + Duration::from_secs(9));
        assert!(c.expired(&limits(), t0 + Duration::from_secs(10)));
    }

    #[test]
    fn a_request_in_flight_has_no_connection_timer() {
        let t0 = Instant::now();
        let c = ConnClock::new(t0);
        c.request_started();
        assert_eq!(c.deadline(&limits()), None);
        assert!(!c.expired(&limits(), t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn idle_keep_alive_then_a_new_head() {
        let t0 = Instant::now();
        let c = ConnClock::new(t0);
        c.request_started();
        let t1 = t0 + Duration::from_secs(1);
        c.request_done(t1);
        // idle: 60 s, not 10 s
        assert!(!c.expired(&limits(), t1 + Duration::from_secs(59)));
        assert!(c.expired(&limits(), t1 + Duration::from_secs(60)));
        // the next request's first byte starts its header timer
        let t2 = t1 + Duration::from_secs(30);
        c.bytes_read(t2);
        assert_eq!(c.deadline(&limits()), Some(t2 + Duration::from_secs(10)));
    }
}
