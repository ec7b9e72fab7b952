//! Test support for quictun's end-to-end suites: a scriptable upstream, a harness that starts a
//! real relay and real agents on 127.0.0.1 (ports from port 0), and an HTTP client.
//!
//! Nothing here sleeps to wait for readiness: waits are on signals (session manager changes, agent
//! state, the upstream's own counters), each under a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod agent_path;
pub mod browser;
pub mod client;
pub mod grpc_echo;
pub mod harness;
pub mod quinn_peer;
pub mod raw;
pub mod tcp_proxy;
pub mod udp_proxy;
pub mod upstream;

pub use agent_path::AgentPath;
pub use client::{HttpClient, Reply, admin_get, metric, wait_for_metric};
pub use harness::{Harness, HarnessConfig};
pub use tcp_proxy::TcpProxy;
pub use udp_proxy::UdpProxy;
pub use upstream::Upstream;

/// The transports a scenario runs over (re-exported for [`on_both_transports!`]).
pub use quictun_agent::Transport;

/// Runs each `async fn name(transport: Transport)` scenario as two tests, `quic::name` and
/// `grpc::name`, each on a two-thread runtime. Attributes before a name (`#[cfg_attr(…, ignore)]`)
/// go on both tests.
#[macro_export]
macro_rules! on_both_transports {
    ($($(#[$meta:meta])* $name:ident),* $(,)?) => {
        mod quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[$meta])*
                async fn $name() {
                    super::$name($crate::Transport::Quic).await
                }
            )*
        }
        mod grpc {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[$meta])*
                async fn $name() {
                    super::$name($crate::Transport::Grpc).await
                }
            )*
        }
    };
}

/// Deterministic test bytes: byte `i` is `i % 251`.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Logs from the code under test, when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
