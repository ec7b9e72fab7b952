//! A request target's path as the relay routes it: any text either is refused or comes out in a
//! canonical form that normalizes to itself, starts with `/` and has no `.`/`..` segments and no
//! empty ones. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quictun_core::edge::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(canonical) = normalize(text) else { return };
    let again = normalize(&canonical).expect("a canonical path is accepted again");
    assert_eq!(again, canonical, "normalizing twice changed {text:?}");
    let path = canonical.split('?').next().unwrap_or("");
    assert!(path.starts_with('/'));
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        assert!(!matches!(*segment, "." | ".."), "dot-segment left in {canonical:?} from {text:?}");
        assert!(!segment.is_empty() || i == last, "empty segment in {canonical:?} from {text:?}");
    }
});
