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
fn control_characters_are_matched_as_json_prints_them() {
    let value = b"tab\there\x01and\x1fend";
    assert_eq!(json_escape(value), b"tab\\there\\u0001and\\u001fend");
    let r = Redactor::new([("J", value.as_slice())]).unwrap();
    let (out, counts) = r.redact(br#"{"v":"tab\there\u0001and\u001fend"}"#);
    assert_eq!(out, br#"{"v":"[REDACTED:J]"}"#);
    assert_eq!(counts["J"], 1);
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// With several secrets and their encodings in the output, streaming gives the one-shot result
    /// (text and counts) for chunks shorter and longer than the longest pattern.
    #[test]
    fn any_chunking_gives_the_one_shot_result(
        secrets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 8..24), 1..4),
        pieces in proptest::collection::vec(
            (any::<proptest::sample::Index>(), proptest::collection::vec(any::<u8>(), 0..40)),
            0..10,
        ),
        chunks in proptest::collection::vec(1usize..160, 1..12),
    ) {
        let names: Vec<String> = (0..secrets.len()).map(|i| format!("S{i}")).collect();
        let r = Redactor::new(names.iter().map(String::as_str).zip(secrets.iter().map(Vec::as_slice)))
            .unwrap();
        let forms: Vec<Vec<u8>> = secrets.iter().flat_map(|s| patterns_of(s)).map(|f| f.to_vec()).collect();
        let mut input = Vec::new();
        for (form, filler) in &pieces {
            input.extend_from_slice(filler);
            input.extend_from_slice(form.get(&forms).as_slice());
        }
        let (whole, whole_counts) = r.redact(&input);
        if !pieces.is_empty() {
            prop_assert!(!whole_counts.is_empty());
        }
        let mut stream = r.stream();
        let mut out = Vec::new();
        let mut rest = input.as_slice();
        for size in chunks.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, after) = rest.split_at((*size).min(rest.len()));
            stream.push_into(chunk, &mut out);
            prop_assert!(stream.held_back() < r.patterns.max_len());
            rest = after;
        }
        let (tail, counts) = stream.finish();
        out.extend(tail);
        prop_assert_eq!(out, whole);
        prop_assert_eq!(counts, whole_counts);
    }
}

/// Leftmost-longest replacement by brute force: at each position, the longest pattern of any
/// secret that begins there (a pattern shared by secrets belongs to the first).
fn reference(secrets: &[(String, Vec<u8>)], input: &[u8]) -> (Vec<u8>, Counts) {
    let mut patterns: Vec<(Vec<u8>, usize)> = Vec::new();
    for (owner, (_, value)) in secrets.iter().enumerate() {
        for form in patterns_of(value) {
            if !patterns.iter().any(|(p, _)| *p == *form) {
                patterns.push((form.to_vec(), owner));
            }
        }
    }
    let (mut out, mut counts, mut at) = (Vec::new(), Counts::new(), 0);
    while at < input.len() {
        let longest = patterns
            .iter()
            .filter(|(p, _)| input[at..].starts_with(p))
            .max_by_key(|(p, _)| p.len());
        if let Some((pattern, owner)) = longest {
            let name = &secrets[*owner].0;
            out.extend_from_slice(format!("[REDACTED:{name}]").as_bytes());
            *counts.entry(name.clone()).or_default() += 1;
            at += pattern.len();
        } else {
            out.push(input[at]);
            at += 1;
        }
    }
    (out, counts)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Secrets over a two-letter alphabet share first bytes and are prefixes of one another; the
    /// redactor still replaces exactly what the brute-force reference does.
    #[test]
    fn overlapping_secrets_are_replaced_like_the_reference(
        values in proptest::collection::vec(proptest::collection::vec(
            proptest::sample::select(b"ab".to_vec()), 8..14), 1..6),
        pieces in proptest::collection::vec(
            (any::<proptest::sample::Index>(),
             proptest::collection::vec(proptest::sample::select(b"ab=".to_vec()), 0..12)),
            0..8,
        ),
    ) {
        let secrets: Vec<(String, Vec<u8>)> =
            values.into_iter().enumerate().map(|(i, v)| (format!("S{i}"), v)).collect();
        let r = Redactor::new(secrets.iter().map(|(n, v)| (n.as_str(), v.as_slice()))).unwrap();
        let forms: Vec<Vec<u8>> =
            secrets.iter().flat_map(|(_, v)| patterns_of(v)).map(|f| f.to_vec()).collect();
        let mut input = Vec::new();
        for (form, filler) in &pieces {
            input.extend_from_slice(filler);
            input.extend_from_slice(form.get(&forms).as_slice());
        }
        prop_assert_eq!(r.redact(&input), reference(&secrets, &input));
    }
}
