//! Snapshot codec throughput: Dory's `encode_state` and `decode_state` beside the same work done
//! by hand (bincode + zstd at the same level, and postcard + zstd), on word-count state of about
//! 1 KiB, 1 MiB and 64 MiB.
//!
//! `cargo bench -p dory-benches --bench codec` runs criterion, then a short interleaved pass that
//! prints Dory's throughput as a ratio of the hand-made bincode + zstd path for each size. The
//! goal is a ratio of at least 0.9: the header, checksum and bounds checks should cost little.
//! `DORY_CODEC_RATIO_ONLY=1` skips criterion and runs only that pass.
//!
//! Throughput is counted in bytes of the state as bincode serializes it, for every column, so
//! the postcard figures compare directly.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use dory_core::snapshot::{self, Encoder, Limits};
use dory_core::{Epoch, ProcessorId, Sequence};
use serde::{Deserialize, Serialize};

const LEVEL: i32 = Encoder::DEFAULT_LEVEL;
const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// What a streaming word count keeps: counts per word and the records of the current window
/// that are not yet emitted.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WordCountState {
    window_start: u64,
    processed: u64,
    counts: BTreeMap<String, u64>,
    pending: Vec<u8>,
}

/// xorshift64*: deterministic, so every run measures the same state.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SYLLABLES: [&str; 32] = [
    "ka", "to", "ri", "mo", "ne", "sa", "lu", "pi", "da", "fe", "go", "hu", "ji", "ze", "wa", "yo",
    "ban", "cor", "del", "fin", "gar", "hol", "mir", "nor", "pol", "ras", "sel", "tin", "ver",
    "wex", "yar", "zul",
];

fn word(rng: &mut Rng) -> String {
    let mut w = String::new();
    for _ in 0..2 + rng.below(3) {
        w.push_str(SYLLABLES[rng.below(SYLLABLES.len() as u64) as usize]);
    }
    if rng.below(4) == 0 {
        w.push_str(&rng.below(1000).to_string());
    }
    w
}

/// State whose bincode form is about `target` bytes: half word counts, half pending records.
fn state(target: usize) -> WordCountState {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut counts = BTreeMap::new();
    let mut map_bytes = 0;
    while map_bytes < target / 2 {
        let w = word(&mut rng);
        // Skewed towards small counts, as word frequencies are.
        let bits = 1 + rng.below(20);
        let count = rng.below(1 << bits);
        let len = w.len();
        if counts.insert(w, count).is_none() {
            map_bytes += 1 + len + if count < 251 { 1 } else { 3 };
        }
    }
    let mut pending = Vec::with_capacity(target / 2 + 64);
    let mut ts = 1_700_000_000_000u64;
    while pending.len() < target / 2 {
        ts += rng.below(50);
        let record = format!(
            "{{\"ts\":{ts},\"word\":\"{}\",\"n\":{}}}\n",
            word(&mut rng),
            rng.below(100)
        );
        pending.extend_from_slice(record.as_bytes());
    }
    pending.truncate(target / 2);
    WordCountState {
        window_start: ts - 60_000,
        processed: ts,
        counts,
        pending,
    }
}

struct Case {
    label: &'static str,
    state: WordCountState,
    /// The bincode body's length: the unit of every throughput figure.
    body_len: usize,
    dory: Vec<u8>,
    raw: Vec<u8>,
    postcard: Vec<u8>,
    postcard_len: usize,
}

fn processor() -> ProcessorId {
    ProcessorId::new("word-count").expect("a valid id")
}

fn encode_dory(state: &WordCountState) -> Vec<u8> {
    Encoder::new(LEVEL)
        .encode_state(&processor(), Epoch(7), Sequence(42), state)
        .expect("encode")
}

fn decode_dory(bytes: &[u8]) -> WordCountState {
    snapshot::decode_state(bytes, &Limits::default())
        .expect("decode")
        .1
}

fn encode_raw(state: &WordCountState) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(state, bincode::config::standard()).expect("encode");
    zstd::bulk::compress(&body, LEVEL).expect("compress")
}

fn decode_raw(bytes: &[u8], body_len: usize) -> WordCountState {
    let body = zstd::bulk::decompress(bytes, body_len).expect("decompress");
    bincode::serde::decode_from_slice(&body, bincode::config::standard())
        .expect("decode")
        .0
}

fn encode_postcard(state: &WordCountState) -> Vec<u8> {
    let body = postcard::to_allocvec(state).expect("encode");
    zstd::bulk::compress(&body, LEVEL).expect("compress")
}

fn decode_postcard(bytes: &[u8], body_len: usize) -> WordCountState {
    let body = zstd::bulk::decompress(bytes, body_len).expect("decompress");
    postcard::from_bytes(&body).expect("decode")
}

fn case(label: &'static str, target: usize) -> Case {
    let state = state(target);
    let body_len = bincode::serde::encode_to_vec(&state, bincode::config::standard())
        .expect("encode")
        .len();
    let postcard_len = postcard::to_allocvec(&state).expect("encode").len();
    let dory = encode_dory(&state);
    assert_eq!(decode_dory(&dory), state, "{label}: Dory round trip");
    let raw = encode_raw(&state);
    let postcard = encode_postcard(&state);
    Case {
        label,
        state,
        body_len,
        dory,
        raw,
        postcard,
        postcard_len,
    }
}

