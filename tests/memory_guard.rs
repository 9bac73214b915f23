//! The memory guard, alone in its own process so the RSS it measures is stable:
//! a budget too small for MobileSAM falls back to U²-Net-p and /health says why;
//! a budget too small for anything answers 503 with the reason.

mod common;

use common::*;
use rocket::http::Status;

#[test]
fn a_tight_budget_skips_sam_for_u2netp_and_a_tiny_one_refuses_all() {
    let models = format!("{},{}", mobile_sam(), u2netp());
    let rss_mb = drishya::sysmem::process_rss().0 / (1024 * 1024);
    // Room for U²-Net-p's estimate, not for MobileSAM's.
    let sam_need = drishya::models::estimate_need_mb(true, 44 * 1024 * 1024);
    let u2_need = drishya::models::estimate_need_mb(false, 5 * 1024 * 1024);
    assert!(u2_need + 40 < sam_need);
    let budget = (rss_mb + u2_need + 20 + 40).to_string();
    let fits = app(&[("models", models.as_str()), ("memory_budget_mb", budget.as_str())]);
    login(&fits.client);
    assert_eq!(upload(&fits.client, "coffee.png", &read(&shared("images/coffee.png"))).status(), Status::Ok);
    let mask = json_of(generate_mask(&fits.client, [165, 10, 415, 300]));
    assert_eq!(mask["model"], "u2netp", "{mask}");
    let health = json_of(fits.client.get("/health").dispatch());
    let reason = health["model"]["skipped"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("mobile_sam") && reason.contains("MEMORY_BUDGET_MB"), "{reason}");
    drop(fits);

    let tiny = app(&[("models", models.as_str()), ("memory_budget_mb", "1"), ("box_fallback", "false")]);
    login(&tiny.client);
    assert_eq!(upload(&tiny.client, "coffee.png", &read(&shared("images/coffee.png"))).status(), Status::Ok);
    let msg = expect_error(generate_mask(&tiny.client, [165, 10, 415, 300]), Status::ServiceUnavailable);
    assert!(msg.contains("needs about") && msg.contains("u2netp"), "{msg}");
}
