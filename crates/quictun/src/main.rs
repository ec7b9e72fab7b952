//! `quictun`: the command-line front end of the quictun reverse tunnel.
//!
//! One binary: `relay`, `agent`, `cert gen`, `cert pin`, `demo`. Exit status: 0 success,
//! 2 usage or configuration error, 1 runtime failure. Logs go to stderr through `tracing`
//! (level from `RUST_LOG`, `info` by default; text, or JSON with `--log-format json`); stdout
//! carries only the command's own output.

mod agent_cmd;
mod bench_cmd;
mod cert_cmd;
mod cli;
mod demo;
mod demo_upstream;
mod man_cmd;
mod relay_cmd;
mod signal;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::cli::{CertCommand, Cli, Command, LogFormat};

/// How a command failed, which decides the exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad flags or configuration: exit 2.
    Usage(anyhow::Error),
    /// Anything else: exit 1.
    Runtime(anyhow::Error),
}

impl Failure {
    /// A usage error from anything displayable.
    pub fn usage(err: impl Into<anyhow::Error>) -> Self {
        Self::Usage(err.into())
    }

    /// A runtime error from anything displayable.
    pub fn runtime(err: impl Into<anyhow::Error>) -> Self {
        Self::Runtime(err.into())
    }
}

/// Logs to stderr at `RUST_LOG` (`info` by default): text, coloured only on a terminal and
/// without `NO_COLOR` (<https://no-color.org>), or JSON lines.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            builder.with_ansi(std::io::stderr().is_terminal() && !no_color).init();
        }
    }
}

/// `log_format` from the relay's or the agent's configuration file, read before the rest of it
/// (logging starts first). A file that cannot be read here is reported when the command loads it.
fn configured_log_format(command: &Command) -> LogFormat {
    let (path, section) = match command {
        Command::Relay(args) => (args.config.as_deref(), "relay"),
        Command::Agent(args) => (args.config.as_deref(), "agent"),
        _ => (None, ""),
    };
    let configured: Option<quictun_core::config::LogFormat> = path
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| table.get(section)?.get("log_format")?.clone().try_into().ok());
    match configured {
        Some(quictun_core::config::LogFormat::Json) => LogFormat::Json,
        Some(quictun_core::config::LogFormat::Text) | None => LogFormat::Text,
    }
}

/// Raises the soft limit on open files to the hard limit, as servers do: the relay's connection
/// budget is sized from it (three quarters of it, the rest kept for the admin endpoint and the
/// agents), and a default soft limit of 1024 would cap a public relay at a few hundred clients.
fn raise_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(err) => tracing::warn!(%err, "could not raise the open-file limit"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format.unwrap_or_else(|| configured_log_format(&cli.command)));
    raise_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Relay(args) => relay_cmd::run(args).await,
            Command::Agent(args) => agent_cmd::run(args).await,
            Command::Cert { command: CertCommand::Gen(args) } => cert_cmd::generate(args),
            Command::Cert { command: CertCommand::Pin(args) } => cert_cmd::pin(args),
            Command::Demo(args) => demo::run(args).await,
            Command::Upstream(args) => demo_upstream::run(args).await,
            Command::Bench(args) => bench_cmd::run(args).await,
            Command::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "quictun", &mut std::io::stdout());
                Ok(())
            }
            Command::Man { page } => man_cmd::run(page.as_deref()),
            Command::BenchAgents(args) => bench_cmd::agents(args).await,
            Command::BenchFloor(args) => bench_cmd::floor(args).await,
            Command::BenchProxy(args) => bench_cmd::proxy(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(err)) => {
            eprintln!("error: {}", describe(&err));
            ExitCode::from(2)
        }
        Err(Failure::Runtime(err)) => {
            eprintln!("error: {}", describe(&err));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes on one line, each said once: many errors already include their
/// cause's text (`binding 0.0.0.0:8080: Address already in use`), and the cause would otherwise
/// follow it again.
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("binding 0.0.0.0:8080: {source}")]
    struct Bind {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let err = anyhow::Error::new(Bind { source: io }).context("starting the relay");
        let text = describe(&err);
        assert_eq!(text.matches("address in use").count() + text.matches("Address in use").count(), 1, "{text}");
        assert!(text.starts_with("starting the relay: binding 0.0.0.0:8080: "), "{text}");
    }
}