fn bench(c: &mut Criterion, case: &Case) {
    let Case { label, state, .. } = case;
    let large = case.body_len > 16 * MIB;

    let mut group = c.benchmark_group(format!("codec-encode-{label}"));
    group.throughput(Throughput::Bytes(case.body_len as u64));
    tune(&mut group, large);
    group.bench_function(BenchmarkId::from_parameter("dory"), |b| {
        b.iter(|| encode_dory(black_box(state)))
    });
    group.bench_function(BenchmarkId::from_parameter("bincode+zstd"), |b| {
        b.iter(|| encode_raw(black_box(state)))
    });
    group.bench_function(BenchmarkId::from_parameter("postcard+zstd"), |b| {
        b.iter(|| encode_postcard(black_box(state)))
    });
    group.finish();

    let mut group = c.benchmark_group(format!("codec-decode-{label}"));
    group.throughput(Throughput::Bytes(case.body_len as u64));
    tune(&mut group, large);
    group.bench_function(BenchmarkId::from_parameter("dory"), |b| {
        b.iter(|| decode_dory(black_box(&case.dory)))
    });
    group.bench_function(BenchmarkId::from_parameter("bincode+zstd"), |b| {
        b.iter(|| decode_raw(black_box(&case.raw), case.body_len))
    });
    group.bench_function(BenchmarkId::from_parameter("postcard+zstd"), |b| {
        b.iter(|| decode_postcard(black_box(&case.postcard), case.postcard_len))
    });
    group.finish();
}

/// Keeps the whole run to a few minutes on two cores: a 64 MiB iteration takes a good part of
/// a second, so that size gets criterion's smallest sample.
fn tune(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, large: bool) {
    group.warm_up_time(Duration::from_secs(1));
    if large {
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .measurement_time(Duration::from_secs(4));
    } else {
        group
            .sample_size(30)
            .measurement_time(Duration::from_secs(3));
    }
}

/// The best time of one call of each of `fs`, measured in interleaved rounds so that drift in
/// the machine's speed hits every contender alike. The best round rather than the median,
/// because the noise on a shared 2-core machine (other builds) only ever adds time.
fn interleaved<const N: usize>(rounds: usize, batch: usize, fs: [&dyn Fn(); N]) -> [Duration; N] {
    let mut times = vec![Vec::with_capacity(rounds); N];
    for round in 0..rounds {
        // Rotating who goes first keeps the allocator's state after the previous contender
        // from favouring one of them.
        for i in (0..N).map(|i| (i + round) % N) {
            let start = Instant::now();
            for _ in 0..batch {
                fs[i]();
            }
            times[i].push(start.elapsed() / batch as u32);
        }
    }
    std::array::from_fn(|i| times[i].iter().copied().min().unwrap_or_default())
}

fn mib_per_s(bytes: usize, per_call: Duration) -> f64 {
    bytes as f64 / MIB as f64 / per_call.as_secs_f64()
}

fn ratios(case: &Case) {
    let Case { label, state, .. } = case;
    let (rounds, batch) = match case.body_len {
        n if n < 16 * KIB => (41, 2000),
        n if n < 16 * MIB => (21, 10),
        _ => (11, 1),
    };
    let encode = interleaved(
        rounds,
        batch,
        [
            &|| drop(black_box(encode_dory(black_box(state)))),
            &|| drop(black_box(encode_raw(black_box(state)))),
            &|| drop(black_box(encode_postcard(black_box(state)))),
        ],
    );
    let decode = interleaved(
        rounds,
        batch,
        [
            &|| drop(black_box(decode_dory(black_box(&case.dory)))),
            &|| drop(black_box(decode_raw(black_box(&case.raw), case.body_len))),
            &|| {
                drop(black_box(decode_postcard(
                    black_box(&case.postcard),
                    case.postcard_len,
                )))
            },
        ],
    );
    for (what, [dory, raw, postcard]) in [("encode", encode), ("decode", decode)] {
        let (dory, raw, postcard) = (
            mib_per_s(case.body_len, dory),
            mib_per_s(case.body_len, raw),
            mib_per_s(case.body_len, postcard),
        );
        println!(
            "codec {label} {what}: dory {dory:.0} MiB/s, raw {raw:.0} MiB/s, ratio {:.3}; postcard+zstd {postcard:.0} MiB/s",
            dory / raw
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    // `cargo test --benches` runs this without `--bench`: criterion then runs each benchmark
    // once, and the large state and the ratio pass are left out.
    let full = has("--bench") && !has("--test") && !has("--list");
    let ratio_only = full && std::env::var_os("DORY_CODEC_RATIO_ONLY").is_some();
    let sizes: &[(&str, usize)] = if full {
        &[("1KiB", KIB), ("1MiB", MIB), ("64MiB", 64 * MIB)]
    } else {
        &[("1KiB", KIB), ("1MiB", MIB)]
    };
    let cases: Vec<Case> = sizes
        .iter()
        .map(|&(label, target)| case(label, target))
        .collect();
    for case in &cases {
        println!(
            "codec {}: bincode body {} bytes, dory snapshot {} bytes, bincode+zstd {} bytes, postcard body {} bytes, postcard+zstd {} bytes",
            case.label,
            case.body_len,
            case.dory.len(),
            case.raw.len(),
            case.postcard_len,
            case.postcard.len()
        );
    }
    if !ratio_only {
        let mut c = Criterion::default().configure_from_args();
        for case in &cases {
            bench(&mut c, case);
        }
        c.final_summary();
    }
    if full {
        for case in &cases {
            ratios(case);
        }
    }
}
