//! `quictun cert gen` and `quictun cert pin`.

use anyhow::Context;
use quictun_core::Pin;
use quictun_core::tls::GeneratedCert;

use crate::Failure;
use crate::cli::{CertGenArgs, CertPinArgs};

/// Writes a new self-signed certificate and key, prints the pin.
pub fn generate(args: CertGenArgs) -> Result<(), Failure> {
    let cert_path = args.out.join(format!("{}.crt", args.name));
    let key_path = args.out.join(format!("{}.key", args.name));
    for path in [&cert_path, &key_path] {
        if path.exists() && !args.force {
            return Err(Failure::usage(anyhow::anyhow!("{} exists (use --force to overwrite)", path.display())));
        }
    }
    let generated = GeneratedCert::self_signed(&args.sans).map_err(Failure::runtime)?;
    generated.write(&cert_path, &key_path).map_err(Failure::runtime)?;
    println!("certificate: {}", cert_path.display());
    println!("key:         {}", key_path.display());
    println!("pin:         {}", generated.pin);
    Ok(())
}

/// Prints the pin of a certificate file.
pub fn pin(args: CertPinArgs) -> Result<(), Failure> {
    let pin = Pin::of_pem_file(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))
        .map_err(Failure::usage)?;
    println!("{pin}");
    Ok(())
}
