//! `quictun agent`.

use std::path::{Path, PathBuf};

use quictun_agent::EgressServer;
use quictun_agent::config::{AgentConfigFile, TunnelEntry};
use quictun_agent::{Agent, AgentOptions, AgentState};
use quictun_proto::Token;

use crate::Failure;
use crate::cli::AgentArgs;

/// Merges the file and the flags into validated options, one set per relay.
fn load_options(args: &AgentArgs) -> Result<Vec<AgentOptions>, Failure> {
    let args = args.clone();
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
    for flag in &args.http {
        file.tunnels.push(TunnelEntry::http_flag(flag).map_err(|e| Failure::usage(anyhow::anyhow!(e)))?);
    }
    for flag in &args.tcp {
        file.tunnels.push(TunnelEntry::tcp_flag(flag).map_err(|e| Failure::usage(anyhow::anyhow!(e)))?);
    }
    AgentOptions::for_each_relay(file, Path::new(&origin)).map_err(Failure::usage)
}

/// Runs the agent (one connection per relay) until Ctrl-C or SIGTERM (drain), or a fatal error
/// on any relay (exit 1).
pub async fn run(args: AgentArgs) -> Result<(), Failure> {
    // Caught from the start, so that a stop during start-up drains instead of killing.
    let (shutdown, mut hangups) = (crate::signal::shutdown(), crate::signal::hangups());
    let all_options = load_options(&args)?;
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
        let (mut state, answers) = (agent.state(), agent.tunnel_answers());
        Box::pin(async move {
            tokio::select! {
                () = report_connections(&mut state) => {}
                () = report_tunnels(answers) => {}
            }
        })
    });
    let stopped = futures_util::future::select_all(reports);
    tokio::pin!(shutdown, stopped);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = &mut stopped => break,
            () = hangups.recv() => reload_tunnels(&args, &agents),
        }
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

/// On SIGHUP: reads the file and the flags again and gives each agent its new tunnels (claimed
/// on the running session). Other changes need a restart; a file with an error changes nothing.
fn reload_tunnels(args: &AgentArgs, agents: &[Agent]) {
    match load_options(args) {
        Ok(all_options) => {
            for (agent, options) in agents.iter().zip(all_options) {
                agent.set_tunnels(options.tunnels);
            }
            println!("quictun agent reloaded its tunnels (other changes take effect after a restart)");
        }
        Err(Failure::Usage(err) | Failure::Runtime(err)) => {
            tracing::error!(error = %format!("{err:#}"), "reload refused; the running tunnels stay");
            println!("quictun agent reload refused: {err:#}");
        }
    }
}

/// Prints the relay's answer to each declared tunnel, each time it answers; never returns.
async fn report_tunnels(mut answers: tokio::sync::watch::Receiver<Vec<quictun_proto::ClaimAnswer>>) {
    // Answers that came before this watch began are printed too.
    answers.mark_changed();
    while answers.changed().await.is_ok() {
        for answer in answers.borrow_and_update().iter() {
            match &answer.refused {
                None => println!("quictun agent tunnel {}: accepted", answer.claim),
                Some(why) => println!("quictun agent tunnel {}: refused: {why}", answer.claim),
            }
        }
    }
    std::future::pending().await
}

/// Prints a line each time the agent registers with the relay, one when a session it had is
/// lost, and why the first attempts fail (until one succeeds); returns when the agent stops.
async fn report_connections(state: &mut tokio::sync::watch::Receiver<AgentState>) {
    let (mut connected, mut last_failure) = (false, String::new());
    loop {
        let now = state.borrow_and_update().clone();
        match now {
            AgentState::Connected { session_id, relay, transport } => {
                connected = true;
                println!("quictun agent connected to {relay} over {transport} (session {session_id})");
            }
            AgentState::FallingBack { reason } => println!("quictun agent: {reason}"),
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
