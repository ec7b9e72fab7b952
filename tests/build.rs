//! Tells the browser tests (`dashboard.rs`) whether a headless browser is here: they load the
//! relay's dashboard in Debian's `chromium`. Without one they are reported as ignored, with the
//! reason, never as passed. Under CI (`CI=true`) they always run, so a CI machine without
//! chromium fails instead of skipping.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(browser_capable)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=QUICTUN_CHROMIUM");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci || browser().is_some() {
        println!("cargo::rustc-cfg=browser_capable");
    }
}

/// The first headless-capable browser found (the tests look the same way).
fn browser() -> Option<String> {
    let named = std::env::var("QUICTUN_CHROMIUM").ok();
    named
        .into_iter()
        .chain(["chromium", "chromium-browser", "google-chrome"].map(String::from))
        .find(|b| std::process::Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
}
