//! Text made safe for Postgres (I10). A `text` or `jsonb` value cannot hold a NUL character, and an
//! error text is whatever a handler or a remote server said, so before it is stored it is cleaned:
//! NUL becomes the two characters `\0`, and the length is bounded. (A Rust `String` is already
//! valid UTF-8; bytes from outside are decoded lossily where they become a `String`.)

/// Most bytes of an error text kept in `last_error` and in each `error_history` entry.
pub const MAX_ERROR_BYTES: usize = 4096;

/// `text` without NUL, cut at a character boundary to at most [`MAX_ERROR_BYTES`] bytes; a cut
/// text ends in `…`.
pub fn error_text(text: &str) -> String {
    let mut out = if text.contains('\0') {
        text.replace('\0', "\\0")
    } else {
        text.to_string()
    };
    if out.len() > MAX_ERROR_BYTES {
        let end = out.floor_char_boundary(MAX_ERROR_BYTES - '…'.len_utf8());
        out.truncate(end);
        out.push('…');
    }
    out
}

/// Bytes from outside as text: invalid UTF-8 becomes U+FFFD, then as [`error_text`].
pub fn error_text_from_bytes(bytes: &[u8]) -> String {
    error_text(&String::from_utf8_lossy(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_escaped_and_the_rest_kept() {
        assert_eq!(error_text("bad\0thing"), "bad\\0thing");
        assert_eq!(error_text("plain"), "plain");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(error_text_from_bytes(b"a\xff\0b"), "a\u{fffd}\\0b");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = error_text(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(
            error_text(&"x".repeat(MAX_ERROR_BYTES)).len(),
            MAX_ERROR_BYTES
        );
    }
}
