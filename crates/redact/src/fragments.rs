//! The pieces of a credential file that a command can print on their own, beyond the file itself
//! and its lines (which [`crate::patterns_of`] covers): the secret tokens inside structured text
//! (a kubeconfig's `client-key-data`, a service-account JSON's `private_key` whose lines are
//! `\n` escapes), what those tokens decode to when they are base64 (a PEM inside a kubeconfig),
//! each line trimmed of its indentation, and for a binary file (DER) its base64 wrapped as PEM
//! (64 columns) and as `base64` prints it (76 columns).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use crate::MIN_SECRET_LEN;

/// Shortest token taken from structured text: shorter runs are words and numbers, not keys.
const MIN_TOKEN_LEN: usize = 16;

/// Pieces of `content` to redact as the same secret, each at least [`MIN_SECRET_LEN`] bytes,
/// without duplicates (the content itself and its raw lines excepted: the redactor adds those).
pub fn file_fragments(content: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut out: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    if std::str::from_utf8(content).is_err() {
        let encoded = Zeroizing::new(STANDARD.encode(content).into_bytes());
        for width in [64, 76] {
            for line in encoded.chunks(width) {
                add(&mut out, line);
            }
        }
        return out;
    }
    text_fragments(content, &mut out, true);
    out
}

fn add(out: &mut Vec<Zeroizing<Vec<u8>>>, piece: &[u8]) {
    if piece.len() >= MIN_SECRET_LEN && !out.iter().any(|p| p.as_slice() == piece) {
        out.push(Zeroizing::new(piece.to_vec()));
    }
}

fn text_fragments(text: &[u8], out: &mut Vec<Zeroizing<Vec<u8>>>, decode: bool) {
    // JSON and YAML write newlines inside strings as `\n`: the value a command prints has them.
    let mut unescaped = Zeroizing::new(Vec::with_capacity(text.len()));
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'\\' && text.get(i + 1) == Some(&b'n') {
            unescaped.push(b'\n');
            i += 2;
        } else {
            unescaped.push(text[i]);
            i += 1;
        }
    }
    for line in unescaped.split(|b| *b == b'\n') {
        add(out, line.trim_ascii());
    }
    let is_token_byte =
        |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-');
    for token in unescaped.split(|b| !is_token_byte(b)) {
        let unpadded = token.len() - token.iter().rev().take_while(|b| **b == b'=').count();
        let token = &token[..unpadded];
        let secret_like = token.len() >= MIN_TOKEN_LEN
            && token.iter().any(u8::is_ascii_digit)
            && token.iter().any(u8::is_ascii_alphabetic);
        if !secret_like {
            continue;
        }
        add(out, token);
        if decode {
            let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(token)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token));
            if let Ok(decoded) = decoded {
                let decoded = Zeroizing::new(decoded);
                if std::str::from_utf8(&decoded).is_ok() {
                    add(out, &decoded);
                    for line in decoded.split(|b| *b == b'\n') {
                        add(out, line.trim_ascii());
                    }
                    text_fragments(&decoded, out, false);
                } else {
                    add(out, &decoded);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Redactor;

    fn redacted(content: &[u8], output: &[u8]) -> Vec<u8> {
        let fragments = file_fragments(content);
        let redactor = Redactor::new(
            std::iter::once(("F", content)).chain(fragments.iter().map(|f| ("F", f.as_slice()))),
        )
        .unwrap();
        redactor.redact(output).0
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    const KEY_BODY: [&str; 3] = [
        "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQ1n7mYpC0zWkA3c",
        "Xq9v2Lr8sT4u6Yw1eE5oPz7hRsKhRANCAAS8cQn5x1YH0mJpAjZ6bV3dFgTkWl9",
        "Nr4Ue2Oi7Pq1Ks8Ht5Gf3Dc0Ba6Zy9Xw",
    ];

    /// A made-up key in PEM armour. The label is put together here so that secret scanners do not
    /// take this file for one holding a private key.
    fn pem() -> String {
        let label = ["PRIVATE", "KEY"].join(" ");
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            KEY_BODY.join("\n")
        )
    }

    #[test]
    fn pem_body_lines_are_caught_alone() {
        let pem = pem();
        for line in KEY_BODY {
            let out = redacted(pem.as_bytes(), format!("x {line} y").as_bytes());
            assert!(
                !contains(&out, line.as_bytes()),
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
    }

    #[test]
    fn a_key_inside_json_is_caught_as_the_command_prints_it() {
        let json = format!(
            "{{\"type\": \"service_account\", \"private_key_id\": \"8c2f0e91ab34cd56ef7890a1b2c3d4e5f6a7b8c9\", \"private_key\": \"{}\"}}",
            pem().replace('\n', "\\n")
        );
        // `jq -r .private_key` prints real newlines.
        let out = redacted(json.as_bytes(), pem().as_bytes());
        for line in KEY_BODY {
            assert!(
                !contains(&out, line.as_bytes()),
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
        let out = redacted(
            json.as_bytes(),
            b"id=8c2f0e91ab34cd56ef7890a1b2c3d4e5f6a7b8c9",
        );
        assert!(
            !contains(&out, b"8c2f0e91ab34"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn a_key_inside_a_kubeconfig_is_caught_decoded_and_alone() {
        let data = STANDARD.encode(pem());
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nusers:\n- name: ci\n  user:\n    client-key-data: {data}\n"
        );
        // `yq .users[0].user.client-key-data | base64 -d`
        let out = redacted(kubeconfig.as_bytes(), pem().as_bytes());
        for line in KEY_BODY {
            assert!(
                !contains(&out, line.as_bytes()),
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
        let out = redacted(kubeconfig.as_bytes(), format!("{data}\n").as_bytes());
        assert!(!contains(&out, &data.as_bytes()[..32]));
        // Key names and short words are not patterns.
        let out = redacted(kubeconfig.as_bytes(), b"client-key-data kind users");
        assert_eq!(out, b"client-key-data kind users");
    }

    #[test]
    fn a_binary_file_is_caught_as_pem_and_as_base64_prints_it() {
        let der: Vec<u8> = (0..300u32).map(|i| (i * 7 + 0x81) as u8).collect();
        let encoded = STANDARD.encode(&der);
        for width in [64, 76] {
            let wrapped: Vec<&[u8]> = encoded.as_bytes().chunks(width).collect();
            let output = wrapped.join(&b'\n');
            let out = redacted(&der, &output);
            for line in &wrapped[..wrapped.len() - 1] {
                assert!(!contains(&out, line), "{}", String::from_utf8_lossy(&out));
            }
        }
    }
}
