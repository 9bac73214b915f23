//! The front door (src/front) on real sockets: the binary started as deployments start it,
//! and clients that misbehave in time: half-sent heads, idle connections, stalled upload
//! bodies, too many connections, spoofed address headers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::process::*;
use common::{multipart, read, shared, Part};

const PASSWORD: &str = "front-door-password";
const KEY: &str = "a SECRET_KEY for the front door tests, long enough";

fn server(dir: &Path, extra: &[(&'static str, &str)]) -> Server {
    let port = free_port();
    let mut env = vec![
        ("PORT", port.to_string()),
        ("APP_PASSWORD", PASSWORD.to_string()),
        ("SECRET_KEY", KEY.to_string()),
        ("MODELS", "models/u2netp.onnx".to_string()),
        ("TEMP_DIR", dir.join("artefacts").display().to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let mut server = start(dir, &env, port);
    health_within(&mut server, Duration::from_secs(10)).expect("the server answers /health");
    server
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    stream.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    stream
}

/// Everything the server sends until it closes (or the read timeout), and when it closed.
fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    (String::from_utf8_lossy(&raw).into_owned(), started.elapsed())
}

#[test]
fn a_half_sent_head_is_answered_408_and_closed_and_an_idle_connection_is_closed() {
    let dir = app_dir();
    let server = server(dir.path(), &[]);
    let mut half = connect(server.port);
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
    // An idle keep-alive connection after one answer.
    let mut idle = connect(server.port);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let (_, idle_for) = read_until_closed(&mut idle);
    assert!(idle_for >= Duration::from_secs(4) && idle_for < Duration::from_secs(8), "idle closed after {idle_for:?}");

    let (answer, took) = read_until_closed(&mut half);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
    // Meanwhile everyone else was served.
    assert_eq!(get(server.port, "/health", None).map(|r| r.status), Some(200));
}

#[test]
fn four_stalled_upload_bodies_do_not_stop_a_fifth_users_upload() {
    let dir = app_dir();
    let server = server(dir.path(), &[]);
    let scene = read(&shared("images/coffee.png"));
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "coffee.png", content_type: "image/png", bytes: &scene }]);
    let ct = ct.to_string();
    // Four users send their upload's head and 14 bytes of body, then nothing: in Rocket
    // each holds one of the four upload slots while its body is read.
    let stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            let cookie = login_at(server.port, PASSWORD);
            let mut stream = connect(server.port);
            let head = format!(
                "POST /upload_image HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&body[..14]).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let cookie = login_at(server.port, PASSWORD);
    let reply = request(server.port, "POST", "/upload_image", &[("Content-Type", &ct), ("Cookie", &cookie)], &body)
        .expect("the fifth upload is answered");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(started.elapsed() < Duration::from_secs(25), "it waited {:?}", started.elapsed());
    for mut stream in stalled {
        let (answer, _) = read_until_closed(&mut stream);
        assert!(answer.starts_with("HTTP/1.1 408"), "a stalled body is told why: {answer}");
    }
}

#[test]
fn an_upload_answered_before_its_body_is_read_gets_that_answer_not_a_reset() {
    let dir = app_dir();
    let server = server(dir.path(), &[]);
    // No session: Rocket answers 401 without reading the body. 24 MB is more than the
    // sockets between client, front and Rocket buffer, so the client is still sending then.
    let bytes = vec![0u8; 24 << 20];
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "big.png", content_type: "image/png", bytes: &bytes }]);
    let ct = ct.to_string();
    let started = Instant::now();
    let reply = request(server.port, "POST", "/upload_image", &[("Content-Type", &ct)], &body)
        .expect("the whole body is sent and the answer read (no broken pipe, no reset)");
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert!(started.elapsed() < Duration::from_secs(10), "answered after {:?}", started.elapsed());
    // The front is still serving.
    assert_eq!(get(server.port, "/health", None).map(|r| r.status), Some(200));
}

#[test]
fn an_upload_turned_away_at_the_door_gets_its_503_not_a_reset() {
    let dir = app_dir();
    let server = server(dir.path(), &[("MAX_CONNECTIONS", "32")]);
    // This address holds its share (a quarter of 32), so the next connection is refused
    // as it is accepted, while its client still has most of 24 MB to send.
    let busy = slow_bodies(server.port, 8);
    let bytes = vec![0u8; 24 << 20];
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "big.png", content_type: "image/png", bytes: &bytes }]);
    let ct = ct.to_string();
    let reply = request(server.port, "POST", "/upload_image", &[("Content-Type", &ct)], &body)
        .expect("the whole body is sent and the refusal read (no broken pipe, no reset)");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.head.contains("Retry-After: 5"), "{}", reply.head);
    drop(busy);
}

