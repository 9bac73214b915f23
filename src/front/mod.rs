//! The front door: Drishya's own accept loop on the public port, in front of Rocket (which
//! listens on loopback only). Rocket 0.5 gives its HTTP server no header-read timeout, no
//! idle keep-alive limit, no body-rate limit and no connection cap, and takes no custom
//! listener; so the limits live here, in-process, rather than in a proxy every operator
//! would have to run. Each client connection is relayed to one connection to Rocket; the
//! front reads request heads and bodies only far enough to know where each request ends.
//!
//! What holds for every connection:
//! * at most `MAX_CONNECTIONS` open at once; beyond that, a new one takes the place of the
//!   connection that has waited longest for a request head, or, when every connection is
//!   in the middle of a request, gets a 503 and is closed; a directly connected address
//!   holds at most a quarter of them;
//! * a request head must arrive whole within [`HEADER_TIMEOUT`] of its first byte (of the
//!   connection's opening, for the first), at most [`http::MAX_HEAD`] long;
//! * between requests, a connection idle for Rocket's `keep_alive` seconds is closed (no
//!   limit while a request waits for its answer, up to [`RESPONSE_LIMIT`]);
//! * a body must arrive at [`MIN_BODY_RATE`] on average after [`BODY_GRACE`]; a body that
//!   stalls gets a 408 and its connection closed, so the upload slot it held in Rocket is
//!   freed at once;
//! * an answer the client does not read for [`WRITE_STALL`] closes the connection.
//!
//! Each request reaches Rocket with two headers that only the front sets (a client's own
//! copies are removed): [`PEER_HEADER`], the client's address by the trust rule
//! (`PROXY_IP_HEADER`), which Rocket reads as `client_ip()` (its `ip_header`), and
//! [`PROTO_HEADER`], `https` when the client reached a trusted TLS proxy.

pub mod http;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocket::fairing::AdHoc;
use rocket::figment::providers::Serialized;
use rocket::figment::Figment;
use rocket::tokio::io::{AsyncReadExt, AsyncWriteExt};
use rocket::tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use rocket::tokio::net::{TcpListener, TcpStream};
use rocket::tokio::sync::{watch, Mutex, Notify, Semaphore};
use rocket::tokio::task::JoinHandle;
use rocket::tokio::time::timeout;
use rocket::Request;

use crate::config::AppConfig;
use http::{Body, Chunked, HeadError, Trust};

/// The client's address as the front determined it.
pub const PEER_HEADER: &str = "X-Drishya-Peer";
/// `https` or `http`: the scheme the client used, as far as the front may believe it.
pub const PROTO_HEADER: &str = "X-Drishya-Proto";

/// A whole request head, from its first byte.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A body may start slowly (a phone waking its radio) ...
pub const BODY_GRACE: Duration = Duration::from_secs(10);
/// ... and must then average this many bytes a second: 128 kbit/s, below any mobile link
/// that can upload a photo at all (a 16 MB upload at exactly this rate takes 17 minutes).
/// A stalled body is cut after `BODY_GRACE`; 10 KB/s after about 27 s.
pub const MIN_BODY_RATE: f64 = 16.0 * 1024.0;
/// An answer the client does not read at all for this long.
pub const WRITE_STALL: Duration = Duration::from_secs(30);
/// The longest a request may wait for the first byte of its answer (a model download on
/// the first mask is the slowest thing Rocket does).
pub const RESPONSE_LIMIT: Duration = Duration::from_secs(30 * 60);
/// How long Rocket has to accept the front's connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// New connections at the cap being given an evicted one's place or refused, at once;
/// beyond, sockets are just closed.
const OVERFLOW_AT_ONCE: usize = 64;
/// One directly connected address may hold this fraction of `MAX_CONNECTIONS` (128 of the
/// default 512: a browser opens six, an office behind one NAT address a few dozen, the
/// 64-client load test 66).
const PEER_SHARE_DIVISOR: usize = 4;
const BUFFER: usize = 16 * 1024;
/// At most this much of a body Rocket did not read is read and dropped (at no less than
/// the minimum rate) before the connection is closed anyway: four times the default upload
/// limit.
const DISCARD_LIMIT: u64 = 64 << 20;
/// How long the front keeps reading (and dropping) what a client still sends after the
/// front's own refusal, so that the client reads that refusal instead of a reset.
const LINGER: Duration = Duration::from_secs(2);

