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

/// Parses TOML text; `file` names it in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { file: file.to_owned(), message: e.to_string() })
}

/// Reads and parses a TOML file.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
    parse_toml(&text, path)
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
