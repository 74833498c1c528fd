//! Redaction throughput with 100 secrets (about a thousand patterns with their encodings) against
//! a plain aho-corasick scan for the same raw values over the same data, measured in the same run.
//! The figure is the ratio; the budget is ≥ 1 GB/s per core.

use aho_corasick::AhoCorasick;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use custodian_redact::Redactor;

fn data() -> Vec<u8> {
    // Log-like text with no secrets in it (the common case), 4 MiB.
    let line = b"2026-11-28T20:00:00Z INFO request served path=/api/v1/items status=200 bytes=5120 user=alice\n";
    line.iter().copied().cycle().take(4 << 20).collect()
}

fn secrets() -> Vec<(String, Vec<u8>)> {
    (0..100)
        .map(|i| {
            (
                format!("SECRET_{i}"),
                format!("sk_live_{i:04}_q8Zr2TfWx9LmPa7Vn3Kd").into_bytes(),
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let data = data();
    let secrets = secrets();
    let redactor = Redactor::new(secrets.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
        .expect("valid secrets");
    // The baseline scans for the raw values only, with the crate's default settings.
    let plain = AhoCorasick::new(secrets.iter().map(|(_, v)| v.as_slice())).expect("patterns");
    eprintln!(
        "{} secrets -> {} patterns",
        secrets.len(),
        redactor.pattern_count()
    );
    let mut group = c.benchmark_group("redact_4MiB");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("plain_aho_corasick_raw_values", |b| {
        b.iter(|| plain.find_iter(&data).count())
    });
    group.bench_function("redactor_64KiB_chunks", |b| {
        b.iter(|| {
            let mut stream = redactor.stream();
            let mut total = 0;
            for chunk in data.chunks(64 << 10) {
                total += stream.push(chunk).len();
            }
            total + stream.finish().0.len()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
