//! Redaction throughput with exactly 1,000 patterns (secrets × their encodings) against a plain
//! aho-corasick scan for the same 1,000 patterns over the same text, measured in the same run.
//!
//! Texts of 4 MiB: varied log lines with no secret in them (the common case); the same with one
//! secret, in one of its encodings, every 4 KiB; and, as the worst case, `sk_live_` (the head of
//! many patterns) repeated. The redactor is fed 64 KiB chunks, as the runner reads a pipe. The
//! baselines count matches over the whole text with `AhoCorasick::new` (default settings,
//! prefilter included) and with a leftmost-longest aho-corasick DFA (what the redactor used
//! before). Rounds alternate between all measurements so that each sees the same load; the
//! fastest round (the least disturbed by other processes) and the median are printed. One thread:
//! the figures are per core.
//!
//! `cargo bench -p custodian-redact [-- --rounds N] [--patterns N]`. Budget with 1,000 patterns:
//! ≥ 1 GB/s without matches and ≥ 0.5 GB/s with one match per 4 KiB.

use std::collections::BTreeSet;
use std::time::Instant;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use custodian_redact::{Redactor, patterns_of};

const TEXT_LEN: usize = 4 << 20;
const MATCH_EVERY: usize = 4 << 10;
const CHUNK: usize = 64 << 10;

/// splitmix64: deterministic, so every run measures the same secrets and text.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick(&mut self, alphabet: &[u8], len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| alphabet[self.below(alphabet.len())])
            .collect()
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const HEX: &[u8] = b"0123456789abcdef";

/// One high-entropy secret of the kinds commands print: prefixed API keys, hex tokens, base64 keys,
/// passwords with punctuation (their percent and JSON forms differ), binary keys.
fn candidate(rng: &mut Rng, kind: usize) -> Vec<u8> {
    match kind % 6 {
        0 => [b"sk_live_".as_slice(), &rng.pick(ALNUM, 24)].concat(),
        1 => [b"ghp_".as_slice(), &rng.pick(ALNUM, 36)].concat(),
        2 => rng.pick(HEX, 40),
        3 => STANDARD
            .encode((0..30).map(|_| rng.next() as u8).collect::<Vec<_>>())
            .into_bytes(),
        4 => rng.pick(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
            20,
        ),
        _ => (0..32).map(|_| rng.next() as u8).collect(),
    }
}

/// Secrets whose patterns number exactly `patterns`.
fn secrets(patterns: usize) -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng(0x5eed);
    let mut secrets = Vec::new();
    let mut total = 0;
    let mut kind = 0;
    while total < patterns {
        assert!(
            kind < 1_000_000,
            "no secret fits the last {} patterns",
            patterns - total
        );
        let value = candidate(&mut rng, kind);
        kind += 1;
        let n = patterns_of(&value).len();
        // End exactly, or leave room for at least one more secret (none has fewer than 6).
        let room = patterns - total;
        if n == room || n + 6 <= room {
            total += n;
            secrets.push((format!("SECRET_{}", secrets.len()), value));
        }
    }
    secrets
}

