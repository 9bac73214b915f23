//! Login, logout, the session guard and the login throttle.
//!
//! The session id lives in Rocket's private (encrypted, authenticated) cookie,
//! HttpOnly and SameSite=Strict, so other sites cannot ride on it (CSRF). The password
//! is compared in constant time; repeated failures from one client back off
//! exponentially.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocket::form::Form;
use rocket::http::{Cookie, CookieJar, SameSite, Status};
use rocket::request::{FromRequest, Outcome, Request};
use rocket::response::Redirect;
use rocket::{Route, State};
use rocket_dyn_templates::{context, Template};
use subtle::ConstantTimeEq;

use crate::config::AppConfig;
use crate::storage::{Artefacts, SessionId};
use crate::web::AssetVersion;

pub const SESSION_COOKIE: &str = "drishya_session";

/// Failures allowed before the back-off starts.
const FREE_ATTEMPTS: u32 = 5;
const MAX_LOCKOUT: Duration = Duration::from_secs(300);
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// A logged-in browser session. Routes that take a `User` answer 401 without one.
pub struct User {
    pub session: SessionId,
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
        if request.method() != rocket::http::Method::Get && is_cross_origin(request) {
            return Outcome::Error((Status::Forbidden, ()));
        }
        let session = request.cookies().get_private(SESSION_COOKIE).and_then(|cookie| SessionId::parse(cookie.value()));
        match session {
            Some(session) => Outcome::Success(User { session }),
            None => Outcome::Error((Status::Unauthorized, ())),
        }
    }
}

#[derive(Default)]
struct Failures {
    count: u32,
    last: Option<Instant>,
}

/// Per-client login failure counts with exponential back-off.
#[derive(Default)]
pub struct Throttle {
    clients: Mutex<HashMap<IpAddr, Failures>>,
}

impl Throttle {
    /// How long this client must still wait, if at all.
    pub fn wait_for(&self, client: IpAddr) -> Option<Duration> {
        let clients = self.clients.lock().ok()?;
        let failures = clients.get(&client)?;
        let lockout = lockout_for(failures.count)?;
        let elapsed = failures.last?.elapsed();
        (elapsed < lockout).then(|| lockout - elapsed)
    }

    pub fn record_failure(&self, client: IpAddr) {
        if let Ok(mut clients) = self.clients.lock() {
            if clients.len() >= MAX_TRACKED_CLIENTS {
                clients.retain(|_, f| f.last.is_some_and(|t| t.elapsed() < MAX_LOCKOUT));
            }
            let entry = clients.entry(client).or_default();
            entry.count = entry.count.saturating_add(1);
            entry.last = Some(Instant::now());
        }
    }

    pub fn record_success(&self, client: IpAddr) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(&client);
        }
    }
}

/// 1 s after the fifth failure, doubling, capped at five minutes.
fn lockout_for(failures: u32) -> Option<Duration> {
    let over = failures.checked_sub(FREE_ATTEMPTS)?;
    let seconds = 1u64.checked_shl(over.min(16)).unwrap_or(u64::MAX);
    Some(Duration::from_secs(seconds).min(MAX_LOCKOUT))
}

pub fn password_matches(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[derive(FromForm)]
struct LoginForm<'r> {
    password: &'r str,
}

#[derive(Responder)]
enum LoginAnswer {
    Redirect(Redirect),
    Page((Status, Template)),
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

#[post("/login", data = "<form>")]
fn login(
    _origin: SameOrigin,
    form: Option<Form<LoginForm<'_>>>,
    jar: &CookieJar<'_>,
    cfg: &State<AppConfig>,
    throttle: &State<Arc<Throttle>>,
    assets: &State<AssetVersion>,
    client: Option<IpAddr>,
) -> LoginAnswer {
    let client = client.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    if let Some(wait) = throttle.wait_for(client) {
        let message = format!("Too many failed attempts: try again in {} s.", wait.as_secs().max(1));
        return login_page(cfg, assets, Status::TooManyRequests, Some(message));
    }
    let given = form.as_ref().map(|f| f.password).unwrap_or("");
    if !password_matches(given, cfg.password()) {
        throttle.record_failure(client);
        return login_page(cfg, assets, Status::Unauthorized, Some("Incorrect password.".into()));
    }
    throttle.record_success(client);
    let session = SessionId::random();
    let cookie = Cookie::build((SESSION_COOKIE, session.as_str().to_string()))
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/");
    jar.add_private(cookie);
    LoginAnswer::Redirect(Redirect::to("/"))
}

#[get("/logout")]
async fn logout(
    _origin: SameOrigin,
    user: Option<User>,
    jar: &CookieJar<'_>,
    store: &State<Arc<Artefacts>>,
) -> Redirect {
    if let Some(user) = user {
        // A shared store is a network call: off the async workers.
        let store = store.inner().clone();
        let _ = rocket::tokio::task::spawn_blocking(move || store.remove_session(&user.session)).await;
    }
    jar.remove_private(Cookie::build(SESSION_COOKIE).path("/"));
    Redirect::to("/")
}

#[get("/")]
fn index(user: Option<User>, cfg: &State<AppConfig>, assets: &State<AssetVersion>) -> Template {
    if user.is_none() {
        return login_template(cfg, assets, None);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockout_grows_and_is_capped() {
        assert_eq!(lockout_for(4), None);
        assert_eq!(lockout_for(5), Some(Duration::from_secs(1)));
        assert_eq!(lockout_for(7), Some(Duration::from_secs(4)));
        assert_eq!(lockout_for(100), Some(MAX_LOCKOUT));
    }

    #[test]
    fn throttle_blocks_after_five_failures_and_resets_on_success() {
        let throttle = Throttle::default();
        let ip = IpAddr::from([10, 0, 0, 1]);
        for _ in 0..5 {
            assert!(throttle.wait_for(ip).is_none());
            throttle.record_failure(ip);
        }
        assert!(throttle.wait_for(ip).is_some());
        assert!(throttle.wait_for(IpAddr::from([10, 0, 0, 2])).is_none());
        throttle.record_success(ip);
        assert!(throttle.wait_for(ip).is_none());
    }

    #[test]
    fn password_comparison() {
        assert!(password_matches("secret", "secret"));
        assert!(!password_matches("secre", "secret"));
        assert!(!password_matches("", "secret"));
    }
}
