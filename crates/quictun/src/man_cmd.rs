//! `quictun man [PAGE]`: the manual pages, generated from the flags (clap_mangen) and, for the
//! configuration keys, from `docs/configuration.md` (the same tables the documentation tests
//! check against the code).

use clap::CommandFactory;

use crate::Failure;
use crate::cli::Cli;

/// Each subcommand with a page of its own, and the page's name.
const PAGES: [(&str, &str); 7] = [
    ("relay", "quictun-relay"),
    ("agent", "quictun-agent"),
    ("demo", "quictun-demo"),
    ("cert", "quictun-cert"),
    ("bench", "quictun-bench"),
    ("upstream", "quictun-upstream"),
    ("completions", "quictun-completions"),
];

/// The configuration reference, built into the binary.
const CONFIGURATION: &str = include_str!("../../../docs/configuration.md");

/// Writes the page `page` (none: `quictun(1)`; a subcommand: `quictun-<it>(1)`; `config`:
/// `quictun.toml(5)`, every key of relay.toml and agent.toml) to stdout.
pub fn run(page: Option<&str>) -> Result<(), Failure> {
    let mut out = std::io::stdout();
    let written = match page {
        None => clap_mangen::Man::new(Cli::command()).render(&mut out),
        Some("config") => std::io::Write::write_all(&mut out, configuration_page().as_bytes()),
        Some(name) => {
            let page = PAGES.iter().find(|(sub, _)| *sub == name);
            let Some(sub) =
                page.and_then(|(sub, title)| Some(Cli::command().find_subcommand(sub)?.clone().name(*title)))
            else {
                let pages = PAGES.iter().map(|(sub, _)| *sub).collect::<Vec<_>>().join(", ");
                return Err(Failure::usage(anyhow::anyhow!(
                    "no manual page {name:?}: the pages are {pages} and config"
                )));
            };
            clap_mangen::Man::new(sub).render(&mut out)
        }
    };
    written.map_err(|err| Failure::runtime(anyhow::anyhow!("writing the manual page: {err}")))
}

/// `quictun.toml(5)` in roff: each table row of the configuration reference as a tagged
/// paragraph (key, default, meaning), under its file's section.
fn configuration_page() -> String {
    let mut page = String::from(
        ".TH QUICTUN.TOML 5\n.SH NAME\nrelay.toml, agent.toml \\- quictun's configuration files\n\
         .SH DESCRIPTION\nEvery key, its default and its meaning. Unknown keys are refused, with the nearest known one suggested.\n",
    );
    for line in CONFIGURATION.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            page.push_str(&format!(".SH {}\n", roff(&title.to_uppercase())));
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        if !line.starts_with("| `") || cells.len() < 3 {
            continue;
        }
        let default = if cells[1].is_empty() { String::new() } else { format!(" (default: {})", roff(cells[1])) };
        page.push_str(&format!(".TP\n\\fB{}\\fR{default}\n{}\n", roff(cells[0]), roff(&cells[2..].join(" | "))));
    }
    page
}

/// Text made safe for roff: backslashes escaped, backticks dropped, no line starting with a dot.
fn roff(text: &str) -> String {
    text.replace('\\', "\\\\").replace('`', "").replace("\n.", "\n\\&.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_page_has_every_documented_key() {
        let page = configuration_page();
        for key in ["relay.quic_listen", "allow_hosts", "agent.upstream_ca_file", "[[tunnels]]"] {
            assert!(page.contains(key), "{key} missing from quictun.toml(5)");
        }
        assert!(page.contains(".SH RELAY.TOML") && page.contains(".SH AGENT.TOML"));
        assert!(
            !page
                .lines()
                .any(|l| l.starts_with('.') && !l.starts_with(".TH") && !l.starts_with(".SH") && !l.starts_with(".TP")),
            "stray roff requests"
        );
    }
}