/// Whether the client reached us over TLS: `PUBLIC_ORIGIN` is https, or the front
/// believed a trusted proxy's `X-Forwarded-Proto: https`.
pub fn is_https(request: &Request<'_>) -> bool {
    request.headers().get_one(PROTO_HEADER).is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// The public listener, bound before Rocket starts (a port in use fails the start).
pub struct Front {
    listener: std::net::TcpListener,
    public: SocketAddr,
}

impl Front {
    /// Binds the address and port the configuration names.
    pub fn bind(figment: &Figment) -> Result<Self, String> {
        let address: IpAddr = figment.extract_inner("address").map_err(|e| format!("address: {e}"))?;
        let port: u16 = figment.extract_inner("port").map_err(|e| format!("PORT: {e}"))?;
        let public = SocketAddr::new(address, port);
        let listener = std::net::TcpListener::bind(public).map_err(|e| format!("cannot listen on {public}: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| format!("cannot listen on {public}: {e}"))?;
        let public = listener.local_addr().unwrap_or(public);
        Ok(Front { listener, public })
    }

    /// Rocket's own settings: loopback, on a port the system picks.
    pub fn inner(figment: Figment) -> Figment {
        figment.merge(Serialized::global("address", "127.0.0.1")).merge(Serialized::global("port", 0))
    }

    /// Starts accepting once Rocket listens.
    pub fn stage(self) -> AdHoc {
        let listener = std::sync::Mutex::new(Some(self.listener));
        let public = self.public;
        AdHoc::on_liftoff("Front door", move |rocket| {
            let listener = listener.lock().ok().and_then(|mut l| l.take());
            Box::pin(async move {
                let Some(listener) = listener else { return };
                let listener = match TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        log::error!("cannot listen on {public}: {e}");
                        rocket.shutdown().notify();
                        return;
                    }
                };
                let cfg = rocket.state::<AppConfig>().cloned().unwrap_or_default();
                let origins = cfg.public_origins();
                let header = cfg.proxy_ip_header.trim();
                let ctx = Arc::new(Ctx {
                    backend: SocketAddr::new(rocket.config().address, rocket.config().port),
                    keep_alive: match rocket.config().keep_alive {
                        0 => None,
                        secs => Some(Duration::from_secs(u64::from(secs))),
                    },
                    proxy_ip_header: (!header.is_empty()).then(|| header.to_string()),
                    https_origin: !origins.is_empty() && origins.iter().all(|o| o.starts_with("https://")),
                    waiting: Waiting::default(),
                    peers: Default::default(),
                    per_peer: (cfg.max_connections / PEER_SHARE_DIVISOR).max(8),
                });
                let shutdown = rocket.shutdown();
                rocket::tokio::spawn(async move {
                    rocket::tokio::select! {
                        () = accept(listener, ctx, cfg.max_connections) => {}
                        () = shutdown => {}
                    }
                });
                log::info!("listening on http://{public}");
                println!("Drishya is listening on http://{public}");
                // Start-up is over: its code need not stay resident.
                rocket::tokio::task::spawn_blocking(crate::sysmem::drop_startup_code);
            })
        })
    }
}

/// What every connection needs to know.
struct Ctx {
    backend: SocketAddr,
    /// `None`: one request per connection.
    keep_alive: Option<Duration>,
    proxy_ip_header: Option<String>,
    https_origin: bool,
    waiting: Waiting,
    /// Open connections per client address (direct clients only, see `PeerShare`).
    peers: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
    per_peer: usize,
}

impl Ctx {
    fn trust(&self) -> Trust<'_> {
        Trust { proxy_ip_header: self.proxy_ip_header.as_deref(), https_origin: self.https_origin }
    }
}

/// Connections waiting for a request head (their first, or the next on a kept-alive
/// connection), oldest wait first: at the cap, the oldest of them makes room for a new
/// connection. A client mid-request is never cut for this; slow or idle clients holding
/// every place cannot keep everyone else out.
#[derive(Default)]
struct Waiting {
    next: AtomicU64,
    queue: std::sync::Mutex<std::collections::BTreeMap<(Instant, u64), Arc<Notify>>>,
}

