//! The documentation says what the code does: every default in `docs/configuration.md` that is a
//! plain value is the default the configuration loader gives, and the relay configuration shown
//! in the README loads and validates.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};

use quictun_agent::config::AgentConfigFile;
use quictun_core::config::parse_toml;
use quictun_relay::RelayConfig;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `(key, default)` of every row of a reference table whose key cell is one backticked
/// `section.key` and whose default cell is one backticked value.
fn documented_defaults(text: &str, section: &str) -> Vec<(String, String)> {
    let one_backticked = |cell: &str| {
        let cell = cell.trim();
        let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
        (!inner.contains('`')).then(|| inner.to_owned())
    };
    text.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').collect();
            let (key, default) = (one_backticked(cells.get(1)?)?, one_backticked(cells.get(2)?)?);
            let key = key.strip_prefix(&format!("{section}."))?.to_owned();
            Some((key, default))
        })
        .collect()
}

/// A TOML value for a documented default: numbers, booleans and lists as they are, anything else
/// as a string.
fn toml_value(default: &str) -> String {
    let literal = default.parse::<f64>().is_ok() || ["true", "false"].contains(&default) || default.starts_with('[');
    if literal { default.to_owned() } else { format!("{default:?}") }
}

/// Checks each documented default of `section` by loading a file that sets the key to it: the
/// section must come out exactly as from a file that leaves it out. Returns how many were checked.
fn check_defaults<T>(section: &str, parse: impl Fn(&str) -> Result<T, String>, of: impl Fn(&T) -> String) -> usize {
    let text = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    let defaults = documented_defaults(&text, section);
    let baseline = of(&parse(&format!("[{section}]\n")).unwrap());
    for (key, default) in &defaults {
        let file = format!("[{section}]\n{key} = {}\n", toml_value(default));
        let loaded = parse(&file).unwrap_or_else(|e| panic!("{section}.{key} = {default}: {e}"));
        assert_eq!(of(&loaded), baseline, "docs/configuration.md says {section}.{key} defaults to {default}");
    }
    defaults.len()
}

#[test]
fn the_documented_relay_defaults_are_the_defaults() {
    let parse = |text: &str| parse_toml::<RelayConfig>(text, Path::new("doc.toml")).map_err(|e| e.to_string());
    let checked = check_defaults("relay", parse, |config| format!("{:?}", config.relay));
    eprintln!("{checked} relay defaults checked");
    assert!(checked >= 30, "only {checked} relay defaults found in docs/configuration.md");
}

/// `(key, default)` of every row of the reference whose key cell is `` `[[table]]` `key` `` and
/// whose default cell is one backticked value.
fn documented_entry_defaults(text: &str, table: &str) -> Vec<(String, String)> {
    let prefix = format!("`[[{table}]]` `");
    text.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').collect();
            let key = cells.get(1)?.trim().strip_prefix(&prefix)?.strip_suffix('`')?;
            let default = cells.get(2)?.trim().strip_prefix('`')?.strip_suffix('`')?;
            (!key.contains('`') && !default.contains('`')).then(|| (key.to_owned(), default.to_owned()))
        })
        .collect()
}

#[test]
fn the_documented_tunnel_entry_defaults_are_the_defaults() {
    let text = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    let entries = [
        ("tcp", "listen = \"127.0.0.1:0\"\ngroup = \"g\"\nupstream = \"db:5432\"\n"),
        ("udp", "listen = \"127.0.0.1:0\"\ngroup = \"g\"\nupstream = \"dns:53\"\n"),
    ];
    for (table, required) in entries {
        let of = |file: &str| {
            let config =
                parse_toml::<RelayConfig>(file, Path::new("doc.toml")).unwrap_or_else(|e| panic!("{e}\n{file}"));
            if table == "tcp" { format!("{:?}", config.tcp) } else { format!("{:?}", config.udp) }
        };
        let baseline = of(&format!("[[{table}]]\n{required}"));
        let defaults = documented_entry_defaults(&text, table);
        for (key, default) in &defaults {
            let file = format!("[[{table}]]\n{required}{key} = {}\n", toml_value(default));
            assert_eq!(of(&file), baseline, "docs/configuration.md says [[{table}]] {key} defaults to {default}");
        }
        assert!(defaults.len() >= 3, "only {} [[{table}]] defaults documented", defaults.len());
    }
}

#[test]
fn the_documented_agent_defaults_are_the_defaults() {
    let parse = |text: &str| parse_toml::<AgentConfigFile>(text, Path::new("doc.toml")).map_err(|e| e.to_string());
    let checked = check_defaults("agent", parse, |config| format!("{:?}", config.agent));
    eprintln!("{checked} agent defaults checked");
    assert!(checked >= 8, "only {checked} agent defaults found in docs/configuration.md");
}

#[test]
fn the_readmes_relay_configuration_loads() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let blocks: Vec<&str> = readme.split("```toml\n").skip(1).filter_map(|rest| rest.split("\n```").next()).collect();
    assert!(!blocks.is_empty(), "no TOML example in the README");
    for block in blocks {
        let config =
            parse_toml::<RelayConfig>(block, Path::new("README.md")).unwrap_or_else(|e| panic!("{e}\n{block}"));
        config.validate(Path::new("README.md")).unwrap_or_else(|e| panic!("{e}\n{block}"));
        // Something is served: the relay's own routes or tunnels, or what its clients may declare.
        let declarable = config.clients.iter().any(|c| !c.allow_hosts.is_empty() || !c.allow_tcp_ports.is_empty());
        let own = !config.routes.is_empty() || !config.tcp.is_empty() || !config.udp.is_empty();
        assert!(!config.clients.is_empty() && (own || declarable), "{block}");
    }
}

#[test]
fn the_cluster_guides_configuration_loads() {
    let guide = std::fs::read_to_string(repo().join("docs/cluster.md")).unwrap();
    let block = guide.split("```toml\n").nth(1).and_then(|rest| rest.split("\n```").next()).expect("a TOML example");
    let config =
        parse_toml::<RelayConfig>(block, Path::new("docs/cluster.md")).unwrap_or_else(|e| panic!("{e}\n{block}"));
    config.validate(Path::new("docs/cluster.md")).unwrap_or_else(|e| panic!("{e}\n{block}"));
    let cluster = config.cluster.expect("a [cluster] section");
    assert_eq!(
        (cluster.relay_id.as_str(), cluster.etcd.len(), cluster.server_id.as_deref()),
        ("relay-a", 3, Some("0a"))
    );
}
