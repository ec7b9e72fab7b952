//! Tells the chaos suite (`tests/chaos`) whether it can run here: it needs root and nftables
//! (network namespaces, packet loss); and the cluster tests (`tests/cluster.rs`) whether `etcd`
//! is installed. Without them those tests are reported as ignored, with the reason, never as
//! passed. Under CI (`CI=true`) they always run, so a CI machine that lacks any fails instead of
//! skipping.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(chaos_capable)");
    println!("cargo::rustc-check-cfg=cfg(etcd_capable)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CI");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci || (is_root() && has_nft()) {
        println!("cargo::rustc-cfg=chaos_capable");
    }
    if ci || runs("etcd") {
        println!("cargo::rustc-cfg=etcd_capable");
    }
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok()) == Some(0)
}

fn has_nft() -> bool {
    runs("nft")
}

fn runs(tool: &str) -> bool {
    std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}