/// A connection's place in [`Waiting`] while it waits for a head.
struct WaitTicket<'a> {
    waiting: &'a Waiting,
    key: (Instant, u64),
}

impl Waiting {
    fn queue(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<(Instant, u64), Arc<Notify>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self, evict: &Arc<Notify>) -> WaitTicket<'_> {
        let key = (Instant::now(), self.next.fetch_add(1, Ordering::Relaxed));
        self.queue().insert(key, evict.clone());
        WaitTicket { waiting: self, key }
    }

    /// Tells the connection that has waited longest to close; false if none waits.
    fn evict_oldest(&self) -> bool {
        let oldest = self.queue().pop_first();
        oldest.map(|(_, evict)| evict.notify_one()).is_some()
    }
}

impl Drop for WaitTicket<'_> {
    fn drop(&mut self) {
        self.waiting.queue().remove(&self.key);
    }
}

/// A 503 without waiting for anything (bounded by the overflow places).
fn refuse_at_once(socket: TcpStream, overflow: &Arc<Semaphore>) {
    let Ok(busy) = overflow.clone().try_acquire_owned() else { return };
    rocket::tokio::spawn(async move {
        refuse_full(socket).await;
        drop(busy);
    });
}

/// The 503 of a full server, on a connection that never got a place.
async fn refuse_full(socket: TcpStream) {
    let (reader, mut writer) = socket.into_split();
    let _ = timeout(Duration::from_secs(1), writer.write_all(&answer(Refusal::Full))).await;
    let _ = writer.shutdown().await;
    linger(reader).await;
}

