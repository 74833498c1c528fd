//! The `purpose` of a grant request: the agent's own words, shown to the approver on the approval
//! page and relayed to the human in the agent's message.
//!
//! Guarantees: an accepted purpose is one line of visible text of at most [`MAX_PURPOSE_CHARS`]
//! characters. Control characters (CR, LF, tab, …), line and paragraph separators, bidirectional
//! controls (overrides, embeddings, isolates, marks), zero-width and other invisible format
//! characters (Unicode category Cf), private-use and unassigned code points are refused with an
//! error naming the character and its position, so the approver reads exactly what was requested.

use unicode_general_category::{GeneralCategory, get_general_category};

use super::{GrantError, invalid};

/// Longest accepted purpose, in characters.
pub const MAX_PURPOSE_CHARS: usize = 500;

/// Checks `raw` and returns it without surrounding spaces.
pub(super) fn validate(raw: &str) -> Result<&str, GrantError> {
    for (index, c) in raw.chars().enumerate() {
        if let Some(kind) = refused(c) {
            return Err(invalid(
                "purpose",
                format!(
                    "must be one line of visible text: character {} is {kind} (U+{:04X})",
                    index + 1,
                    u32::from(c)
                ),
            ));
        }
    }
    let purpose = raw.trim();
    if purpose.is_empty() {
        return Err(invalid(
            "purpose",
            "must say what the credentials are for (it is shown to the approver)",
        ));
    }
    if purpose.chars().count() > MAX_PURPOSE_CHARS {
        return Err(invalid(
            "purpose",
            format!("must be at most {MAX_PURPOSE_CHARS} characters"),
        ));
    }
    Ok(purpose)
}

/// Why `c` may not appear in a purpose, if it may not.
fn refused(c: char) -> Option<&'static str> {
    if matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
    {
        return Some(
            "a bidirectional control, which can make text read differently from what it says",
        );
    }
    match get_general_category(c) {
        GeneralCategory::Control => Some("a control character (line breaks and tabs included)"),
        GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator => {
            Some("a line or paragraph separator")
        }
        GeneralCategory::Format => {
            Some("an invisible formatting character (zero-width or similar)")
        }
        GeneralCategory::PrivateUse | GeneralCategory::Surrogate | GeneralCategory::Unassigned => {
            Some("a private-use or unassigned code point")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(raw: &str) -> String {
        validate(raw).unwrap_err().to_string()
    }

    #[test]
    fn plain_text_in_any_script_is_accepted_and_trimmed() {
        for ok in [
            "run the staging migration",
            "  déployer la base — v2 ✓ 🚀  ",
            "מיגרציה של staging",
            "ステージングの移行",
        ] {
            assert_eq!(validate(ok).unwrap(), ok.trim());
        }
        let longest = "x".repeat(MAX_PURPOSE_CHARS);
        assert_eq!(validate(&longest).unwrap(), longest);
    }

    #[test]
    fn invisible_and_line_breaking_characters_are_refused_by_name() {
        let cases = [
            (
                "deploy\nApproved by security",
                "character 7 is a control character",
                "U+000A",
            ),
            ("deploy\r\nok", "control character", "U+000D"),
            ("tab\there", "control character", "U+0009"),
            ("bell\u{7}", "control character", "U+0007"),
            ("nel\u{85}", "control character", "U+0085"),
            ("read \u{202E}txt.exe", "bidirectional control", "U+202E"),
            ("\u{202A}embedded", "bidirectional control", "U+202A"),
            (
                "isolate \u{2066}x\u{2069}",
                "bidirectional control",
                "U+2066",
            ),
            ("first strong \u{2068}", "bidirectional control", "U+2068"),
            ("mark\u{200F}", "bidirectional control", "U+200F"),
            (
                "zero\u{200B}width",
                "invisible formatting character",
                "U+200B",
            ),
            ("joiner\u{200D}", "invisible formatting character", "U+200D"),
            ("\u{FEFF}bom", "invisible formatting character", "U+FEFF"),
            (
                "soft\u{AD}hyphen",
                "invisible formatting character",
                "U+00AD",
            ),
            ("tag\u{E0041}", "invisible formatting character", "U+E0041"),
            ("line\u{2028}sep", "line or paragraph separator", "U+2028"),
            ("para\u{2029}sep", "line or paragraph separator", "U+2029"),
            ("private\u{E000}", "private-use or unassigned", "U+E000"),
            ("unassigned\u{FFFF}", "private-use or unassigned", "U+FFFF"),
        ];
        for (raw, kind, code) in cases {
            let text = message(raw);
            assert!(
                text.starts_with("purpose: must be one line of visible text")
                    && text.contains(kind)
                    && text.contains(code),
                "{raw:?}: {text}"
            );
        }
    }

    #[test]
    fn empty_and_overlong_purposes_are_refused() {
        assert!(message("   ").contains("must say what the credentials are for"));
        assert!(message(&"x".repeat(MAX_PURPOSE_CHARS + 1)).contains("at most 500 characters"));
    }
}
