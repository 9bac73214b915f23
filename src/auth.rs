//! Login, logout, the session guard and the login throttle.
//!
//! **Sessions.** The session lives in Rocket's private cookie (encrypted and authenticated
//! with `SECRET_KEY`), HttpOnly, SameSite=Strict (so other sites cannot ride on it) and
//! Secure when the client reached us over TLS (see `front::is_https`). The cookie holds the
//! session id and the time it was issued ([`SessionToken`]); the server refuses it once
//! `SESSION_MAX_AGE` has passed since then. The lifetime is absolute, with no sliding
//! window: renewing the cookie on activity would let a copied cookie live as long as
//! someone keeps using it, and a working day is what the default is sized for. A logout
//! puts the session on a revocation list ([`Sessions`]) that keeps it until its cookie
//! would have expired anyway, so a copy of the cookie is dead from the logout on.
//!
//! **Throttle.** The password is compared in constant time; repeated failures back off
//! exponentially per client ([`Throttle`]). A client is its address as the front door
//! determined it (`client_ip()`, the socket peer unless `PROXY_IP_HEADER` says otherwise).
//! Many users can share one address (an office, a phone carrier's NAT, or every user at
//! once when a proxy's address is all we see), so an attacker hammering that address must
//! not lock them all out: a browser that has logged in before carries a device cookie
//! (OWASP's "device cookies") and is throttled on its own counter instead of its address's.
//! What an attacker can still do is lock out browsers that never logged in from the
//! address they share with it, for the back-off's length (at most five minutes at a time).
//!
//! **API tokens.** Scripts send `Authorization: Bearer <token>` with a token of
//! `API_TOKENS` instead of posting the login form ([`TokenAuth`]). A token's session is
//! derived from it (a keyed hash with the app's secret), so a script's calls share one
//! session and its artefacts. A bearer request is never bound to a cookie: it needs no
//! cross-origin check (a page on another site cannot add the header without a CORS
//! preflight, which this app never grants), and a refused token is a 401 even when a valid
//! cookie came with it. Only the `Bearer` scheme is read: a proxy's `Basic` credentials
//! pass through to the cookie check as before.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hkdf::Hkdf;
use rocket::fairing::AdHoc;
use rocket::form::Form;
use rocket::http::{ContentType, Cookie, CookieJar, Header, SameSite, Status};
use rocket::request::{FromRequest, Outcome, Request};
use rocket::response::Redirect;
use rocket::{Route, State};
use rocket_dyn_templates::{context, Template};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AppConfig;
use crate::storage::{Artefacts, SessionId};
use crate::web::AssetVersion;

pub const SESSION_COOKIE: &str = "drishya_session";
/// Marks a browser that has logged in before (see the module's notes on the throttle).
pub const DEVICE_COOKIE: &str = "drishya_device";

/// Failures allowed before the back-off starts.
const FREE_ATTEMPTS: u32 = 5;
const MAX_LOCKOUT: Duration = Duration::from_secs(300);
/// How long a device cookie vouches for a browser.
const DEVICE_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// Clients tracked per generation of the throttle's map: two generations at most, so at
/// most twice this many (a few hundred KB).
const THROTTLE_GENERATION: usize = 8192;
/// A generation's span. A client's failures are kept at least this long after its last
/// one: twice the longest lock-out, so a client that waits out a full lock-out still
/// finds its count there and goes on backing off.
const THROTTLE_WINDOW: Duration = Duration::from_secs(2 * MAX_LOCKOUT.as_secs());
/// Logged-out sessions remembered at once. Far beyond this app's use (one logout every
/// 1.4 s for a whole working day); when it fills up, every session issued so far is refused
/// (fail closed, logged) rather than forgetting a logout.
const REVOKED_CAPACITY: usize = 20_000;
/// Replicas' clocks may disagree a little: a cookie issued up to this far in this
/// replica's future is still accepted.
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The first field of a session cookie's value: cookies from before issue times were
/// recorded held only the id, and are refused.
const TOKEN_VERSION: &str = "2";
const DEVICE_VERSION: &str = "d1";

/// Milliseconds since the Unix epoch (wall clock: cookies outlive this process and are
/// read by other replicas).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Why a session cookie was refused (each is a 401, or the login page at `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionRefused {
    #[error("it is of the format from before session lifetimes (the session id only)")]
    OldFormat,
    #[error("it cannot be read")]
    Malformed,
    #[error("it is older than SESSION_MAX_AGE")]
    Expired,
    #[error("it was issued in the future (check the clocks)")]
    FromTheFuture,
    #[error("its session was logged out")]
    Revoked,
    #[error("the session list is not set up")]
    NoSessionState,
}

/// What the session cookie holds: `2.<session id>.<issued, ms since the epoch>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionToken {
    pub session: SessionId,
    pub issued_ms: u64,
}

impl SessionToken {
    pub fn new(session: SessionId, issued_ms: u64) -> Self {
        SessionToken { session, issued_ms }
    }

