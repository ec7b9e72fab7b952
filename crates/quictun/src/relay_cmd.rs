//! `quictun relay`.

use std::path::Path;

use anyhow::anyhow;
use quictun_agent::DEFAULT_GRPC_PORT;
use quictun_core::tls::{CertKey, GeneratedCert};
use quictun_relay::{Relay, RelayConfig};

use crate::Failure;
use crate::cli::RelayArgs;

/// Loads the configuration (file, then flags), and validates it.
fn load_config(args: &RelayArgs) -> Result<RelayConfig, Failure> {
    let (mut config, origin) = match &args.config {
        Some(path) => (RelayConfig::load(path).map_err(Failure::usage)?, path.clone()),
        None => (RelayConfig::parse("", Path::new("<defaults>")).map_err(Failure::usage)?, "<command line>".into()),
    };
    let r = &mut config.relay;
    if let Some(addr) = args.quic_listen {
        r.quic_listen = addr;
    }
    if let Some(addr) = args.http_listen {
        r.http_listen = addr;
    }
    if let Some(addr) = args.https_listen {
        r.https_listen = Some(addr);
    }
    if let Some(addr) = args.admin_listen {
        r.admin_listen = addr;
    }
    if let Some(addr) = args.grpc_listen {
        r.grpc_listen = addr;
    }
    if let Some(transport) = args.transport {
        r.transport = transport;
    }
    if let Some(cert) = &args.cert {
        r.cert = cert.clone();
        r.identity_named = true;
    }
    if let Some(key) = &args.key {
        r.key = key.clone();
        r.identity_named = true;
    }
    config.validate(&origin).map_err(Failure::usage)?;
    Ok(config)
}

/// The machine's host name (what a generated certificate names besides localhost).
/// The name agents reach the relay by when `public_name` is not set: the QUIC listen address
/// when it is a loopback one (a host name would resolve elsewhere), else the machine's name.
fn default_public_name(config: &RelayConfig) -> String {
    let listen = config.relay.quic_listen.ip();
    if listen.is_loopback() { listen.to_string() } else { host_name() }
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The command that connects an agent to this relay, ready to paste on the agent's host: the
/// relay's public name, its ports (the gRPC one only when it is not the agent's default), the pin,
/// and the token through `QUICTUN_TOKEN`, which keeps it out of `ps` and shell history.
fn agent_command(
    public_name: &str,
    quic: Option<std::net::SocketAddr>,
    grpc: Option<std::net::SocketAddr>,
    pin: &str,
    client: &str,
) -> String {
    let host = if public_name.contains(':') { format!("[{public_name}]") } else { public_name.to_owned() };
    // A relay serving gRPC only is named by its gRPC port, and the agent told to use gRPC.
    let relay_port = quic.or(grpc).map_or(4433, |addr| addr.port());
    let mut command = format!(
        "QUICTUN_TOKEN=<{client}'s token> quictun agent --relay {host}:{relay_port} --pin {pin} --client-id {client}"
    );
    if quic.is_none() {
        command.push_str(" --transport grpc");
    }
    if let Some(grpc) = grpc.filter(|g| quic.is_none() || g.port() != DEFAULT_GRPC_PORT) {
        command.push_str(&format!(" --grpc-relay {host}:{}", grpc.port()));
    }
    command
}

/// Loads the certificate, or, when neither file exists and the configuration did not name
/// them, generates and writes a new identity (and says so, with its pin).
fn load_or_generate_cert(config: &RelayConfig) -> Result<(CertKey, bool), Failure> {
    let (cert, key) = (&config.relay.cert, &config.relay.key);
    match (cert.exists(), key.exists()) {
        (true, true) => Ok((CertKey::load(cert, key).map_err(Failure::usage)?, false)),
        (false, false) if config.relay.identity_named => Err(Failure::usage(anyhow!(
            "the relay's certificate {} and key {} do not exist (generate them with `quictun cert gen --out {}`, \
             or remove `cert` and `key` from the configuration to have them generated)",
            cert.display(),
            key.display(),
            cert.parent().map_or_else(|| ".".into(), |d| d.display().to_string())
        ))),
        (false, false) => {
            let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
            if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
                let host = host.trim();
                if !host.is_empty() && host != "localhost" {
                    sans.push(host.to_owned());
                }
            }
            let generated = GeneratedCert::self_signed(&sans).map_err(Failure::runtime)?;
            generated.write(cert, key).map_err(Failure::runtime)?;
            let cert_key = generated.cert_key().map_err(Failure::runtime)?;
            let pin = cert_key.pin().map(|p| p.to_string()).unwrap_or_default();
            tracing::warn!(
                cert = %cert.display(),
                key = %key.display(),
                %pin,
                "no certificate yet: generated a new relay identity; agents pinned to another one will refuse it"
            );
            Ok((cert_key, true))
        }
        (true, false) => {
            Err(Failure::usage(anyhow!("{} exists but the key {} is missing", cert.display(), key.display())))
        }
        (false, true) => {
            Err(Failure::usage(anyhow!("{} exists but the certificate {} is missing", key.display(), cert.display())))
        }
    }
}

