//! Tells the chaos suite (`tests/chaos`) whether it can run here: it needs root and nftables
//! (network namespaces, packet loss). Without them its tests are reported as ignored, with the
//! reason, never as passed. Under CI (`CI=true`) they always run, so a CI machine that lacks
//! either fails instead of skipping.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(chaos_capable)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CI");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci || (is_root() && has_nft()) {
        println!("cargo::rustc-cfg=chaos_capable");
    }
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok()) == Some(0)
}

fn has_nft() -> bool {
    std::process::Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
}