#[test]
fn at_max_connections_idle_ones_make_room_and_only_busy_ones_turn_a_new_one_away() {
    let dir = app_dir();
    // Behind a proxy (every connection from one address, no share per address).
    let server = server(dir.path(), &[("MAX_CONNECTIONS", "16"), ("PROXY_IP_HEADER", "X-Real-IP")]);
    // Sixteen connections that say nothing hold every place ...
    let mut silent: Vec<TcpStream> = (0..16).map(|_| connect(server.port)).collect();
    std::thread::sleep(Duration::from_millis(300));
    // ... and a new client is served at once: the one that waited longest gives way. (A
    // newcomer that comes before the front has counted them as waiting is told to come
    // back: on two loaded cores that can take a while, so it asks again.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let started = Instant::now();
        let status = get(server.port, "/health", None).map(|r| r.status);
        assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());
        if status == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a newcomer is served while only idle connections hold the places ({status:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // One of them (the first to start waiting) was closed without a word.
    let closed = silent
        .iter_mut()
        .map(|stream| {
            stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            matches!(stream.read(&mut [0u8; 64]), Ok(0))
        })
        .filter(|&eof| eof)
        .count();
    assert_eq!(closed, 1, "exactly one silent connection made room");
    drop(silent);
    std::thread::sleep(Duration::from_millis(300));

    // Sixteen in the middle of a request (a body arriving slowly) are never cut for a
    // newcomer: it is told to come back.
    let busy = slow_bodies(server.port, 16);
    std::thread::sleep(Duration::from_millis(300));
    turned_away_then_served(server.port, busy);
}

/// Connections in the middle of a request whose body comes slowly.
fn slow_bodies(port: u16, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut stream = connect(port);
            stream
                .write_all(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\npassword=")
                .unwrap();
            stream
        })
        .collect()
}

#[test]
fn one_directly_connected_address_holds_at_most_a_quarter_of_the_places() {
    let dir = app_dir();
    let server = server(dir.path(), &[("MAX_CONNECTIONS", "32")]);
    let busy = slow_bodies(server.port, 8);
    std::thread::sleep(Duration::from_millis(300));
    turned_away_then_served(server.port, busy);
}

/// A new connection is refused at once (503, Retry-After) while `busy` hold their places,
/// and served once they are gone. The front counts a connection as busy only once it has
/// read its head, which on two loaded cores can take a while: the newcomer asks again
/// until it is refused (or gives up after ten seconds).
fn turned_away_then_served(port: u16, busy: Vec<TcpStream>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut extra = connect(port);
        let _ = extra.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (answer, took) = read_until_closed(&mut extra);
        if answer.starts_with("HTTP/1.1 503") {
            assert!(answer.contains("Retry-After: 5"), "{answer}");
            assert!(took < Duration::from_secs(3), "refused at once, not after {took:?}");
            break;
        }
        assert!(Instant::now() < deadline, "a newcomer is never turned away while the places are busy: {answer}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(busy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(port, "/health", None).map(|r| r.status) != Some(200) {
        assert!(Instant::now() < deadline, "served again once the busy connections are gone");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `count` wrong passwords, each with its own spoofed address headers; the statuses.
fn wrong_logins(port: u16, count: usize) -> Vec<u16> {
    (0..count)
        .map(|i| {
            let ip = format!("10.0.{}.{}", i / 250, i % 250 + 1);
            let headers = [
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("X-Real-IP", ip.as_str()),
                ("X-Forwarded-For", ip.as_str()),
                ("X-Drishya-Peer", ip.as_str()),
            ];
            request(port, "POST", "/login", &headers, b"password=wrong").expect("answered").status
        })
        .collect()
}

#[test]
fn spoofed_address_headers_do_not_escape_the_login_throttle_unless_a_proxy_is_trusted() {
    let dir = app_dir();
    let direct = server(dir.path(), &[]);
    let statuses = wrong_logins(direct.port, 12);
    assert!(statuses.contains(&429), "a new X-Real-IP per attempt must not escape the throttle: {statuses:?}");

    // Behind a proxy that sets X-Real-IP, each address is its own client.
    let dir = app_dir();
    let proxied = server(dir.path(), &[("PROXY_IP_HEADER", "X-Real-IP")]);
    let statuses = wrong_logins(proxied.port, 12);
    assert!(statuses.iter().all(|&s| s == 401), "{statuses:?}");
}

#[test]
fn requests_whose_length_is_ambiguous_are_refused_before_rocket_sees_them() {
    let dir = app_dir();
    let server = server(dir.path(), &[]);
    let mut stream = connect(server.port);
    stream
        .write_all(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .unwrap();
    let (answer, _) = read_until_closed(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A chunked body and a second request on the same connection both arrive whole.
    let mut stream = connect(server.port);
    stream
        .write_all(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\npassw\r\n9\r\nord=wrong\r\n0\r\n\r\n\
              GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let (answers, _) = read_until_closed(&mut stream);
    assert!(answers.starts_with("HTTP/1.1 401"), "the chunked login was read whole: {answers}");
    assert!(answers.contains("HTTP/1.1 200"), "and the second request answered: {answers}");
}
