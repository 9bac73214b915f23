//! `SECRET_KEY` as Flask deployments write it: any string.
//!
//! Rocket reads only a 256- or 512-bit key written in base64 (44 or 88 characters) or
//! hex (64 characters). A Flask `SECRET_KEY` is any string, and `openssl rand -base64 48`
//! (64 characters) is even read by Rocket as hex and refused. So: a string Rocket reads
//! is used as is; any other string of at least [`MIN_CHARS`] characters is stretched to
//! a 512-bit key with HKDF-SHA-512 under a fixed, public salt (the same string gives the
//! same key on every replica and after every restart, so sessions survive both).

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha512;

/// Shortest `SECRET_KEY` accepted in production (about 190 bits of printable text).
pub const MIN_CHARS: usize = 32;

/// Fixed and documented (README): changing it would log every user out.
const SALT: &[u8] = b"drishya/SECRET_KEY/v1";
const INFO: &[u8] = b"rocket secret_key (private cookies)";

/// Placeholders shipped in example env files: accepted, but flagged loudly.
const PLACEHOLDERS: &[&str] = &["change-this", "change_this", "changeme", "change-me", "your-secret-key"];

/// How `SECRET_KEY` became Rocket's key (the key itself is never stored here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// Already a key Rocket reads (base64 or hex): used as is.
    Rocket,
    /// Any other string of at least `MIN_CHARS` characters: derived.
    Derived,
    /// Shorter than `MIN_CHARS`: derived, refused in production.
    TooShort,
}

/// Rocket's key for the `SECRET_KEY` text, and how it was made.
pub enum Interpreted {
    /// Hand the text to Rocket unchanged.
    AsIs,
    /// Hand these 64 bytes to Rocket.
    Derived([u8; 64]),
}

pub fn interpret(text: &str) -> (Interpreted, KeySource) {
    if is_rocket_key(text) {
        return (Interpreted::AsIs, KeySource::Rocket);
    }
    let source = if text.chars().count() >= MIN_CHARS { KeySource::Derived } else { KeySource::TooShort };
    (Interpreted::Derived(derive(text)), source)
}

/// True for example-file placeholders such as Flask's "your-super-secret-key-change-this-in-production".
pub fn is_placeholder(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    PLACEHOLDERS.iter().any(|p| lower.contains(p))
}

fn derive(text: &str) -> [u8; 64] {
    let mut key = [0u8; 64];
    // 64 bytes is far below HKDF-SHA-512's 255 * 64 byte limit: cannot fail.
    if Hkdf::<Sha512>::new(Some(SALT), text.as_bytes()).expand(INFO, &mut key).is_err() {
        unreachable!("HKDF-SHA-512 output of 64 bytes is always valid");
    }
    key
}

/// Whether Rocket's own `secret_key` parser takes `text` as a (non-zero) key: base64 of
/// 32 or 64 bytes, or 64 hex digits. Asked of Rocket itself, so the two never disagree.
fn is_rocket_key(text: &str) -> bool {
    let value = serde_json::Value::String(text.to_string());
    serde_json::from_value::<rocket::config::SecretKey>(value).is_ok_and(|key| !key.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rocket_keys_pass_through_and_other_strings_are_derived() {
        let base64_32 = "3jJ6hjl9ftmxR81BChdy4afjyecN4YOdXIZzdpgCblo=";
        let base64_64 = "8THwKIiC1oMRlgp2DM8L5jmclJX3U5092sr6to5eUvqjWAOjeRzSyy71bJzZI8C6DjcbYZD87gQ71PN4BUbIgQ==";
        let hex_32 = "4e2a8c1f9b7d3e5a6c0b1d2f3e4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a";
        // (Test vectors, never used as keys anywhere.)
        for key in [base64_32, base64_64, hex_32] {
            assert!(matches!(interpret(key), (Interpreted::AsIs, KeySource::Rocket)), "{key}");
        }
        // `openssl rand -base64 48`: 64 characters that are not hex.
        let openssl_48 = "q1V5m3u0Vb9QJr4cX6a2yT8d+Wl0n7sPz3kE1hG5fR9oY2iU4tA6cB8eD0gH2jK4";
        let flask = "your-super-secret-key-change-this-in-production";
        for key in [openssl_48, flask] {
            assert!(matches!(interpret(key), (Interpreted::Derived(_), KeySource::Derived)), "{key}");
        }
        assert_eq!(interpret("short").1, KeySource::TooShort);
        // A key of zeros is no key: Rocket would treat it as unset.
        assert_eq!(interpret(&"0".repeat(64)).1, KeySource::Derived);
    }

    #[test]
    fn derivation_is_stable_and_depends_on_every_character() {
        let (Interpreted::Derived(a), _) = interpret("your-super-secret-key-change-this-in-production") else {
            panic!("derived")
        };
        let (Interpreted::Derived(b), _) = interpret("your-super-secret-key-change-this-in-production") else {
            panic!("derived")
        };
        let (Interpreted::Derived(c), _) = interpret("your-super-secret-key-change-this-in-productioN") else {
            panic!("derived")
        };
        assert_eq!(a, b, "the same string gives the same key (replicas, restarts)");
        assert_ne!(a, c);
        assert!(a.iter().any(|&x| x != 0));
    }

    #[test]
    fn placeholders_are_recognised() {
        assert!(is_placeholder("your-super-secret-key-change-this-in-production"));
        assert!(!is_placeholder("q1V5m3u0Vb9QJr4cX6a2yT8d+Wl0n7sPz3kE1hG5fR9oY2iU4tA6cB8eD0gH2jK4"));
    }
}
