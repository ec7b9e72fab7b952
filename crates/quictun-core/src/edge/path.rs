//! Canonical request paths: the path a route is matched on is the path the upstream receives.
//!
//! [`normalize`] rewrites a request path (the part before `?`) the way RFC 3986 §6.2.2 says,
//! and refuses what an upstream could resolve differently from the relay:
//!
//! 1. **Percent-encoding:** `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded
//!    (`%2e` is `.`, `%41` is `A`); every other escape is kept, with upper-case hex digits. A `%`
//!    not followed by two hex digits, and `%00`, are refused.
//! 2. **Slashes:** runs of `/` are merged into one, as nginx and most file servers do, so that
//!    `//..` cannot mean one thing here and another there.
//! 3. **Dot-segments** (`.` and `..`, after step 1) are removed (RFC 3986 §5.2.4); a `..` that
//!    would climb above the root is refused.
//! 4. **Hidden separators:** an encoded slash (`%2F`) or backslash (`%5C`), and a raw backslash,
//!    stay data: they do not separate segments here, so `/a%2Fb` is matched as one segment and
//!    forwarded unchanged (APIs such as GitLab's put encoded paths in a segment). But a segment
//!    that would contain a dot-segment once an upstream treated them as separators (`..%2F`,
//!    `%5C..`, `..\`), or once it dropped path parameters (`..;x`, as Tomcat does), is refused.
//!
//! The query string is not touched.

use std::borrow::Cow;

/// Why a path was refused (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path must start with /")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-encoding in the path")]
    BadEscape,
    /// `%00` in the path.
    #[error("NUL (%00) in the path")]
    Nul,
    /// A `..` above the root.
    #[error("the path climbs above the root")]
    AboveRoot,
    /// A dot-segment behind an encoded separator, a backslash or a path parameter.
    #[error("a dot-segment hidden behind an encoded separator, a backslash or a ';'")]
    HiddenDotSegment,
}

/// The canonical form of a request target's path and query (origin form, `/...?query`), or why
/// it is refused. Borrows the input when it is already canonical (the common case).
pub fn normalize(path_and_query: &str) -> Result<Cow<'_, str>, PathError> {
    let (path, query) = match path_and_query.find('?') {
        Some(at) => path_and_query.split_at(at),
        None => (path_and_query, ""),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_canonical(path) {
        return Ok(Cow::Borrowed(path_and_query));
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    // The path starts with '/', so the first piece is empty; empty pieces are merged slashes.
    let pieces: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = pieces.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, piece) in pieces.iter().enumerate() {
        match *piece {
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = i == last;
            }
            segment => {
                check_hidden_dot_segments(segment)?;
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path_and_query.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    out.push_str(query);
    Ok(Cow::Owned(out))
}

/// True when nothing in `path` can change: no escapes, backslashes, `;`, merged slashes or
/// dot-segments.
fn is_canonical(path: &str) -> bool {
    !path.bytes().any(|b| matches!(b, b'%' | b'\\' | b';'))
        && !path.contains("//")
        && !path.split('/').any(|segment| matches!(segment, "." | ".."))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters and upper-cases the hex of the others.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Not an escape: copy the run up to the next one (UTF-8 stays whole).
            let end = bytes[i..].iter().position(|&b| b == b'%').map_or(bytes.len(), |n| i + n);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(hi), Some(lo)) = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        else {
            return Err(PathError::BadEscape);
        };
        let value = hi << 4 | lo;
        if value == 0 {
            return Err(PathError::Nul);
        }
        if is_unreserved(value) {
            out.push(char::from(value));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
        }
        i += 3;
    }
    Ok(out)
}

