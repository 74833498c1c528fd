use super::*;
use proptest::prelude::*;

const CANARY: &[u8] = b"canary-S3cr3t/+value=42";

fn redactor() -> Redactor {
    Redactor::new([("API_KEY", CANARY)]).unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn refuses_values_too_short_to_redact() {
    let err = Redactor::new([("PIN", b"1234567".as_slice())]).unwrap_err();
    assert_eq!(err, RedactError::TooShort("PIN".into()));
    assert!(err.to_string().contains("shorter than 8 bytes"));
}

#[test]
fn raw_value_is_replaced_and_counted() {
    let (out, counts) =
        redactor().redact(b"token=canary-S3cr3t/+value=42; again canary-S3cr3t/+value=42\n");
    assert_eq!(out, b"token=[REDACTED:API_KEY]; again [REDACTED:API_KEY]\n");
    assert_eq!(counts["API_KEY"], 2);
}

#[test]
fn every_listed_encoding_is_caught_at_every_alignment() {
    let r = redactor();
    for prefix in ["", "a", "ab", "abc"] {
        for suffix in ["", "z", "zz"] {
            let mut plain = prefix.as_bytes().to_vec();
            plain.extend_from_slice(CANARY);
            plain.extend_from_slice(suffix.as_bytes());
            for encoded in [
                STANDARD.encode(&plain),
                STANDARD_NO_PAD.encode(&plain),
                URL_SAFE.encode(&plain),
                URL_SAFE_NO_PAD.encode(&plain),
            ] {
                let (out, counts) = r.redact(encoded.as_bytes());
                let found = counts.get("API_KEY").copied().unwrap_or(0);
                assert_eq!(found, 1, "{encoded} not caught");
                // At most the characters shared with the unknown bytes around the secret remain:
                // everything else of its encoding was replaced.
                let label = "[REDACTED:API_KEY]".len();
                let min_core = (CANARY.len() - 2) / 3 * 4;
                assert!(out.len() - label <= encoded.len() - min_core, "{encoded}");
            }
        }
    }
    let forms = [
        hex(CANARY, b"0123456789abcdef"),
        hex(CANARY, b"0123456789ABCDEF"),
        percent_encode(CANARY),
        json_escape(b"a\"quote\\and\nnewline-in-secret"),
    ];
    for form in &forms[..3] {
        let (out, counts) = r.redact(form);
        assert_eq!(
            out,
            b"[REDACTED:API_KEY]",
            "{}",
            String::from_utf8_lossy(form)
        );
        assert_eq!(counts["API_KEY"], 1);
    }
    let escaped = Redactor::new([("J", b"a\"quote\\and\nnewline-in-secret".as_slice())]).unwrap();
    let (out, _) = escaped.redact(&[b"{\"v\":\"".as_slice(), &forms[3], b"\"}"].concat());
    assert_eq!(out, b"{\"v\":\"[REDACTED:J]\"}");
}

#[test]
fn each_line_of_a_multi_line_value_is_caught_alone() {
    let key = b"-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nshort\n-----END KEY-----";
    let r = Redactor::new([("PEM", key.as_slice())]).unwrap();
    let (out, counts) = r.redact(b"line: MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nshort stays\n");
    assert_eq!(out, b"line: [REDACTED:PEM]\nshort stays\n");
    assert_eq!(counts["PEM"], 1);
}

#[test]
fn longest_match_wins_when_secrets_overlap() {
    let r = Redactor::new([
        ("SHORT", b"abcdefgh".as_slice()),
        ("LONG", b"abcdefghijkl".as_slice()),
    ])
    .unwrap();
    let mut stream = r.stream();
    let mut out = stream.push(b"xx abcdefgh");
    out.extend(stream.push(b"ijkl yy"));
    let (rest, counts) = stream.finish();
    out.extend(rest);
    assert_eq!(out, b"xx [REDACTED:LONG] yy");
    assert_eq!(counts.get("SHORT"), None);
}

#[test]
fn only_a_possible_match_start_is_held_back() {
    let r = redactor();
    let mut stream = r.stream();
    assert_eq!(
        stream.push(b"hello world, no secret here\n"),
        b"hello world, no secret here\n"
    );
    assert_eq!(stream.held_back(), 0);
    let out = stream.push(b"partial: canary-S3");
    assert_eq!(out, b"partial: ");
    assert_eq!(stream.held_back(), "canary-S3".len());
    let out = stream.push(b"x done");
    assert_eq!(out, b"canary-S3x done");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A secret placed at any offset and split at every chunk boundary is always redacted, and the
    /// streamed result equals the one-shot result.
    #[test]
    fn secret_at_any_offset_split_anywhere_is_redacted(
        before in proptest::collection::vec(any::<u8>(), 0..40),
        after in proptest::collection::vec(any::<u8>(), 0..40),
        secret in proptest::collection::vec(any::<u8>(), 8..24),
    ) {
        let r = Redactor::new([("S", secret.as_slice())]).unwrap();
        let input = [before.as_slice(), &secret, &after].concat();
        let (whole, counts) = r.redact(&input);
        prop_assert!(!contains(&whole, &secret));
        prop_assert!(counts["S"] >= 1);
        for split in 0..=input.len() {
            let mut stream = r.stream();
            let mut out = stream.push(&input[..split]);
            out.extend(stream.push(&input[split..]));
            let (rest, _) = stream.finish();
            out.extend(rest);
            prop_assert_eq!(&out, &whole, "split at {}", split);
        }
        // Byte by byte, too.
        let mut stream = r.stream();
        let mut out = Vec::new();
        for b in &input {
            out.extend(stream.push(std::slice::from_ref(b)));
        }
        out.extend(stream.finish().0);
        prop_assert_eq!(out, whole);
    }

    /// Output that contains none of the patterns comes out byte for byte, however it is chunked.
    #[test]
    fn output_without_secrets_is_unchanged(
        input in proptest::collection::vec(0u8..=0x7e, 0..300),
        chunk in 1usize..50,
    ) {
        // '\x7f' never occurs in the input, so no pattern of this secret can.
        let r = Redactor::new([("S", b"\x7f\x7f\x7f\x7f\x7f\x7f\x7f\x7f".as_slice())]).unwrap();
        let mut stream = r.stream();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            out.extend(stream.push(piece));
        }
        let (rest, counts) = stream.finish();
        out.extend(rest);
        prop_assert_eq!(out, input);
        prop_assert!(counts.is_empty());
    }
}
