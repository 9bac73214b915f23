//! The front door: Drishya's own accept loop on the public port, in front of Rocket (which
//! listens on loopback only). Rocket 0.5 gives its HTTP server no header-read timeout, no
//! idle keep-alive limit, no body-rate limit and no connection cap, and takes no custom
//! listener; so the limits live here, in-process, rather than in a proxy every operator
//! would have to run.
//!
//! Each request reaches Rocket with two headers that only the front sets (a client's own
//! copies are removed): [`PEER_HEADER`], the client's address by the trust rule
//! (`PROXY_IP_HEADER`), which Rocket reads as `client_ip()` (its `ip_header`), and
//! [`PROTO_HEADER`], `https` when the client reached a trusted TLS proxy.

use rocket::Request;

/// The client's address as the front determined it.
pub const PEER_HEADER: &str = "X-Drishya-Peer";
/// `https` or `http`: the scheme the client used, as far as the front may believe it.
pub const PROTO_HEADER: &str = "X-Drishya-Proto";

/// Whether the client reached us over TLS: `PUBLIC_ORIGIN` is https, or the front
/// believed a trusted proxy's `X-Forwarded-Proto: https`.
pub fn is_https(request: &Request<'_>) -> bool {
    request.headers().get_one(PROTO_HEADER).is_some_and(|p| p.eq_ignore_ascii_case("https"))
}