/// Refuses a segment that an upstream splitting on `%2F`, `%5C` or `\`, or dropping `;`
/// parameters, would read as `.` or `..` (a plain `.` or `..` segment never gets here).
fn check_hidden_dot_segments(segment: &str) -> Result<(), PathError> {
    let hides_a_dot_segment = segment
        .split('\\')
        .flat_map(|piece| piece.split("%2F"))
        .flat_map(|piece| piece.split("%5C"))
        .map(|piece| piece.split(';').next().unwrap_or(piece))
        .any(|piece| matches!(piece, "." | ".."));
    if hides_a_dot_segment { Err(PathError::HiddenDotSegment) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for p in ["/", "/a", "/a/b/", "/static/app.js", "/a/.well-known/x", "/a?x=../../y", "/a/b?q=%2e%2e"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(norm("/public/../secret").unwrap(), "/secret");
        assert_eq!(norm("/public/./x").unwrap(), "/public/x");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a/..").unwrap(), "/");
        assert_eq!(norm("/a/../b/../c?x=1").unwrap(), "/c?x=1");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        assert_eq!(norm("/public/%2e%2e/secret").unwrap(), "/secret");
        assert_eq!(norm("/public/%2E%2E/secret").unwrap(), "/secret");
        assert_eq!(norm("/public/.%2e/secret").unwrap(), "/secret");
        assert_eq!(norm("/%41%62c").unwrap(), "/Abc");
        assert_eq!(norm("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(norm("/a%20b").unwrap(), "/a%20b");
        assert_eq!(norm("/caf%c3%a9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn slashes_are_merged() {
        assert_eq!(norm("//a///b").unwrap(), "/a/b");
        assert_eq!(norm("/public//../secret").unwrap(), "/secret");
        assert_eq!(norm("/a//").unwrap(), "/a/");
    }

    #[test]
    fn escapes_above_the_root_and_hidden_dots_are_refused() {
        assert_eq!(norm("/.."), Err(PathError::AboveRoot));
        assert_eq!(norm("/a/../.."), Err(PathError::AboveRoot));
        assert_eq!(norm("/%2e%2e/x"), Err(PathError::AboveRoot));
        for p in [
            "/public/..%2fsecret",
            "/public/..%2Fsecret",
            "/public/%2e%2e%2fsecret",
            "/public/..%5csecret",
            "/public/..\\secret",
            "/public/x%2F..%2F..%2Fsecret",
            "/public/..;/secret",
            "/public/.;x/y",
        ] {
            assert_eq!(norm(p), Err(PathError::HiddenDotSegment), "{p}");
        }
    }

    #[test]
    fn encoded_separators_without_dots_are_data() {
        assert_eq!(norm("/api/v4/projects/group%2Fproject").unwrap(), "/api/v4/projects/group%2Fproject");
        assert_eq!(norm("/a/b..c%2Fd").unwrap(), "/a/b..c%2Fd");
        assert_eq!(norm("/a;v=1/b").unwrap(), "/a;v=1/b");
        assert_eq!(norm("/a\\b").unwrap(), "/a\\b");
    }

    #[test]
    fn bad_escapes_nul_and_relative_paths_are_refused() {
        assert_eq!(norm("/a%"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%2"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%00b"), Err(PathError::Nul));
        assert_eq!(norm("a/b"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn normalizing_is_idempotent() {
        for p in ["/a/./b/../c//d/", "/%7euser/%2e/x%2fy", "/x/y/z/../../w?q"] {
            let once = norm(p).unwrap();
            assert_eq!(norm(&once).unwrap(), once, "{p}");
        }
    }

    proptest::proptest! {
        /// Whatever is accepted comes out canonical: stable, rooted, without dot or empty segments.
        #[test]
        fn accepted_paths_come_out_canonical(tail in "[/.a%2eEfF5cC;\\\\?]{0,24}") {
            let input = format!("/{tail}");
            if let Ok(canonical) = normalize(&input) {
                proptest::prop_assert_eq!(normalize(&canonical).unwrap(), canonical.clone());
                let path = canonical.split('?').next().unwrap();
                let segments: Vec<&str> = path.split('/').skip(1).collect();
                for (i, segment) in segments.iter().enumerate() {
                    proptest::prop_assert!(!matches!(*segment, "." | ".."), "{} -> {}", input, canonical);
                    proptest::prop_assert!(!segment.is_empty() || i + 1 == segments.len(), "{} -> {}", input, canonical);
                }
            }
        }
    }
}