/// Varied log lines (timestamps, ids, hex trace ids, sizes), `TEXT_LEN` bytes; with `secrets`,
/// one of their encodings is written every [`MATCH_EVERY`] bytes. Returns the text and the number
/// of secrets written.
fn text(rng: &mut Rng, secrets: &[(String, Vec<u8>)]) -> (Vec<u8>, u64) {
    let users = ["alice", "bob", "carol", "deploy-bot", "ci"];
    let paths = [
        "/api/v1/items",
        "/api/v1/users",
        "/healthz",
        "/api/v2/orders",
    ];
    let mut out = Vec::with_capacity(TEXT_LEN + 4096);
    let mut written = 0u64;
    let mut next_secret = MATCH_EVERY;
    while out.len() < TEXT_LEN {
        if !secrets.is_empty() && out.len() >= next_secret {
            let value = &secrets[written as usize % secrets.len()].1;
            let form = match written % 4 {
                0 => value.clone(),
                1 => STANDARD.encode(value).into_bytes(),
                2 => URL_SAFE_NO_PAD.encode(value).into_bytes(),
                _ => value
                    .iter()
                    .flat_map(|b| format!("{b:02x}").into_bytes())
                    .collect(),
            };
            out.extend_from_slice(b"debug: token=");
            out.extend_from_slice(&form);
            out.push(b'\n');
            written += 1;
            next_secret += MATCH_EVERY;
        }
        let line = format!(
            "2026-11-28T20:{:02}:{:02}.{:03}Z INFO request served path={}/{} status={} bytes={} user={} trace={:016x}\n",
            rng.below(60),
            rng.below(60),
            rng.below(1000),
            paths[rng.below(paths.len())],
            rng.below(100_000),
            [200, 200, 200, 201, 404, 500][rng.below(6)],
            rng.below(1 << 20),
            users[rng.below(users.len())],
            rng.next(),
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(TEXT_LEN);
    (out, written)
}

/// A scan of a whole text that returns how many matches it found (so it cannot be optimised away).
type Scan<'a> = dyn Fn(&[u8]) -> u64 + 'a;

fn redact(redactor: &Redactor, text: &[u8]) -> (usize, u64) {
    let mut stream = redactor.stream();
    let mut len = 0;
    for chunk in text.chunks(CHUNK) {
        len += stream.push(chunk).len();
    }
    let (rest, counts) = stream.finish();
    (len + rest.len(), counts.values().sum())
}

fn gb_per_s(seconds: f64) -> f64 {
    TEXT_LEN as f64 / seconds / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |n| n.parse().expect("a number"))
    };
    let rounds = arg("--rounds", 15);
    let count = arg("--patterns", 1000);

    let secrets = secrets(count);
    let started = Instant::now();
    let redactor = Redactor::new(secrets.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
        .expect("valid secrets");
    let built = started.elapsed();
    let patterns: BTreeSet<Vec<u8>> = secrets
        .iter()
        .flat_map(|(_, v)| patterns_of(v))
        .map(|p| p.to_vec())
        .collect();
    assert_eq!(redactor.pattern_count(), count);
    assert_eq!(patterns.len(), count);
    let plain = AhoCorasick::new(&patterns).expect("patterns");
    let dfa = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .kind(Some(AhoCorasickKind::DFA))
        .build(&patterns)
        .expect("patterns");

    let mut rng = Rng(42);
    let (clean, _) = text(&mut rng, &[]);
    let (dirty, written) = text(&mut rng, &secrets);
    assert_eq!(
        redact(&redactor, &clean).1,
        0,
        "no secret in the clean text"
    );
    assert_eq!(
        redact(&redactor, &dirty).1,
        written,
        "every secret redacted"
    );
    assert!(plain.find_iter(&dirty).count() as u64 >= written);

    let engines: [(&str, &Scan); 3] = [
        ("redactor", &|text| redact(&redactor, text).1),
        ("aho-corasick", &|text| plain.find_iter(text).count() as u64),
        ("a-c DFA", &|text| dfa.find_iter(text).count() as u64),
    ];
    // The worst case: a head that many patterns share, at every 8th byte.
    let adversarial: Vec<u8> = b"sk_live_".iter().copied().cycle().take(TEXT_LEN).collect();
    let cases: [(&str, &[u8], Option<f64>); 3] = [
        ("no matches", &clean, Some(1.0)),
        ("one match per 4 KiB", &dirty, Some(0.5)),
        ("sk_live_ repeated", &adversarial, None),
    ];
    let mut samples = vec![vec![Vec::new(); engines.len()]; cases.len()];
    for _ in 0..rounds {
        for (case, (_, text, _)) in cases.iter().enumerate() {
            for (engine, (_, run)) in engines.iter().enumerate() {
                let t = Instant::now();
                std::hint::black_box(run(std::hint::black_box(text)));
                samples[case][engine].push(gb_per_s(t.elapsed().as_secs_f64()));
            }
        }
    }

    println!(
        "{} secrets -> {} patterns (redactor built in {:.1} ms); 4 MiB texts; redactor fed 64 KiB \
         chunks; GB/s over {rounds} rounds: fastest (median); one thread",
        secrets.len(),
        redactor.pattern_count(),
        built.as_secs_f64() * 1e3,
    );
    print!("{:<20}", "text");
    for (name, _) in &engines {
        print!(" {name:>14}");
    }
    println!(" {:>12} {:>12}", "vs best a-c", "budget");
    for ((name, _, budget), samples) in cases.iter().zip(samples) {
        let figures: Vec<(f64, f64)> = samples
            .into_iter()
            .map(|v| (v.iter().copied().fold(0.0, f64::max), median(v)))
            .collect();
        print!("{name:<20}");
        for (fastest, median) in &figures {
            print!(" {:>14}", format!("{fastest:.2} ({median:.2})"));
        }
        let ours = figures[0].0;
        let best = figures[1..].iter().map(|f| f.0).fold(0.0, f64::max);
        match budget.filter(|_| count == 1000) {
            Some(budget) => {
                let verdict = if ours >= budget { "met" } else { "MISSED" };
                println!(" {:>11.1}× {budget:>5.1} {verdict:>6}", ours / best);
            }
            None => println!(" {:>11.1}× {:>12}", ours / best, "-"),
        }
    }
}
