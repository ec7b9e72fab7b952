//! Secrets that must never show up in logs or `Debug` output.

use serde::{Deserialize, Serialize};

/// An agent's authentication token. `Debug` and `Display` print `MASKED`; only [`Token::expose`]
/// gives the bytes, for the constant-time comparison on the relay.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// Wraps a token value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret bytes. Call only to compare or to send on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the token is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(MASKED)")
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MASKED")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let t = Token::new("hunter2");
        assert!(!format!("{t:?}").contains("hunter2"));
        assert!(!format!("{t}").contains("hunter2"));
        assert_eq!(t.expose(), "hunter2");
    }
}