/// Reads and drops what the client still sends after the front's answer and its FIN, until
/// the client closes, for `LINGER` and `DISCARD_LIMIT` bytes at most: a socket closed with
/// unread data resets the connection, and a client in the middle of sending its upload
/// would then see "connection reset" or "broken pipe" instead of the answer.
async fn linger(mut reader: OwnedReadHalf) {
    let mut chunk = vec![0u8; BUFFER];
    let mut left = DISCARD_LIMIT;
    let _ = timeout(LINGER, async {
        while let Ok(n @ 1..) = reader.read(&mut chunk).await {
            left = left.saturating_sub(n as u64);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// Connections of one address, when clients reach us directly (no `PROXY_IP_HEADER`):
/// one machine holding connections in the middle of requests (slow bodies) cannot take
/// every place. Behind a proxy every connection comes from the proxy, so there is no
/// such share: the proxy's own limits apply.
struct PeerShare {
    ctx: Arc<Ctx>,
    ip: IpAddr,
}

impl PeerShare {
    fn take(ctx: &Arc<Ctx>, ip: IpAddr) -> Option<Option<PeerShare>> {
        if ctx.proxy_ip_header.is_some() {
            return Some(None);
        }
        let mut peers = ctx.peers.lock().unwrap_or_else(|e| e.into_inner());
        let count = peers.entry(ip).or_insert(0);
        if *count >= ctx.per_peer {
            return None;
        }
        *count += 1;
        Some(Some(PeerShare { ctx: ctx.clone(), ip }))
    }
}

impl Drop for PeerShare {
    fn drop(&mut self) {
        let mut peers = self.ctx.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = peers.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

async fn accept(listener: TcpListener, ctx: Arc<Ctx>, max_connections: usize) {
    let open = Arc::new(Semaphore::new(max_connections));
    // Connections at the cap waiting for an evicted one's place, or being refused.
    let overflow = Arc::new(Semaphore::new(OVERFLOW_AT_ONCE));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: wait for connections to close.
                log::warn!("accept failed: {e}");
                rocket::tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let Some(share) = PeerShare::take(&ctx, peer.ip()) else {
            refuse_at_once(socket, &overflow);
            continue;
        };
        let ctx = ctx.clone();
        if let Ok(permit) = open.clone().try_acquire_owned() {
            rocket::tokio::spawn(async move {
                serve(socket, peer.ip(), ctx.clone()).await;
                drop((permit, share));
            });
            continue;
        }
        let Ok(busy) = overflow.clone().try_acquire_owned() else { continue };
        let open = open.clone();
        let ctx = ctx.clone();
        rocket::tokio::spawn(async move {
            let place = match ctx.waiting.evict_oldest() {
                true => timeout(Duration::from_secs(1), open.acquire_owned()).await.ok().and_then(Result::ok),
                false => None,
            };
            match place {
                Some(permit) => {
                    drop(busy);
                    serve(socket, peer.ip(), ctx.clone()).await;
                    drop((permit, share));
                }
                // The overflow place is held while the refusal lingers: a flood of
                // connections cannot pile up lingering tasks.
                None => {
                    refuse_full(socket).await;
                    drop(busy);
                }
            }
        });
    }
}

/// The front's own answers (the request never reached Rocket, or its body stalled).
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Full,
    HeaderTimeout,
    BodyTooSlow,
    Head(HeadError),
    Unavailable,
}

fn answer(refusal: Refusal) -> Vec<u8> {
    let (status, message) = match refusal {
        Refusal::Full => {
            ("503 Service Unavailable", "the server has too many connections open; try again in a few seconds")
        }
        Refusal::Unavailable => {
            ("503 Service Unavailable", "the server is starting or stopping; try again in a few seconds")
        }
        Refusal::HeaderTimeout => ("408 Request Timeout", "the request's headers did not arrive in time"),
        Refusal::BodyTooSlow => {
            ("408 Request Timeout", "the upload stalled or was too slow; check the connection and try again")
        }
        Refusal::Head(HeadError::TooLarge) => {
            ("431 Request Header Fields Too Large", "the request's headers are too large")
        }
        Refusal::Head(HeadError::Malformed) => ("400 Bad Request", "bad request: not an HTTP/1.1 request"),
        Refusal::Head(HeadError::AmbiguousLength) => {
            ("400 Bad Request", "bad request: the body's length is ambiguous (Content-Length with Transfer-Encoding)")
        }
    };
    let body = format!("{{\"error\":\"{message}\"}}");
    let retry = if status.starts_with("503") { "Retry-After: 5\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The two directions of one client connection: what each must know of the other.
struct Link {
    started: Instant,
    /// A request was sent to Rocket and no byte of an answer came back since.
    awaiting: AtomicBool,
    /// Milliseconds since `started` of the last byte either way.
    last_activity_ms: AtomicU64,
    client: Mutex<OwnedWriteHalf>,
}

impl Link {
    fn touch(&self) {
        self.last_activity_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// When an idle connection is closed: keep-alive after the last byte, or, while a
    /// request waits for its answer, the response limit.
    fn idle_deadline(&self, keep_alive: Option<Duration>) -> Instant {
        let last = self.started + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        if self.awaiting.load(Ordering::Relaxed) {
            last + RESPONSE_LIMIT
        } else {
            last + keep_alive.unwrap_or(Duration::ZERO)
        }
    }

    /// The front's own answer, then the end of the connection.
    async fn refuse(&self, refusal: Refusal) {
        let mut client = self.client.lock().await;
        let _ = timeout(Duration::from_secs(1), client.write_all(&answer(refusal))).await;
        let _ = client.shutdown().await;
    }
}

/// Rocket's side of one client connection.
struct Upstream {
    writer: OwnedWriteHalf,
    relay: JoinHandle<()>,
    closed: watch::Receiver<bool>,
}

async fn connect(ctx: &Ctx, link: &Arc<Link>) -> Option<Upstream> {
    let stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(ctx.backend)).await.ok()?.ok()?;
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let (tx, closed) = watch::channel(false);
    let relay = rocket::tokio::spawn(relay(reader, link.clone(), tx));
    Some(Upstream { writer, relay, closed })
}

/// Rocket's answers, to the client, as they come.
async fn relay(mut reader: OwnedReadHalf, link: Arc<Link>, closed: watch::Sender<bool>) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        link.awaiting.store(false, Ordering::Relaxed);
        link.touch();
        let mut client = link.client.lock().await;
        if !matches!(timeout(WRITE_STALL, client.write_all(&buf[..n])).await, Ok(Ok(()))) {
            break;
        }
        link.touch();
    }
    let _ = timeout(Duration::from_secs(1), link.client.lock().await.shutdown()).await;
    let _ = closed.send(true);
}

/// Why a connection's loop ended.
enum End {
    /// The client went, or idled out, or Rocket closed, or Rocket already began to answer
    /// the request being cut: nothing to add.
    Quiet,
    /// The front says why (Rocket has not answered the request).
    Refuse(Refusal),
    /// The client went in the middle of a request: it can never be completed, so Rocket's
    /// side is closed at once (and whatever it held for the request freed).
    Gone,
}

async fn serve(socket: TcpStream, peer: IpAddr, ctx: Arc<Ctx>) {
    let (mut reader, writer) = socket.into_split();
    let link = Arc::new(Link {
        started: Instant::now(),
        awaiting: AtomicBool::new(false),
        last_activity_ms: AtomicU64::new(0),
        client: Mutex::new(writer),
    });
    let mut buf = Vec::new();
    let mut upstream: Option<Upstream> = None;
    let end = requests(&mut reader, &mut buf, &mut upstream, peer, &ctx, &link).await;
    match end {
        End::Gone => {
            if let Some(up) = upstream.take() {
                up.relay.abort();
            }
        }
        End::Refuse(refusal) => {
            // Rocket must not answer a request whose body was cut: its side goes first.
            if let Some(up) = upstream.take() {
                up.relay.abort();
                drop(up.writer);
            }
            link.refuse(refusal).await;
            linger(reader).await;
        }
        End::Quiet => {
            if let Some(mut up) = upstream.take() {
                // A request may still be answering (the client half-closed after sending).
                if link.awaiting.load(Ordering::Relaxed) || !*up.closed.borrow() {
                    let _ = timeout(RESPONSE_LIMIT, wait_closed_or_idle(&mut up, &link)).await;
                }
                up.relay.abort();
            }
            let _ = timeout(Duration::from_secs(1), link.client.lock().await.shutdown()).await;
        }
    }
}

/// Waits until Rocket closes or the answer in flight is done (no byte for a second
/// after the last one, nothing awaited).
async fn wait_closed_or_idle(up: &mut Upstream, link: &Link) {
    loop {
        if *up.closed.borrow() {
            return;
        }
        let quiet = Instant::now() >= link.idle_deadline(Some(Duration::from_secs(1)));
        if quiet && !link.awaiting.load(Ordering::Relaxed) {
            return;
        }
        let _ = timeout(Duration::from_millis(200), up.closed.changed()).await;
    }
}

/// Relays requests until the connection ends.
async fn requests(
    reader: &mut OwnedReadHalf,
    buf: &mut Vec<u8>,
    upstream: &mut Option<Upstream>,
    peer: IpAddr,
    ctx: &Ctx,
    link: &Arc<Link>,
) -> End {
    let mut first = true;
    let evict = Arc::new(Notify::new());
    loop {
        let closed = upstream.as_ref().map(|u| u.closed.clone());
        let ticket = ctx.waiting.enter(&evict);
        let head = read_head(reader, buf, link, ctx.keep_alive, first, closed, &evict).await;
        drop(ticket);
        let head_len = match head {
            Ok(Some(len)) => len,
            Ok(None) => return End::Quiet,
            Err(refusal) => return End::Refuse(refusal),
        };
        first = false;
        let head = match http::parse(&buf[..head_len], peer, &ctx.trust()) {
            Ok(head) => head,
            Err(e) => return End::Refuse(Refusal::Head(e)),
        };
        buf.drain(..head_len);
        if upstream.as_ref().is_none_or(|u| *u.closed.borrow()) {
            if let Some(old) = upstream.take() {
                old.relay.abort();
            }
            match connect(ctx, link).await {
                Some(up) => *upstream = Some(up),
                None => return End::Refuse(Refusal::Unavailable),
            }
        }
        let Some(up) = upstream.as_mut() else { return End::Quiet };
        link.awaiting.store(true, Ordering::Relaxed);
        link.touch();
        if !matches!(timeout(WRITE_STALL, up.writer.write_all(&head.bytes)).await, Ok(Ok(()))) {
            return End::Quiet;
        }
        match forward_body(reader, buf, &mut up.writer, head.body, link).await {
            Ok(()) => {}
            Err(end) => return end,
        }
        if head.close || ctx.keep_alive.is_none() {
            // Rocket answers, then closes (the client asked for it, or keep-alive is off).
            return End::Quiet;
        }
    }
}

/// Reads until `buf` holds a whole head; its length. `None`: the connection ended
/// quietly (the client closed, idled out between requests, or Rocket closed).
async fn read_head(
    reader: &mut OwnedReadHalf,
    buf: &mut Vec<u8>,
    link: &Link,
    keep_alive: Option<Duration>,
    first: bool,
    mut closed: Option<watch::Receiver<bool>>,
    evict: &Notify,
) -> Result<Option<usize>, Refusal> {
    let mut head_deadline = (first || !buf.is_empty()).then(|| Instant::now() + HEADER_TIMEOUT);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = http::head_end(buf) {
            return Ok(Some(end));
        }
        if buf.len() > http::MAX_HEAD {
            return Err(Refusal::Head(HeadError::TooLarge));
        }
        if closed.as_ref().is_some_and(|c| *c.borrow()) {
            return Ok(None);
        }
        let deadline = head_deadline.unwrap_or_else(|| link.idle_deadline(keep_alive));
        let now = Instant::now();
        if now >= deadline {
            return match head_deadline {
                Some(_) => Err(Refusal::HeaderTimeout),
                None => Ok(None),
            };
        }
        // Wake at least every second: the idle deadline moves while an answer streams.
        let wait = (deadline - now).min(Duration::from_secs(1));
        let read = rocket::tokio::select! {
            read = timeout(wait, reader.read(&mut chunk)) => read,
            _ = async { match closed.as_mut() { Some(c) => { let _ = c.changed().await; } None => std::future::pending().await } } => continue,
            // Its place went to a new connection (see `Waiting`).
            () = evict.notified() => return Ok(None),
        };
        match read {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                link.touch();
                if head_deadline.is_none() {
                    head_deadline = Some(Instant::now() + HEADER_TIMEOUT);
                }
            }
        }
    }
}

/// Passes the body on to Rocket as it arrives, at no less than the minimum rate.
async fn forward_body(
    reader: &mut OwnedReadHalf,
    buf: &mut Vec<u8>,
    writer: &mut OwnedWriteHalf,
    body: Body,
    link: &Link,
) -> Result<(), End> {
    let mut remaining = match body {
        Body::None => return Ok(()),
        Body::Length(n) => Some(n),
        Body::Chunked => None,
    };
    let mut chunked = Chunked::default();
    let started = Instant::now();
    let mut received: u64 = 0;
    let mut chunk = vec![0u8; BUFFER];
    let mut discard = false;
    loop {
        if !buf.is_empty() {
            let take = match remaining {
                Some(n) => buf.len().min(usize::try_from(n).unwrap_or(usize::MAX)),
                None => chunked.feed(buf).map_err(|e| End::Refuse(Refusal::Head(e)))?,
            };
            if !discard && !matches!(timeout(WRITE_STALL, writer.write_all(&buf[..take])).await, Ok(Ok(()))) {
                // Rocket answered without reading the whole body (a 401, or a 503 for a
                // full upload queue) and stopped reading. The rest is read and dropped: a
                // socket closed with unread data resets the connection, and a client still
                // sending its upload would then never read that answer.
                discard = true;
            }
            buf.drain(..take);
            received += take as u64;
            if discard && received > DISCARD_LIMIT {
                return Err(End::Quiet);
            }
            if let Some(n) = remaining.as_mut() {
                *n -= take as u64;
            }
            if remaining == Some(0) || chunked.done() {
                return Ok(());
            }
        }
        // Rocket may have answered already (a 413 before the end of the body): then the
        // connection just ends.
        let too_slow = || match link.awaiting.load(Ordering::Relaxed) {
            true => End::Refuse(Refusal::BodyTooSlow),
            false => End::Quiet,
        };
        let deadline = started + BODY_GRACE + Duration::from_secs_f64(received as f64 / MIN_BODY_RATE);
        let now = Instant::now();
        if now >= deadline {
            return Err(too_slow());
        }
        match timeout(deadline - now, reader.read(&mut chunk)).await {
            Err(_) => return Err(too_slow()),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(End::Gone),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                link.touch();
            }
        }
    }
}
