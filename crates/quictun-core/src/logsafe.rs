//! Strings from the network, made inert for the logs: control characters are escaped (a newline
//! cannot forge a second line, an escape sequence cannot drive the terminal it is read on, a
//! bidirectional override cannot reorder what the reader sees), and each is cut to
//! [`MAX_LOGGED`] bytes (a 60 KB client id is a few hundred bytes of log). Every field a
//! peer can write (a client id, a host, a path, a reason) goes into a log line through [`Inert`];
//! JSON logs escape on their own, and get the same bound.

use std::fmt::{self, Write};

/// The most bytes of one peer-supplied string a log line carries, escapes included.
pub const MAX_LOGGED: usize = 256;

/// A peer-supplied string, displayed escaped and bounded.
#[derive(Clone, Copy)]
pub struct Inert<'a>(pub &'a str);

/// True for what must not reach a log as it is: control characters (C0, DEL, C1), and the
/// invisible formatting ones that reorder or hide text.
fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

impl fmt::Display for Inert<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut written = 0;
        for (at, c) in self.0.char_indices() {
            let escaped = match c {
                '\n' => Escaped::Short('n'),
                '\r' => Escaped::Short('r'),
                '\t' => Escaped::Short('t'),
                '\\' => Escaped::Short('\\'),
                c if must_escape(c) => Escaped::Code(u32::from(c)),
                c => Escaped::Plain(c),
            };
            written += escaped.len();
            if written > MAX_LOGGED {
                return write!(f, "…(+{} bytes)", self.0.len() - at);
            }
            match escaped {
                Escaped::Short(c) => write!(f, "\\{c}")?,
                Escaped::Code(code) => write!(f, "\\u{{{code:x}}}")?,
                Escaped::Plain(c) => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// One character as it is written.
enum Escaped {
    /// `\n`, `\r`, `\t`, `\\`.
    Short(char),
    /// `\u{1b}`.
    Code(u32),
    /// As it is.
    Plain(char),
}

impl Escaped {
    /// Its length in the log, in bytes.
    fn len(&self) -> usize {
        match self {
            Self::Short(_) => 2,
            Self::Code(code) => 4 + (32 - code.leading_zeros()).div_ceil(4).max(1) as usize,
            Self::Plain(c) => c.len_utf8(),
        }
    }
}

impl fmt::Debug for Inert<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_strings_cut() {
        let evil = "id\nINFO forged\r\x1b[31mred\x07\u{202e}txt\\";
        let shown = Inert(evil).to_string();
        assert_eq!(shown, "id\\nINFO forged\\r\\u{1b}[31mred\\u{7}\\u{202e}txt\\\\");
        assert!(!shown.chars().any(must_escape));
        let long = "x".repeat(60_000);
        let shown = Inert(&long).to_string();
        assert_eq!(shown, format!("{}…(+{} bytes)", "x".repeat(MAX_LOGGED), 60_000 - MAX_LOGGED));
        // Escapes count in the bound: 60 KB of escape characters is as short.
        let escapes = "\x1b".repeat(60_000);
        let shown = Inert(&escapes).to_string();
        assert_eq!(shown, format!("{}…(+{} bytes)", "\\u{1b}".repeat(MAX_LOGGED / 6), 60_000 - MAX_LOGGED / 6));
        assert_eq!(Inert("\u{0}\u{9f}").to_string(), "\\u{0}\\u{9f}");
        assert_eq!(Inert("plain host.example").to_string(), "plain host.example");
        assert_eq!(format!("{:?}", Inert("a\nb")), "\"a\\nb\"");
    }
}
