//! The bare environment variables reach the right keys (alone in its process: it sets
//! environment variables).

#[test]
fn bare_environment_variables_are_merged_into_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let artefacts = dir.path().join("artefacts");
    std::env::set_var("TEMP_DIR", &artefacts);
    std::env::set_var("PORT", "18123");
    std::env::set_var("MAX_IMAGE_WIDTH", "1024");
    std::env::set_var("MAX_UPLOAD_MB", "20");
    let figment = drishya::config::figment();
    let cfg: drishya::config::AppConfig = figment.extract().unwrap();
    assert_eq!(cfg.artefact_dir.as_deref(), Some(artefacts.as_path()), "TEMP_DIR is the artefact dir");
    assert_eq!(cfg.resolved_temp_dir(), artefacts);
    assert_eq!(cfg.max_image_width, 1024);
    let rocket: rocket::Config = figment.extract().unwrap();
    assert_eq!(rocket.port, 18123, "bare PORT is honoured");
    assert_ne!(rocket.temp_dir.relative(), artefacts, "uploads in flight stay in the OS temp dir");
    assert_eq!(rocket.limits.get("file").map(|l| l.as_u64()), Some(20 * 1024 * 1024));
}