    pub fn encode(&self) -> String {
        format!("{TOKEN_VERSION}.{}.{}", self.session.as_str(), self.issued_ms)
    }

    pub fn decode(value: &str) -> Result<Self, SessionRefused> {
        if SessionId::parse(value).is_some() {
            return Err(SessionRefused::OldFormat);
        }
        let mut parts = value.split('.');
        let (Some(TOKEN_VERSION), Some(id), Some(issued), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionRefused::Malformed);
        };
        let session = SessionId::parse(id).ok_or(SessionRefused::Malformed)?;
        let issued_ms = issued.parse().map_err(|_| SessionRefused::Malformed)?;
        Ok(SessionToken { session, issued_ms })
    }
}

/// The revocation list's key: the id's 128 bits (a [`SessionId`] is 32 hex digits).
fn revocation_key(session: &SessionId) -> u128 {
    u128::from_str_radix(session.as_str(), 16).unwrap_or_default()
}

#[derive(Default)]
struct RevocationList {
    /// Session -> when its cookie expires and when it was issued (ms).
    by_id: HashMap<u128, (u64, u64)>,
    /// The same, in expiry order, so expired entries leave without a scan.
    by_expiry: BTreeSet<(u64, u128)>,
    /// Cookies issued at or before this (ms) are refused: set when the list overflowed.
    floor_ms: u64,
}

impl RevocationList {
    fn prune(&mut self, now_ms: u64) {
        while let Some(&(expires, key)) = self.by_expiry.first() {
            if expires > now_ms {
                break;
            }
            self.by_expiry.pop_first();
            self.by_id.remove(&key);
        }
    }
}

/// Logged-out sessions, each kept until its cookie would have expired anyway. In memory,
/// per process: a restart forgets it (see README, *Sessions and the login throttle*).
#[derive(Default)]
pub struct Sessions {
    revoked: Mutex<RevocationList>,
}

impl Sessions {
    fn list(&self) -> MutexGuard<'_, RevocationList> {
        // The list stays consistent between statements: a panic elsewhere leaves it usable.
        self.revoked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `token` may be used at `now_ms` with cookies living `max_age`.
    pub fn check(&self, token: &SessionToken, max_age: Duration, now_ms: u64) -> Result<(), SessionRefused> {
        if token.issued_ms > now_ms.saturating_add(CLOCK_SKEW.as_millis() as u64) {
            return Err(SessionRefused::FromTheFuture);
        }
        if now_ms >= token.issued_ms.saturating_add(max_age.as_millis() as u64) {
            return Err(SessionRefused::Expired);
        }
        let list = self.list();
        if token.issued_ms <= list.floor_ms || list.by_id.contains_key(&revocation_key(&token.session)) {
            return Err(SessionRefused::Revoked);
        }
        Ok(())
    }

    /// Refuses `token` from now until it would have expired anyway.
    pub fn revoke(&self, token: &SessionToken, max_age: Duration, now_ms: u64) {
        let expires = token.issued_ms.saturating_add(max_age.as_millis() as u64);
        if expires <= now_ms {
            return;
        }
        let key = revocation_key(&token.session);
        let mut list = self.list();
        list.prune(now_ms);
        if list.by_id.len() >= REVOKED_CAPACITY {
            // Every cookie issued so far, the listed ones and this one included, is refused
            // by the floor (a replica whose clock runs ahead may have issued some "later"
            // than now: the floor covers those too), so the list can start again without
            // reopening any of them.
            log::warn!(
                "more than {REVOKED_CAPACITY} logged-out sessions to remember: every session issued \
                 so far is now refused (users log in again)"
            );
            let latest = list.by_id.values().map(|&(_, issued)| issued).max().unwrap_or(0);
            list.floor_ms = list.floor_ms.max(now_ms).max(latest).max(token.issued_ms);
            list.by_id.clear();
            list.by_expiry.clear();
            return;
        }
        if let Some((old, _)) = list.by_id.insert(key, (expires, token.issued_ms)) {
            list.by_expiry.remove(&(old, key));
        }
        list.by_expiry.insert((expires, key));
    }

    /// Logged-out sessions remembered now.
    pub fn revoked_count(&self) -> usize {
        self.list().by_id.len()
    }
}

/// Manages [`Sessions`] and [`TokenAuth`] (after the configuration stage, whose
/// `API_TOKENS` it reads).
pub fn stage() -> AdHoc {
    AdHoc::on_ignite("Sessions", |rocket| async move {
        let tokens = rocket.state::<AppConfig>().map(|cfg| cfg.api_tokens.clone()).unwrap_or_default();
        let auth = TokenAuth::new(&tokens, &secret_material(rocket.figment()));
        rocket.manage(Sessions::default()).manage(auth)
    })
}