/// Runs the relay until Ctrl-C or SIGTERM, then drains.
pub async fn run(args: RelayArgs) -> Result<(), Failure> {
    let config = load_config(&args)?;
    // Everything the file names is checked (tokens read, routes resolved) before anything is
    // written: a broken file leaves no new identity behind.
    quictun_relay::check_config(&config).map_err(Failure::usage)?;
    let (cert, generated) = load_or_generate_cert(&config)?;
    let first_client = config.clients.first().map(|c| c.id.clone());
    let tunnels: Vec<String> = config.tcp.iter().map(|t| format!("{} (group {})", t.upstream, t.group)).collect();
    let udp_tunnels: Vec<String> = config.udp.iter().map(|t| format!("{} (group {})", t.upstream, t.group)).collect();
    let allowances = declarable(&config);
    let public_name = config.relay.public_name.clone().unwrap_or_else(|| default_public_name(&config));
    let cert_path = config.relay.cert.clone();
    let relay = Relay::start(config, cert).await.map_err(|err| match err {
        quictun_relay::RelayError::Config(_) => Failure::usage(err),
        other => Failure::runtime(other),
    })?;
    let pin = relay.pin().map(|p| p.to_string()).unwrap_or_default();
    // Caught from here on: a stop or a reload signal right after the banner is not fatal.
    let (shutdown, hangups) = (crate::signal::shutdown(), crate::signal::hangups());
    println!("quictun relay");
    if let Some(quic) = relay.quic_addr() {
        println!("  QUIC (agents)  udp://{quic}");
    }
    if let Some(grpc) = relay.grpc_addr() {
        println!("  gRPC (agents)  tcp://{grpc}");
    }
    println!("  HTTP ingress   http://{}", relay.http_addr());
    if let Some(https) = relay.https_addr() {
        println!("  HTTPS ingress  https://{https}");
    }
    for (addr, tunnel) in relay.tcp_addrs().iter().zip(&tunnels) {
        println!("  TCP tunnel     tcp://{addr} to {tunnel}");
    }
    for (addr, tunnel) in relay.udp_addrs().iter().zip(&udp_tunnels) {
        println!("  UDP tunnel     udp://{addr} to {tunnel}");
    }
    println!("  admin          http://{}/api/sessions", relay.admin_addr());
    if !allowances.is_empty() {
        println!("  declared       http://{}/api/tunnels ({})", relay.admin_addr(), allowances.join("; "));
    }
    println!("  certificate    {}{}", cert_path.display(), if generated { " (generated)" } else { "" });
    println!("  pin            {pin}");
    let client = first_client.as_deref().unwrap_or("<ID>");
    println!("  agent command  {}", agent_command(&public_name, relay.quic_addr(), relay.grpc_addr(), &pin, client));
    serve_until_shutdown(&relay, &args, shutdown, hangups).await;
    relay.shutdown().await;
    Ok(())
}

