//! `quictun agent`.

use std::path::{Path, PathBuf};

use quictun_agent::config::AgentConfigFile;
use quictun_agent::{Agent, AgentOptions};
use quictun_proto::Token;

use crate::Failure;
use crate::cli::AgentArgs;

/// Merges the file and the flags into validated options.
fn load_options(args: AgentArgs) -> Result<AgentOptions, Failure> {
    let (mut file, origin) = match &args.config {
        Some(path) => (AgentConfigFile::load(path).map_err(Failure::usage)?, path.clone()),
        None => (AgentConfigFile::default(), PathBuf::from("<command line>")),
    };
    let a = &mut file.agent;
    if let Some(relay) = args.relay {
        a.relay = relay;
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
    }
    if let Some(admin) = args.admin_listen {
        a.admin_listen = Some(admin);
    }
    AgentOptions::from_config(file, Path::new(&origin)).map_err(Failure::usage)
}

/// Runs the agent until Ctrl-C or SIGTERM (drain), or a fatal error (exit 1).
pub async fn run(args: AgentArgs) -> Result<(), Failure> {
    let options = load_options(args)?;
    let agent = Agent::start(options).await.map_err(Failure::runtime)?;
    let stop = agent.shutdown_token();
    let mut state = agent.state();
    tokio::select! {
        _ = crate::signal::shutdown() => {
            agent.shutdown().await.map_err(Failure::runtime)
        }
        _ = state.wait_for(|s| matches!(s, quictun_agent::AgentState::Stopped)) => {
            stop.cancel();
            agent.wait().await.map_err(Failure::runtime)
        }
    }
}
