use std::process::ExitCode;

#[rocket::main]
async fn main() -> ExitCode {
    // `drishya healthcheck`: for Docker's HEALTHCHECK (the image has no curl).
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return drishya::web::healthcheck();
    }
    match drishya::rocket().launch().await {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("drishya: {error}");
            ExitCode::FAILURE
        }
    }
}
