use std::process::ExitCode;

fn main() -> ExitCode {
    // `drishya healthcheck`: for Docker's HEALTHCHECK (the image has no curl).
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return drishya::web::healthcheck();
    }
    // Before the runtime starts any thread.
    drishya::sysmem::tune_allocator();
    match rocket::execute(drishya::rocket().launch()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("drishya: {error}");
            ExitCode::FAILURE
        }
    }
}