/// What each client may declare, for the banner: `office-1 may declare *.dev.example.com, ports 7000-7099`.
fn declarable(config: &RelayConfig) -> Vec<String> {
    let ports = |p: &quictun_relay::config::PortSpec| match p.ports() {
        Ok(range) if range.start() == range.end() => range.start().to_string(),
        Ok(range) => format!("{}-{}", range.start(), range.end()),
        Err(err) => err,
    };
    config
        .clients
        .iter()
        .filter(|c| !c.allow_hosts.is_empty() || !c.allow_tcp_ports.is_empty())
        .map(|c| {
            let mut what = c.allow_hosts.clone();
            if !c.allow_tcp_ports.is_empty() {
                what.push(format!("ports {}", c.allow_tcp_ports.iter().map(ports).collect::<Vec<_>>().join(", ")));
            }
            format!("{} may declare {}", c.id, what.join(", "))
        })
        .collect()
}

/// How often the configuration file is checked for changes.
const CONFIG_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves until `shutdown` (Ctrl-C or SIGTERM). Meanwhile the configuration file is reloaded on
/// SIGHUP (`hangups`) and when it changes on disk; a file with an error is refused with a message
/// and the running configuration stays.
async fn serve_until_shutdown(
    relay: &Relay,
    args: &RelayArgs,
    shutdown: impl Future<Output = ()>,
    mut hangups: crate::signal::Hangups,
) {
    tokio::pin!(shutdown);
    let Some(path) = args.config.clone() else {
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = hangups.recv() => tracing::info!("SIGHUP: no configuration file to reload (the relay runs on flags)"),
            }
        }
    };
    let mut poll = tokio::time::interval(CONFIG_POLL);
    let mut stamp = modified(&path);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = hangups.recv() => stamp = modified(&path),
            _ = poll.tick() => {
                let now = modified(&path);
                if now == stamp {
                    continue;
                }
                stamp = now;
            }
        }
        let loaded = load_config(args).and_then(|config| relay.reload(&config).map_err(|e| Failure::Usage(e.into())));
        match loaded {
            Ok(version) => println!("configuration reloaded from {} (version {version})", path.display()),
            Err(Failure::Usage(err) | Failure::Runtime(err)) => {
                tracing::error!(error = %format!("{err:#}"), "configuration reload refused; the running configuration stays");
                println!("configuration reload refused: {err:#}");
            }
        }
    }
}

/// The file's modification time (and size), to notice edits.
fn modified(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_command_names_the_relay_its_ports_and_keeps_the_token_off_the_command_line() {
        let quic = Some("0.0.0.0:4433".parse().unwrap());
        let default_grpc = Some("0.0.0.0:4434".parse().unwrap());
        let command = agent_command("relay.example.com", quic, default_grpc, "sha256:ab", "office-1");
        assert_eq!(
            command,
            "QUICTUN_TOKEN=<office-1's token> quictun agent --relay relay.example.com:4433 --pin sha256:ab --client-id office-1"
        );
        let other_grpc = Some("0.0.0.0:9443".parse().unwrap());
        let command = agent_command("2001:db8::1", quic, other_grpc, "sha256:ab", "office-1");
        assert!(command.contains("--relay [2001:db8::1]:4433"), "{command}");
        assert!(command.ends_with("--grpc-relay [2001:db8::1]:9443"), "{command}");
        assert!(!command.contains("--token"));
        // A relay serving gRPC only: the agent is told to dial its gRPC port over gRPC.
        let command = agent_command("relay.example.com", None, default_grpc, "sha256:ab", "office-1");
        assert!(command.contains("--relay relay.example.com:4434 --pin"), "{command}");
        assert!(command.ends_with("--transport grpc --grpc-relay relay.example.com:4434"), "{command}");
    }
}