/// A logged-in session: a browser's cookie or a script's API token. Routes that take a
/// `User` answer 401 without one.
pub struct User {
    pub session: SessionId,
    pub issued_ms: u64,
    /// Came with a valid API token rather than a cookie (nothing to revoke at logout).
    pub via_token: bool,
}

/// Shortest API token accepted: even in hex, 16 random characters are 64 bits, beyond
/// guessing over HTTP.
pub const MIN_TOKEN_CHARS: usize = 16;
/// Longest: a header line, not a body.
pub const MAX_TOKEN_CHARS: usize = 512;

/// `API_TOKENS` as configured: a secret, so `Debug` shows only how many there are and
/// nothing serialises it. Read from a string only: figment reads an all-digit value as a
/// number, which would lose leading zeros, so such a value is refused at launch.
#[derive(Clone, Default)]
pub struct ApiTokens(Vec<String>);

impl ApiTokens {
    /// The comma-separated list as given (empty entries kept, for [`ApiTokens::check`]).
    pub fn parse(list: &str) -> Self {
        if list.trim().is_empty() {
            return ApiTokens(Vec::new());
        }
        ApiTokens(list.split(',').map(|t| t.trim().to_string()).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The first problem, naming the entry by position and never quoting it.
    pub fn check(&self) -> Result<(), String> {
        // RFC 6750's b64token characters: what a bearer header can carry unquoted.
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
        for (i, token) in self.0.iter().enumerate() {
            let n = i + 1;
            if token.is_empty() {
                return Err(format!("entry {n} is empty (a doubled or trailing comma?)"));
            }
            if token.len() < MIN_TOKEN_CHARS {
                return Err(format!("entry {n} is shorter than {MIN_TOKEN_CHARS} characters"));
            }
            if token.len() > MAX_TOKEN_CHARS {
                return Err(format!("entry {n} is longer than {MAX_TOKEN_CHARS} characters"));
            }
            if !token.chars().all(allowed) {
                return Err(format!("entry {n} may hold only letters, digits and - . _ ~ + / ="));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({} set, not shown)", self.0.len())
    }
}

impl<'de> serde::Deserialize<'de> for ApiTokens {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct List;

        impl serde::de::Visitor<'_> for List {
            type Value = ApiTokens;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a comma-separated list of tokens, each with at least one letter")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<ApiTokens, E> {
                Ok(ApiTokens::parse(value))
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<ApiTokens, E> {
                Ok(ApiTokens::default())
            }
        }

        deserializer.deserialize_any(List)
    }
}

/// The configured API tokens as the guard checks them: each token's SHA-256 (compared in
/// constant time, and of one length whatever the token's, so a comparison tells nothing
/// of either) and the session derived from it.
pub struct TokenAuth {
    tokens: Vec<([u8; 32], SessionId)>,
}

const TOKEN_SESSION_INFO: &[u8] = b"drishya/api-token-session/v1";

impl TokenAuth {
    /// `secret` keys the derivation of sessions: a session id is seen in the store (a
    /// directory or a bucket's keys), and without the key it cannot be used to test
    /// guesses of the token offline.
    pub fn new(tokens: &ApiTokens, secret: &[u8]) -> Self {
        let tokens = tokens
            .0
            .iter()
            .filter(|t| !t.is_empty())
            .map(|token| (Sha256::digest(token.as_bytes()).into(), token_session(secret, token)))
            .collect();
        TokenAuth { tokens }
    }

    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The session of `given` if it is one of the tokens. Every configured token is
    /// compared, matched or not, as `password_matches` compares a password.
    pub fn session_for(&self, given: &str) -> Option<SessionId> {
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let mut found = None;
        for (expected, session) in &self.tokens {
            if bool::from(digest.as_slice().ct_eq(expected.as_slice())) {
                found = Some(session.clone());
            }
        }
        found
    }
}

/// The session of `token`: 128 bits of HKDF-SHA-256 keyed by the app's secret.
fn token_session(secret: &[u8], token: &str) -> SessionId {
    let mut id = [0u8; 16];
    // 16 bytes is far below HKDF-SHA-256's 255 * 32 byte limit: cannot fail.
    if Hkdf::<Sha256>::new(Some(secret), token.as_bytes()).expand(TOKEN_SESSION_INFO, &mut id).is_err() {
        unreachable!("HKDF-SHA-256 output of 16 bytes is always valid");
    }
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    SessionId::parse(&hex).unwrap_or_else(SessionId::random)
}

/// The key material for [`TokenAuth`]: Rocket's `secret_key` as configured (the same on
/// every replica and across restarts, so a token keeps its session), else a random one
/// for this process (development without `SECRET_KEY`, whose cookies die with it too).
/// Without a key the figment still holds Rocket's default, the zero key, which everyone
/// knows: that counts as none.
fn secret_material(figment: &rocket::figment::Figment) -> Vec<u8> {
    let provided = figment.extract_inner::<rocket::config::SecretKey>("secret_key").is_ok_and(|k| k.is_provided());
    provided
        .then(|| figment.find_value("secret_key").ok())
        .flatten()
        .and_then(|value| serde_json::to_vec(&value).ok())
        .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec())
}

/// The token of the request's `Authorization` header that uses the Bearer scheme, looked
/// for among all of them (a proxy may have added its own; other schemes, such as its Basic
/// credentials, are not ours to judge). Two bearer credentials are ambiguous: neither is
/// used, and the request is refused as one with a bad token (the empty token, which no
/// configured token can be).
fn bearer_token<'r>(request: &'r Request<'_>) -> Option<&'r str> {
    let mut bearers = request.headers().get("Authorization").filter_map(|value| {
        let value = value.trim();
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let first = bearers.next()?;
    Some(if bearers.next().is_some() { "" } else { first })
}

/// Set on a request whose bearer token was refused, for the 401's message.
struct TokenRefused(bool);

/// The session in `request`'s cookie, if it is one the server still accepts.
fn session_of(request: &Request<'_>) -> Option<Result<SessionToken, SessionRefused>> {
    let cookie = request.cookies().get_private(SESSION_COOKIE)?;
    let checked = SessionToken::decode(cookie.value()).and_then(|token| {
        let sessions = request.rocket().state::<Sessions>().ok_or(SessionRefused::NoSessionState)?;
        // Without a configuration (never in a built app) the lifetime is zero: refused.
        let max_age = request.rocket().state::<AppConfig>().map(AppConfig::session_lifetime).unwrap_or_default();
        sessions.check(&token, max_age, now_ms())?;
        Ok(token)
    });
    Some(checked)
}

/// True when a browser says this request comes from another site: `Sec-Fetch-Site:
/// cross-site`, or an `Origin` that is none of: the `Host` it was sent to, the
/// `X-Forwarded-Host` a reverse proxy passed on, a configured `PUBLIC_ORIGIN`. Requests
/// without these headers (non-browser clients) pass; SameSite=Strict already keeps the
/// cookie away. (A cross-site page cannot forge `X-Forwarded-Host`: a custom header makes
/// the browser ask first with a CORS preflight, which this app never grants.)
pub fn is_cross_origin(request: &Request<'_>) -> bool {
    let headers = request.headers();
    if headers.get_one("Sec-Fetch-Site") == Some("cross-site") {
        return true;
    }
    let Some(origin) = headers.get_one("Origin") else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    let public = request.rocket().state::<AppConfig>().map(AppConfig::public_origins).unwrap_or_default();
    if public.iter().any(|p| p.eq_ignore_ascii_case(origin)) {
        return false;
    }
    let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or(origin);
    let same_host = |host: &str| host.split(',').next().is_some_and(|h| h.trim().eq_ignore_ascii_case(origin_host));
    let hosts = [headers.get_one("Host"), headers.get_one("X-Forwarded-Host")];
    if hosts.iter().flatten().any(|h| same_host(h)) {
        return false;
    }
    // A request with an Origin but no Host at all (HTTP/1.0) cannot be compared: let it
    // pass as before; SameSite=Strict still keeps the cookie from other sites.
    headers.get_one("Host").is_some()
}

/// Refuses state-changing requests that a browser marks as coming from another site.
pub struct SameOrigin;

#[rocket::async_trait]
impl<'r> FromRequest<'r> for SameOrigin {
    type Error = ();

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, ()> {
        if is_cross_origin(request) {
            log::warn!("refused cross-origin {} {}", request.method(), request.uri().path());
            return Outcome::Error((Status::Forbidden, ()));
        }
        Outcome::Success(SameOrigin)
    }
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for User {
    type Error = ();

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, ()> {
        // A bearer request carries no cookie authority: no cross-origin check, and a
        // refused token never falls back to a cookie that came with it.
        if let Some(given) = bearer_token(request) {
            let session = request.rocket().state::<TokenAuth>().and_then(|auth| auth.session_for(given));
            return match session {
                Some(session) => Outcome::Success(User { session, issued_ms: now_ms(), via_token: true }),
                None => {
                    // Never the token itself: it may be a real one with a typo.
                    let why = match request.rocket().state::<TokenAuth>() {
                        Some(auth) if auth.enabled() => "not one of API_TOKENS",
                        _ => "API_TOKENS is not set",
                    };
                    log::info!("{} {}: API token refused ({why})", request.method(), request.uri().path());
                    request.local_cache(|| TokenRefused(true));
                    Outcome::Error((Status::Unauthorized, ()))
                }
            };
        }
        if request.method() != rocket::http::Method::Get && is_cross_origin(request) {
            return Outcome::Error((Status::Forbidden, ()));
        }
        match session_of(request) {
            Some(Ok(token)) => {
                Outcome::Success(User { session: token.session, issued_ms: token.issued_ms, via_token: false })
            }
            Some(Err(why)) => {
                log::info!("session cookie refused: {why}");
                // The browser stops sending a cookie that can never work again.
                request.cookies().remove_private(Cookie::build(SESSION_COOKIE).path("/"));
                Outcome::Error((Status::Unauthorized, ()))
            }
            None => Outcome::Error((Status::Unauthorized, ())),
        }
    }
}

/// Whether the client reached us over TLS, as the front door says (`front::is_https`):
/// then cookies are marked Secure.
pub struct Https(pub bool);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Https {
    type Error = ();

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, ()> {
        Outcome::Success(Https(crate::front::is_https(request)))
    }
}

/// Whom failures are counted against: a browser that has logged in before (its device
/// cookie's id), else the client's address (see [`ClientKey::peer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Peer(IpAddr),
    Device(u128),
}

impl ClientKey {
    /// The key of a client at `ip`. An IPv6 client counts as its /64 network: one host
    /// usually holds a whole /64 and could otherwise take a fresh address, and a fresh
    /// count, for every guess. An IPv4 address mapped into IPv6 is that IPv4 address.
    pub fn peer(ip: IpAddr) -> Self {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
            },
            v4 => v4,
        };
        ClientKey::Peer(ip)
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// The throttle's map in two generations: new and touched entries go into `current`;
/// when it is full or older than [`THROTTLE_WINDOW`], `previous` is dropped and `current`
/// takes its place. Every request is O(1), with no scan under the lock, and at most two
/// generations of entries exist, whatever the number of distinct clients.
struct Generations {
    current: HashMap<ClientKey, Failures>,
    previous: HashMap<ClientKey, Failures>,
    started: Instant,
}

impl Generations {
    fn new(now: Instant) -> Self {
        Generations { current: HashMap::new(), previous: HashMap::new(), started: now }
    }

    fn get(&self, key: &ClientKey) -> Option<&Failures> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    /// Starts a new generation when due; returns the dropped one, to be freed by the
    /// caller after the lock is released.
    fn rotate_if_due(&mut self, now: Instant) -> Option<HashMap<ClientKey, Failures>> {
        let due =
            self.current.len() >= THROTTLE_GENERATION || now.saturating_duration_since(self.started) >= THROTTLE_WINDOW;
        if !due {
            return None;
        }
        self.started = now;
        let current = std::mem::take(&mut self.current);
        Some(std::mem::replace(&mut self.previous, current))
    }
}

/// Login failure counts per client with exponential back-off (see the module's notes).
pub struct Throttle {
    map: Mutex<Generations>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle { map: Mutex::new(Generations::new(Instant::now())) }
    }
}

impl Throttle {
    fn map(&self) -> MutexGuard<'_, Generations> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long this client must still wait, if at all.
    pub fn wait_for(&self, client: ClientKey) -> Option<Duration> {
        let failures = *self.map().get(&client)?;
        let lockout = lockout_for(failures.count)?;
        let elapsed = failures.last.elapsed();
        (elapsed < lockout).then(|| lockout - elapsed)
    }

    /// Counts a failure; returns the client's failures so far.
    pub fn record_failure(&self, client: ClientKey) -> u32 {
        self.record_failure_at(client, Instant::now())
    }

    fn record_failure_at(&self, client: ClientKey, now: Instant) -> u32 {
        let (count, dropped) = {
            let mut map = self.map();
            let dropped = map.rotate_if_due(now);
            let earlier = map.current.get(&client).or_else(|| map.previous.get(&client)).map_or(0, |f| f.count);
            map.previous.remove(&client);
            let count = earlier.saturating_add(1);
            map.current.insert(client, Failures { count, last: now });
            (count, dropped)
        };
        drop(dropped);
        count
    }

    pub fn record_success(&self, client: ClientKey) {
        let mut map = self.map();
        map.current.remove(&client);
        map.previous.remove(&client);
    }

    /// Clients tracked now (both generations).
    pub fn tracked(&self) -> usize {
        let map = self.map();
        map.current.len() + map.previous.len()
    }
}

/// 1 s after the fifth failure, doubling, capped at five minutes.
fn lockout_for(failures: u32) -> Option<Duration> {
    let over = failures.checked_sub(FREE_ATTEMPTS)?;
    let seconds = 1u64.checked_shl(over.min(16)).unwrap_or(u64::MAX);
    Some(Duration::from_secs(seconds).min(MAX_LOCKOUT))
}

/// Whole seconds to tell a client to wait: rounded up, so that it never comes back early
/// (1.9 s is "2 s", not "1 s").
pub fn wait_seconds(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

pub fn password_matches(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// Ties a device cookie to the password it was earned with: after a password change, old
/// device cookies vouch for nothing.
fn password_tag(password: &str) -> u64 {
    let digest = Sha256::new().chain_update(b"drishya/device/v1\0").chain_update(password.as_bytes()).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// What the device cookie holds: `d1.<id>.<issued ms>.<password tag>`, sealed like the
/// session cookie (Rocket's private cookies), so it cannot be made without `SECRET_KEY`.
struct DeviceToken {
    id: u128,
    issued_ms: u64,
    tag: u64,
}

impl DeviceToken {
    fn encode(&self) -> String {
        format!("{DEVICE_VERSION}.{:032x}.{}.{:016x}", self.id, self.issued_ms, self.tag)
    }

    fn decode(value: &str) -> Option<Self> {
        let mut parts = value.split('.');
        let (Some(DEVICE_VERSION), Some(id), Some(issued), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(DeviceToken {
            id: u128::from_str_radix(id, 16).ok()?,
            issued_ms: issued.parse().ok()?,
            tag: u64::from_str_radix(tag, 16).ok()?,
        })
    }
}

/// The device id this browser's cookie vouches for, if it is valid now.
fn trusted_device(jar: &CookieJar<'_>, password: &str) -> Option<u128> {
    let token = DeviceToken::decode(jar.get_private(DEVICE_COOKIE)?.value())?;
    let now = now_ms();
    let fresh = now < token.issued_ms.saturating_add(DEVICE_MAX_AGE.as_millis() as u64)
        && token.issued_ms <= now.saturating_add(CLOCK_SKEW.as_millis() as u64);
    (fresh && token.tag == password_tag(password)).then_some(token.id)
}

#[derive(FromForm)]
struct LoginForm<'r> {
    password: &'r str,
}

#[derive(Responder)]
enum LoginAnswer {
    Redirect(Redirect),
    Page((Status, Template)),
    Throttled { page: (Status, Template), retry_after: Header<'static> },
}

fn login_template(cfg: &AppConfig, assets: &AssetVersion, error: Option<String>) -> Template {
    Template::render(
        "login",
        context! {
            error,
            version: env!("CARGO_PKG_VERSION"),
            assets: &assets.0,
            default_password: cfg.uses_default_password(),
        },
    )
}

fn login_page(cfg: &AppConfig, assets: &AssetVersion, status: Status, error: Option<String>) -> LoginAnswer {
    LoginAnswer::Page((status, login_template(cfg, assets, error)))
}

/// `time`'s duration (what cookies take) from a std one.
fn cookie_duration(d: Duration) -> rocket::time::Duration {
    rocket::time::Duration::seconds(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[post("/login", data = "<form>")]
#[allow(clippy::too_many_arguments)]
fn login(
    _origin: SameOrigin,
    form: Option<Form<LoginForm<'_>>>,
    jar: &CookieJar<'_>,
    cfg: &State<AppConfig>,
    throttle: &State<Arc<Throttle>>,
    assets: &State<AssetVersion>,
    client: Option<IpAddr>,
    https: Https,
) -> LoginAnswer {
    let key = match trusted_device(jar, cfg.password()) {
        Some(device) => ClientKey::Device(device),
        None => ClientKey::peer(client.unwrap_or(IpAddr::from([0, 0, 0, 0]))),
    };
    if let Some(wait) = throttle.wait_for(key) {
        let seconds = wait_seconds(wait);
        let message = format!("Too many failed attempts: try again in {seconds} s.");
        return LoginAnswer::Throttled {
            page: (Status::TooManyRequests, login_template(cfg, assets, Some(message))),
            retry_after: Header::new("Retry-After", seconds.to_string()),
        };
    }
    let given = form.as_ref().map(|f| f.password).unwrap_or("");
    if !password_matches(given, cfg.password()) {
        if throttle.record_failure(key) == FREE_ATTEMPTS {
            let whom = match key {
                ClientKey::Peer(ip) if ip.is_ipv6() => format!("network {ip}/64"),
                ClientKey::Peer(ip) => format!("address {ip}"),
                ClientKey::Device(_) => "a browser that logged in before".to_string(),
            };
            log::warn!("login: {FREE_ATTEMPTS} wrong passwords from {whom}: backing off");
        }
        return login_page(cfg, assets, Status::Unauthorized, Some("Incorrect password.".into()));
    }
    throttle.record_success(key);
    let now = now_ms();
    let lifetime = cfg.session_lifetime();
    let expires = rocket::time::OffsetDateTime::now_utc() + cookie_duration(lifetime);
    let token = SessionToken::new(SessionId::random(), now);
    let session = Cookie::build((SESSION_COOKIE, token.encode()))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(https.0)
        .path("/")
        .max_age(cookie_duration(lifetime))
        .expires(expires);
    jar.add_private(session);
    LoginAnswer::Redirect(Redirect::to("/"))
}

#[get("/logout")]
async fn logout(
    _origin: SameOrigin,
    user: Option<User>,
    jar: &CookieJar<'_>,
    store: &State<Arc<Artefacts>>,
    sessions: &State<Sessions>,
    cfg: &State<AppConfig>,
) -> Redirect {
    if let Some(user) = user {
        // A token's session has no cookie to revoke: its artefacts go, the token stays valid.
        if !user.via_token {
            let token = SessionToken::new(user.session.clone(), user.issued_ms);
            sessions.revoke(&token, cfg.session_lifetime(), now_ms());
        }
        // A shared store is a network call: off the async workers.
        let store = store.inner().clone();
        let _ = rocket::tokio::task::spawn_blocking(move || store.remove_session(&user.session)).await;
    }
    jar.remove_private(Cookie::build(SESSION_COOKIE).path("/"));
    Redirect::to("/")
}

/// Gives a logged-in browser its device cookie (see the module's notes) unless it has a
/// valid one. Issued with the page the login redirects to rather than with the login's own
/// answer, which keeps carrying exactly one cookie (clients that take "the" cookie of the
/// login answer keep working). Each browser gets its own random id, so each has its own
/// failure count.
fn ensure_device_cookie(jar: &CookieJar<'_>, cfg: &AppConfig, https: bool) {
    if trusted_device(jar, cfg.password()).is_some() {
        return;
    }
    let device = DeviceToken { id: rand::random(), issued_ms: now_ms(), tag: password_tag(cfg.password()) };
    let expires = rocket::time::OffsetDateTime::now_utc() + cookie_duration(DEVICE_MAX_AGE);
    let cookie = Cookie::build((DEVICE_COOKIE, device.encode()))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(https)
        .path("/")
        .max_age(cookie_duration(DEVICE_MAX_AGE))
        .expires(expires);
    jar.add_private(cookie);
}

#[get("/")]
fn index(
    user: Option<User>,
    cfg: &State<AppConfig>,
    assets: &State<AssetVersion>,
    jar: &CookieJar<'_>,
    https: Https,
) -> Template {
    let Some(user) = user else {
        return login_template(cfg, assets, None);
    };
    // A script's token earns no browser cookie: bearer requests are not cookie-bound.
    if !user.via_token {
        ensure_device_cookie(jar, cfg, https.0);
    }
    Template::render(
        "index",
        context! {
            version: env!("CARGO_PKG_VERSION"),
            assets: &assets.0,
            max_image_width: cfg.max_image_width,
            max_upload_mb: cfg.max_upload_mb,
            default_password: cfg.uses_default_password(),
        },
    )
}

pub fn routes() -> Vec<Route> {
    routes![index, login, logout]
}

/// Every 401 as `{"error": ...}`; a refused API token says so, with RFC 6750's
/// `WWW-Authenticate` (browsers never get that header: they would not know the scheme).
#[catch(401)]
fn unauthorized(request: &Request<'_>) -> Unauthorized {
    Unauthorized { token_refused: request.local_cache(|| TokenRefused(false)).0 }
}

struct Unauthorized {
    token_refused: bool,
}

impl<'r> rocket::response::Responder<'r, 'static> for Unauthorized {
    fn respond_to(self, request: &'r Request<'_>) -> rocket::response::Result<'static> {
        let message = if self.token_refused { "invalid API token" } else { "login required" };
        let body = serde_json::json!({ "error": message }).to_string();
        let mut response = (Status::Unauthorized, (ContentType::JSON, body)).respond_to(request)?;
        if self.token_refused {
            response.set_header(Header::new("WWW-Authenticate", r#"Bearer realm="drishya", error="invalid_token""#));
        }
        Ok(response)
    }
}

pub fn catchers() -> Vec<rocket::Catcher> {
    catchers![unauthorized]
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn peer(last: u8) -> ClientKey {
        ClientKey::Peer(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn lockout_grows_and_is_capped() {
        assert_eq!(lockout_for(4), None);
        assert_eq!(lockout_for(5), Some(Duration::from_secs(1)));
        assert_eq!(lockout_for(7), Some(Duration::from_secs(4)));
        assert_eq!(lockout_for(100), Some(MAX_LOCKOUT));
    }

    #[test]
    fn an_ipv6_client_counts_as_its_64_network() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(ClientKey::peer(ip("2001:db8:1:2:aaaa::1")), ClientKey::peer(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(ClientKey::peer(ip("2001:db8:1:2::1")), ClientKey::peer(ip("2001:db8:1:3::1")));
        assert_eq!(ClientKey::peer(ip("::ffff:192.0.2.7")), ClientKey::Peer(ip("192.0.2.7")));
        assert_eq!(ClientKey::peer(ip("192.0.2.7")), ClientKey::Peer(ip("192.0.2.7")));
    }

    #[test]
    fn a_wait_is_rounded_up_to_whole_seconds() {
        assert_eq!(wait_seconds(Duration::from_millis(1900)), 2);
        assert_eq!(wait_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(wait_seconds(Duration::from_millis(2000)), 2);
        assert_eq!(wait_seconds(Duration::from_millis(10)), 1);
    }

    #[test]
    fn throttle_blocks_after_five_failures_and_resets_on_success() {
        let throttle = Throttle::default();
        let ip = peer(1);
        for _ in 0..5 {
            assert!(throttle.wait_for(ip).is_none());
            throttle.record_failure(ip);
        }
        assert!(throttle.wait_for(ip).is_some());
        assert!(throttle.wait_for(peer(2)).is_none());
        assert!(throttle.wait_for(ClientKey::Device(1)).is_none(), "a device has its own count");
        throttle.record_success(ip);
        assert!(throttle.wait_for(ip).is_none());
    }

    #[test]
    fn a_count_survives_a_generation_change_and_goes_after_two_quiet_windows() {
        let throttle = Throttle::default();
        let start = Instant::now();
        for _ in 0..6 {
            throttle.record_failure_at(peer(1), start);
        }
        // A failure from someone else one window later rotates the map: the count is in
        // the previous generation and still found.
        throttle.record_failure_at(peer(2), start + THROTTLE_WINDOW);
        assert_eq!(throttle.map().get(&peer(1)).map(|f| f.count), Some(6));
        // Touched again: back in the current generation, counting on.
        assert_eq!(throttle.record_failure_at(peer(1), start + THROTTLE_WINDOW), 7);
        // Two quiet windows later it is gone.
        throttle.record_failure_at(peer(3), start + 2 * THROTTLE_WINDOW);
        throttle.record_failure_at(peer(3), start + 3 * THROTTLE_WINDOW);
        assert!(throttle.map().get(&peer(1)).is_none());
    }

    #[test]
    fn session_tokens_round_trip_and_old_cookies_are_told_apart() {
        let token = SessionToken::new(SessionId::random(), 1_700_000_000_123);
        assert_eq!(SessionToken::decode(&token.encode()), Ok(token.clone()));
        assert_eq!(SessionToken::decode(token.session.as_str()), Err(SessionRefused::OldFormat));
        for bad in ["", "2", "2..1", "3.00000000000000000000000000000000.1", "2.zz.1", &format!("{}.x", token.encode())]
        {
            assert_eq!(SessionToken::decode(bad), Err(SessionRefused::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn sessions_expire_and_revoked_ones_stay_refused_until_they_would_have_expired() {
        let sessions = Sessions::default();
        let now = now_ms();
        let token = SessionToken::new(SessionId::random(), now - 1000);
        assert_eq!(sessions.check(&token, 8 * HOUR, now), Ok(()));
        let old = SessionToken::new(SessionId::random(), now - 9 * 3_600_000);
        assert_eq!(sessions.check(&old, 8 * HOUR, now), Err(SessionRefused::Expired));
        let future = SessionToken::new(SessionId::random(), now + 3_600_000);
        assert_eq!(sessions.check(&future, 8 * HOUR, now), Err(SessionRefused::FromTheFuture));
        sessions.revoke(&token, 8 * HOUR, now);
        assert_eq!(sessions.check(&token, 8 * HOUR, now), Err(SessionRefused::Revoked));
        // Once the cookie would have expired, the entry goes at the next revocation.
        let later = now + 8 * 3_600_000;
        sessions.revoke(&SessionToken::new(SessionId::random(), later), 8 * HOUR, later);
        assert_eq!(sessions.revoked_count(), 1);
    }

    #[test]
    fn the_revocation_list_is_bounded_and_fails_closed_when_full() {
        let sessions = Sessions::default();
        let now = now_ms();
        let first = SessionToken::new(SessionId::random(), now - 5);
        sessions.revoke(&first, 8 * HOUR, now);
        for _ in 0..REVOKED_CAPACITY + 10 {
            sessions.revoke(&SessionToken::new(SessionId::random(), now - 5), 8 * HOUR, now);
            assert!(sessions.revoked_count() <= REVOKED_CAPACITY);
        }
        assert_eq!(sessions.check(&first, 8 * HOUR, now), Err(SessionRefused::Revoked), "never forgotten");
        let unrelated = SessionToken::new(SessionId::random(), now - 5);
        assert_eq!(sessions.check(&unrelated, 8 * HOUR, now), Err(SessionRefused::Revoked), "fails closed");
        let after = SessionToken::new(SessionId::random(), now + 1);
        assert_eq!(sessions.check(&after, 8 * HOUR, now + 2), Ok(()), "new logins work");
    }

    #[test]
    fn device_tokens_round_trip_and_are_tied_to_the_password() {
        let token = DeviceToken { id: 42, issued_ms: 7, tag: password_tag("a") };
        let back = DeviceToken::decode(&token.encode()).expect("decodes");
        assert_eq!((back.id, back.issued_ms, back.tag), (42, 7, password_tag("a")));
        assert_ne!(password_tag("a"), password_tag("b"));
        assert!(DeviceToken::decode("d1.zz.1.2").is_none());
    }

    #[test]
    fn password_comparison() {
        assert!(password_matches("secret", "secret"));
        assert!(!password_matches("secre", "secret"));
        assert!(!password_matches("", "secret"));
    }
}
