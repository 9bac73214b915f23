use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    // A Flask deployment keeps its settings in `.env`; the environment still wins. First,
    // while this is the only thread (it sets environment variables).
    if let Err(error) = drishya::config::load_env_file(Path::new(".env")) {
        eprintln!("drishya: {error}");
        return ExitCode::FAILURE;
    }
    // `drishya healthcheck [--ready]`: for container health checks (the image has no curl).
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("healthcheck") {
        return drishya::web::healthcheck(args.next().as_deref() == Some("--ready"));
    }
    // A bad setting is one line naming the variable, before anything listens.
    let figment = drishya::config::figment();
    // Drishya's logger goes in before Rocket's (the first logger set wins): Rocket's own
    // prints every request's whole URI, query string and all (see `web::install_logger`).
    let level = figment.extract_inner("log_level").unwrap_or(rocket::config::LogLevel::Normal);
    drishya::web::install_logger(level);
    if let Err(error) = drishya::config::checked(&figment) {
        eprintln!("drishya: {error}");
        return ExitCode::FAILURE;
    }
    // The public port belongs to the front door; Rocket listens on loopback behind it.
    let front = match drishya::front::Front::bind(&figment) {
        Ok(front) => front,
        Err(error) => {
            eprintln!("drishya: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Before the runtime starts any thread.
    drishya_alloc::tune_allocator();
    let rocket = drishya::build(drishya::front::Front::inner(figment)).attach(front.stage());
    match rocket::execute(rocket.launch()) {
        Ok(_) => ExitCode::SUCCESS,
        // The configuration stage has already said which variable and why, in one line.
        Err(error) if matches!(error.kind(), rocket::error::ErrorKind::FailedFairings(_)) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("drishya: {error}");
            ExitCode::FAILURE
        }
    }
}
