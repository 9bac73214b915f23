//! What the release binary writes to its log: one line per request (method, path, status),
//! never a query string (a `POST /login?password=...` must not put the password there).
//! The binary itself, on a real socket, with its output captured.

mod common;

use common::process::*;

#[test]
fn the_log_has_one_line_per_request_and_no_query_strings() {
    let dir = app_dir();
    let port = free_port();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let env = vec![
        ("PORT", port.to_string()),
        ("APP_PASSWORD", "the-password-of-the-log-test".to_string()),
        ("SECRET_KEY", "a key of at least thirty-two characters for the log test".to_string()),
        ("TEMP_DIR", dir.path().join("artefacts").display().to_string()),
        ("MODELS", "models/u2netp.onnx".to_string()),
    ];
    let server = start_logged(dir.path(), &env, port, log.try_clone().unwrap(), log);

    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let login = request(port, "POST", "/login?password=query-secret-one", &form, b"password=wrong").unwrap();
    assert_eq!(login.status, 401);
    assert_eq!(get(port, "/no/such/page?token=query-secret-two", None).unwrap().status, 404);
    assert_eq!(get(port, "/health?probe=query-secret-three", None).unwrap().status, 200);
    let expected = ["POST /login 401", "GET /no/such/page 404", "GET /health 200"];
    let text = log_holding(&log_path, &expected);
    drop(server);

    assert!(!text.contains("query-secret"), "a query string reached the log:\n{text}");
    assert!(!text.contains("the-password-of-the-log-test"), "the password reached the log:\n{text}");
    for line in expected {
        assert!(text.lines().any(|l| l.starts_with(line)), "no `{line} ...` line:\n{text}");
    }
}
