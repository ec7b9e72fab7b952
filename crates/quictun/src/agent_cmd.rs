//! `quictun agent`.

use std::path::{Path, PathBuf};

use quictun_agent::EgressServer;
use quictun_agent::config::AgentConfigFile;
use quictun_agent::{Agent, AgentOptions, AgentState};
use quictun_proto::Token;

use crate::Failure;
use crate::cli::AgentArgs;

/// Merges the file and the flags into validated options, one set per relay.
fn load_options(args: AgentArgs) -> Result<Vec<AgentOptions>, Failure> {
    let (mut file, origin) = match &args.config {
        Some(path) => (AgentConfigFile::load(path).map_err(Failure::usage)?, path.clone()),
        None => (AgentConfigFile::default(), PathBuf::from("<command line>")),
    };
    let a = &mut file.agent;
    if let Some((first, more)) = args.relay.split_first() {
        a.relay = first.clone();
        a.relays = more.to_vec();
    }
    if let Some(transport) = args.transport {
        a.transport = transport;
    }
    if let Some(grpc_relay) = args.grpc_relay {
        a.grpc_relay = Some(grpc_relay);
    }
    if let Some(pin) = args.pin {
        a.pin = Some(pin);
        a.ca = None;
    }
    if let Some(ca) = args.ca {
        a.ca = Some(ca);
        a.pin = None;
    }
    if let Some(id) = args.client_id {
        a.client_id = id;
    }
    if let Some(group) = args.group {
        a.group = group;
    }
    if let Some(token) = args.token {
        a.token = Some(Token::new(token));
        a.token_env = None;
        a.token_file = None;
    }
    if let Some(admin) = args.admin_listen {
        a.admin_listen = Some(admin);
    }
    if let Some(egress) = args.egress_listen {
        a.egress_listen = Some(egress);
    }
    AgentOptions::for_each_relay(file, Path::new(&origin)).map_err(Failure::usage)
}

/// Runs the agent (one connection per relay) until Ctrl-C or SIGTERM (drain), or a fatal error
/// on any relay (exit 1).
pub async fn run(args: AgentArgs) -> Result<(), Failure> {
    // Caught from the start, so that a stop during start-up drains instead of killing.
    let shutdown = crate::signal::shutdown();
    let all_options = load_options(args)?;
    let egress_listen = all_options.first().and_then(|o| o.egress_listen);
    let response_timeout = all_options.first().map(|o| o.response_timeout).unwrap_or_default();
    let mut agents = Vec::new();
    for options in all_options {
        agents.push(Agent::start(options).await.map_err(Failure::runtime)?);
    }
    if let Some(admin) = agents.first().and_then(Agent::admin_addr) {
        println!("quictun agent admin on http://{admin}/metrics");
    }
    // One egress listener for the process: each request goes over the first connected relay.
    let egress = match egress_listen {
        Some(listen) => {
            let relays = agents.iter().map(Agent::relay_tunnel).collect();
            let server = EgressServer::start(listen, relays, response_timeout).await.map_err(Failure::runtime)?;
            println!("quictun agent egress on http://{}", server.local_addr());
            Some(server)
        }
        None => None,
    };
    let reports = agents.iter().map(|agent| {
        let mut state = agent.state();
        Box::pin(async move { report_connections(&mut state).await })
    });
    let stopped = futures_util::future::select_all(reports);
    tokio::select! {
        () = shutdown => {}
        _ = stopped => {}
    }
    // Drain every connection; the first fatal error (if any) is the exit status.
    if let Some(egress) = egress {
        egress.shutdown().await;
    }
    let mut result = Ok(());
    for agent in agents {
        if let Err(err) = agent.shutdown().await
            && result.is_ok()
        {
            result = Err(Failure::runtime(err));
        }
    }
    result
}

/// Prints a line each time the agent registers with the relay, one when a session it had is
/// lost, and why the first attempts fail (until one succeeds); returns when the agent stops.
async fn report_connections(state: &mut tokio::sync::watch::Receiver<AgentState>) {
    let (mut connected, mut last_failure) = (false, String::new());
    loop {
        let now = state.borrow_and_update().clone();
        match now {
            AgentState::Connected { session_id, relay } => {
                connected = true;
                println!("quictun agent connected to {relay} (session {session_id})");
            }
            AgentState::Reconnecting { reason } if connected => {
                connected = false;
                println!("quictun agent lost the relay ({reason}): reconnecting");
            }
            // Each different reason once, not every retry.
            AgentState::Reconnecting { reason } if reason != last_failure => {
                println!("quictun agent cannot connect to the relay: {reason} (retrying)");
                last_failure = reason;
            }
            AgentState::Stopped => return,
            AgentState::Connecting | AgentState::Reconnecting { .. } => {}
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}
