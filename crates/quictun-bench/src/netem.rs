//! Packet loss with nftables (this kernel has no `tc netem`): `numgen random mod 100 < N drop` on
//! the **input** hook (on the output hook a UDP sender sees EPERM instead of a silent loss),
//! matched on the tunnel's own port in both directions. Needs root and the `nft` command.

use std::process::Command;

const TABLE: &str = "quictun_bench";

/// Whether loss can be applied here; the reason when not.
pub fn available() -> Result<(), String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok()));
    if uid != Some(0) {
        return Err("needs root (nftables): skipped".into());
    }
    match Command::new("nft").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err("needs the nft command (apt-get install nftables): skipped".into()),
    }
}

/// Random loss in force until dropped.
#[derive(Debug)]
pub struct Loss;

impl Loss {
    /// Drops `percent`% of packets to and from the `udp` and `tcp` ports.
    pub fn apply(percent: u32, udp: &[u16], tcp: &[u16]) -> anyhow::Result<Self> {
        let _stale = Command::new("nft").args(["delete", "table", "inet", TABLE]).output();
        let mut rules = String::new();
        let ports = udp.iter().map(|p| ("udp", p)).chain(tcp.iter().map(|p| ("tcp", p)));
        for (proto, port) in ports {
            for dir in ["dport", "sport"] {
                rules.push_str(&format!("    {proto} {dir} {port} numgen random mod 100 < {percent} drop\n"));
            }
        }
        let script = format!(
            "table inet {TABLE} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        let mut child = Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin.write_all(script.as_bytes())?;
        }
        anyhow::ensure!(child.wait()?.success(), "nft refused the loss rules");
        Ok(Self)
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        let _gone = Command::new("nft").args(["delete", "table", "inet", TABLE]).output();
    }
}
