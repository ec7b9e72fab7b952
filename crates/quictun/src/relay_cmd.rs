//! `quictun relay`.

use std::path::Path;

use anyhow::anyhow;
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
    }
    if let Some(key) = &args.key {
        r.key = key.clone();
    }
    config.validate(&origin).map_err(Failure::usage)?;
    Ok(config)
}

/// Loads the certificate, or generates and writes one when neither file exists.
fn load_or_generate_cert(config: &RelayConfig) -> Result<(CertKey, bool), Failure> {
    let (cert, key) = (&config.relay.cert, &config.relay.key);
    match (cert.exists(), key.exists()) {
        (true, true) => Ok((CertKey::load(cert, key).map_err(Failure::usage)?, false)),
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
            Ok((generated.cert_key().map_err(Failure::runtime)?, true))
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
    let (cert, generated) = load_or_generate_cert(&config)?;
    let first_client = config.clients.first().map(|c| c.id.clone());
    let cert_path = config.relay.cert.clone();
    let relay = Relay::start(config, cert).await.map_err(|err| match err {
        quictun_relay::RelayError::Config(_) => Failure::usage(err),
        other => Failure::runtime(other),
    })?;
    let pin = relay.pin().map(|p| p.to_string()).unwrap_or_default();
    println!("quictun relay");
    println!("  QUIC (agents)  udp://{}", relay.quic_addr());
    if let Some(grpc) = relay.grpc_addr() {
        println!("  gRPC (agents)  tcp://{grpc}");
    }
    println!("  HTTP ingress   http://{}", relay.http_addr());
    if let Some(https) = relay.https_addr() {
        println!("  HTTPS ingress  https://{https}");
    }
    println!("  admin          http://{}/api/sessions", relay.admin_addr());
    println!("  certificate    {}{}", cert_path.display(), if generated { " (generated)" } else { "" });
    println!("  pin            {pin}");
    println!(
        "  agent command  quictun agent --relay <THIS_HOST>:{} --pin {pin} --client-id {} --token <TOKEN>",
        relay.quic_addr().port(),
        first_client.as_deref().unwrap_or("<ID>")
    );
    serve_until_shutdown(&relay, &args).await;
    relay.shutdown().await;
    Ok(())
}

/// How often the configuration file is checked for changes.
const CONFIG_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves until Ctrl-C or SIGTERM. Meanwhile the configuration file is reloaded on SIGHUP and when
/// it changes on disk; a file with an error is refused with a message and the running
/// configuration stays.
async fn serve_until_shutdown(relay: &Relay, args: &RelayArgs) {
    let shutdown = crate::signal::shutdown();
    tokio::pin!(shutdown);
    let Some(path) = args.config.clone() else {
        return shutdown.await;
    };
    let mut hangups = crate::signal::hangups();
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
