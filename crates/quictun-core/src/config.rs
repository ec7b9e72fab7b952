//! Configuration files: TOML loading with errors that name the file and the key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration error that names the file and, where it can, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML did not parse, or had unknown or mistyped keys.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// toml's message, which names the key and the line.
        message: String,
    },
    /// The configuration parsed but a value is missing or inconsistent.
    #[error("{file}: {key}: {message}")]
    Invalid {
        /// The file (or `<command line>`).
        file: PathBuf,
        /// The offending key, such as `routes[2].upstream`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] for `key` of `file`.
    pub fn invalid(file: &Path, key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { file: file.to_owned(), key: key.into(), message: message.into() }
    }
}

/// How log lines are written: `log_format` in the relay's and the agent's file (`--log-format`
/// and `QUICTUN_LOG_FORMAT` win over it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal, unless `NO_COLOR` is set).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses TOML text; `file` names it in errors. An unknown key gets the nearest known one as a
/// suggestion instead of the list of every key.
pub fn parse_toml<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { file: file.to_owned(), message: suggest(&e.to_string()) })
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`, …" as "unknown key `x`; did
/// you mean `a`?" (the known key nearest in spelling), or without the suggestion when none is
/// near; any other message is returned as it is.
fn suggest(message: &str) -> String {
    const UNKNOWN: &str = "unknown field `";
    let Some(at) = message.find(UNKNOWN) else { return message.to_owned() };
    let rest = &message[at + UNKNOWN.len()..];
    let Some((key, after)) = rest.split_once('`') else { return message.to_owned() };
    let Some(list) = after.strip_prefix(", expected one of ").or_else(|| after.strip_prefix(", expected ")) else {
        return message.to_owned();
    };
    let list_end = list.find('\n').unwrap_or(list.len());
    let known = list[..list_end].split(", ").map(|k| k.trim_matches('`'));
    let nearest = known
        .map(|k| (strsim::jaro_winkler(key, k), k))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let hint = match nearest {
        Some((_, k)) => format!("unknown key `{key}`; did you mean `{k}`?"),
        None => format!("unknown key `{key}` (docs/configuration.md lists every key)"),
    };
    format!("{}{hint}{}", &message[..at], &list[list_end..])
}

/// `path` as read from the configuration file `file`: a relative path is taken against the
/// file's own directory, as nginx and systemd read the paths in theirs, so that what a
/// configuration means does not depend on where the process was started.
pub fn relative_to_file(file: &Path, path: &Path) -> std::path::PathBuf {
    match file.parent() {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_owned(),
    }
}

/// Resolves `path` in place with [`relative_to_file`].
pub fn resolve_in_place(file: &Path, path: &mut std::path::PathBuf) {
    *path = relative_to_file(file, path);
}

/// Reads and parses a TOML file.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
    parse_toml(&text, path)
}

/// Where a secret (a client's or an agent's token, the admin token) comes from: inline, from an
/// environment variable, or from a file; at most one of them. The one rule for the relay and the
/// agent.
#[derive(Debug, Clone, Copy)]
pub struct SecretSources<'a> {
    /// The key of the inline value (`token`, `admin_token`); the others are named after it
    /// (`token_env`, `token_file`).
    pub key: &'a str,
    /// The inline value (an empty one counts as unset).
    pub inline: Option<&'a quictun_proto::Token>,
    /// The name of an environment variable holding it.
    pub env: Option<&'a str>,
    /// A file holding it.
    pub file: Option<&'a Path>,
}

/// Why a secret could not be had: the key at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretError {
    /// The key: `token`, `token_env`, `token_file` (or the admin token's).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl SecretSources<'_> {
    /// The secret, or `None` when no source is set. More than one source, an unset or empty
    /// variable, or an unreadable or empty file are errors, never skipped.
    pub fn resolve(self) -> Result<Option<quictun_proto::Token>, SecretError> {
        let error = |suffix: &str, message: String| SecretError { key: format!("{}{suffix}", self.key), message };
        let inline = self.inline.filter(|token| !token.is_empty());
        let set = [inline.is_some(), self.env.is_some(), self.file.is_some()].iter().filter(|s| **s).count();
        if set > 1 {
            let key = self.key;
            return Err(error("", format!("set one of {key}, {key}_env, {key}_file")));
        }
        if let Some(token) = inline {
            return Ok(Some(token.clone()));
        }
        if let Some(var) = self.env {
            return match std::env::var(var) {
                Ok(value) if !value.trim().is_empty() => Ok(Some(quictun_proto::Token::new(value.trim()))),
                _ => Err(error("_env", format!("environment variable {var} is not set"))),
            };
        }
        match self.file {
            Some(path) => read_token_file(path).map(Some).map_err(|message| error("_file", message)),
            None => Ok(None),
        }
    }
}

/// Reads a token file: the whole file, surrounding whitespace removed; an empty file is an error.
pub fn read_token_file(path: &Path) -> Result<quictun_proto::Token, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(quictun_proto::Token::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_gets_the_nearest_known_one_not_the_whole_list() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Section {
            http_listen: Option<String>,
            quic_listen: Option<String>,
            admin_listen: Option<String>,
        }
        let err = parse_toml::<Section>("htp_listen = \"x\"\n", Path::new("r.toml")).unwrap_err().to_string();
        assert!(err.contains("unknown key `htp_listen`; did you mean `http_listen`?"), "{err}");
        assert!(!err.contains("quic_listen"), "{err}");
        let err = parse_toml::<Section>("zzz = 1\n", Path::new("r.toml")).unwrap_err().to_string();
        assert!(err.contains("unknown key `zzz` (docs/configuration.md lists every key)"), "{err}");
    }
    use quictun_proto::Token;

    fn sources<'a>(inline: Option<&'a Token>, env: Option<&'a str>, file: Option<&'a Path>) -> SecretSources<'a> {
        SecretSources { key: "token", inline, env, file }
    }

    #[test]
    fn one_source_gives_the_secret_and_none_gives_nothing() {
        let token = Token::new("t");
        assert_eq!(sources(Some(&token), None, None).resolve().unwrap().unwrap().expose(), "t");
        assert!(sources(None, None, None).resolve().unwrap().is_none());
        assert!(sources(Some(&Token::new("")), None, None).resolve().unwrap().is_none(), "empty counts as unset");
    }

    #[test]
    fn two_sources_a_missing_variable_or_file_are_errors_naming_the_key() {
        let token = Token::new("t");
        let two = sources(Some(&token), Some("X"), None).resolve().unwrap_err();
        assert_eq!(two.key, "token");
        let unset = sources(None, Some("QUICTUN_TEST_SURELY_UNSET"), None).resolve().unwrap_err();
        assert_eq!(unset.key, "token_env");
        let missing = sources(None, None, Some(Path::new("/nonexistent/token"))).resolve().unwrap_err();
        assert_eq!(missing.key, "token_file");
    }
}
