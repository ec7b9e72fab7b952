//! The agent's admin endpoint (`admin_listen`): `/healthz`, `/readyz` (200 while registered with
//! the relay) and `/metrics`, on the shared server of [`quictun_core::admin`].

use std::net::SocketAddr;
use std::sync::Arc;

use quictun_core::admin::{AdminPages, AdminReply};
use tokio::sync::watch;

use crate::error::AgentError;
use crate::metrics::AgentMetrics;
use crate::state::AgentState;

/// The agent's admin pages: ready while registered, metrics.
pub struct AgentPages {
    /// The agent's state (ready while connected).
    pub state: watch::Receiver<AgentState>,
    /// Its metrics.
    pub metrics: Arc<AgentMetrics>,
}

impl AgentPages {
    fn connected(&self) -> bool {
        matches!(*self.state.borrow(), AgentState::Connected { .. })
    }
}

impl AdminPages for AgentPages {
    fn ready(&self) -> bool {
        self.connected()
    }

    fn metrics(&self) -> String {
        self.metrics.render(self.connected())
    }

    fn page(&self, _path: &str) -> Option<AdminReply> {
        None
    }
}

/// Binds the admin listener (synchronously, so [`crate::Agent::start_on`] stays synchronous).
pub fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), AgentError> {
    let err = |source: std::io::Error| AgentError::Listener { what: "admin", addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((tokio::net::TcpListener::from_std(listener).map_err(err)?, bound))
}
