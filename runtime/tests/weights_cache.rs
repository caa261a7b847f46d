//! Weight preparation and the compile cache: the streamed preparation equals a direct evaluation
//! of every recipe byte for byte (every fixture, f32 and bf16), and a cache entry is used when it
//! is sound and rebuilt when it is stale, truncated or corrupt, with concurrent writers leaving one
//! whole entry.

mod common;

use common::fixture;
use ouroc_driver::codec;
use ouroc_ir::{DType, ExitPolicy};
use ouroc_kernels::quant::{self, WeightScheme};
use ouroc_kernels::spec::Encoding;
use ouroc_kernels::{Program, Recipe};
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::cpu::ResidentWeights;
use ouroc_runtime::weights_cache::{Lookup, WeightsCache};
use std::collections::HashMap;

const FIXTURES: [&str; 6] = ["mha-r4", "gqa-hd", "tied", "r1", "sharded", "f16"];

fn program(ckpt: &Checkpoint, dtype: DType) -> Program {
    let opts = BuildOptions {
        dtype,
        policy: ExitPolicy::parse("threshold:0.5").unwrap(),
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_graph(ckpt, &opts).unwrap();
    ouroc_compile::compile_graph(g, false).unwrap().program
}

/// Weight `id` by its recipe, evaluated directly (recursively, nothing freed), rounded as the
/// preparation rounds each entry to its dtype.
fn direct(p: &Program, ckpt: &Checkpoint, id: u32, memo: &mut HashMap<u32, Vec<f32>>) -> Vec<f32> {
    if let Some(v) = memo.get(&id) {
        return v.clone();
    }
    let e = p.weight(id).unwrap();
    let v: Vec<f32> = match &e.recipe {
        Recipe::Checkpoint { tensor } => ckpt
            .read_f32(tensor)
            .unwrap()
            .into_iter()
            .map(|x| e.dtype.round(x))
            .collect(),
        Recipe::ScaleCols { w, s } => {
            let (w, s) = (direct(p, ckpt, *w, memo), direct(p, ckpt, *s, memo));
            w.iter()
                .enumerate()
                .map(|(i, x)| e.dtype.round(x * s[i % s.len()]))
                .collect()
        }
        Recipe::Concat { axis, parts } => {
            let outer: usize = e.shape[..*axis].iter().product();
            let parts: Vec<Vec<f32>> = parts.iter().map(|q| direct(p, ckpt, *q, memo)).collect();
            let mut out = Vec::new();
            for o in 0..outer {
                for q in &parts {
                    let block = q.len() / outer;
                    out.extend_from_slice(&q[o * block..(o + 1) * block]);
                }
            }
            out
        }
        Recipe::Slice { of, start, len } => {
            let row = *p.weight(*of).unwrap().shape.last().unwrap();
            direct(p, ckpt, *of, memo)
                .chunks(row)
                .flat_map(|r| r[*start..start + len].to_vec())
                .collect()
        }
    };
    memo.insert(id, v.clone());
    v
}

#[test]
fn streamed_preparation_equals_each_recipe_evaluated_directly() {
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        for (dtype, scheme) in [
            (DType::F32, WeightScheme::Dense),
            (DType::BF16, WeightScheme::Dense),
            (DType::BF16, WeightScheme::Q8),
            (DType::F32, WeightScheme::Q4),
        ] {
            let mut p = program(&ckpt, dtype);
            scheme.apply(&mut p);
            let streamed = ResidentWeights::encode(&p, &ckpt, true).unwrap();
            let mut memo = HashMap::new();
            let required = ResidentWeights::required(&p);
            assert!(!required.is_empty());
            for (w, d) in required {
                let values = direct(&p, &ckpt, w, &mut memo);
                let want = match d {
                    Encoding::Dense(dt) => codec::encode(&values, dt),
                    Encoding::Quant(q) => {
                        let shape = &p.weight(w).unwrap().shape;
                        quant::quantise(q, &values, shape[0], shape[1]).unwrap()
                    }
                };
                assert!(
                    streamed.get(w, d) == Some(&want[..]),
                    "{name} {dtype}: weight %{w} in {d} differs"
                );
            }
        }
    }
}

fn cache_with_entry(dir: &std::path::Path, ckpt: &Checkpoint, p: &Program) -> (WeightsCache, String, ResidentWeights) {
    let cache = WeightsCache::new(dir);
    let key = WeightsCache::key(p, &ckpt.identity()).unwrap();
    let w = ResidentWeights::encode(p, ckpt, true).unwrap();
    cache.store(&key, p, &w).unwrap();
    (cache, key, w)
}

fn same(a: &ResidentWeights, b: &ResidentWeights) -> bool {
    a.entries() == b.entries()
}

#[test]
fn a_cache_hit_maps_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&fixture("gqa-hd")).unwrap();
    let p = program(&ckpt, DType::BF16);
    let (cache, key, w) = cache_with_entry(tmp.path(), &ckpt, &p);
    match cache.load(&key, &p) {
        Lookup::Hit(h) => assert!(same(&h, &w)),
        _ => panic!("no hit"),
    }
    // Another program (another precision) or another checkpoint has another key: a miss.
    let other = program(&ckpt, DType::F32);
    let k2 = WeightsCache::key(&other, &ckpt.identity()).unwrap();
    assert_ne!(k2, key);
    assert!(matches!(cache.load(&k2, &other), Lookup::Miss));
    let ckpt2 = Checkpoint::open(&fixture("mha-r4")).unwrap();
    assert_ne!(WeightsCache::key(&p, &ckpt2.identity()).unwrap(), key);
}

#[test]
fn stale_truncated_and_corrupt_entries_are_never_used() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let p = program(&ckpt, DType::F32);
    let (cache, key, _) = cache_with_entry(tmp.path(), &ckpt, &p);
    let path = cache.path(&key);
    let bytes = std::fs::read(&path).unwrap();
    // An entry written for another program under this key (stale: its layout hash differs).
    let other = program(&ckpt, DType::BF16);
    let other_w = ResidentWeights::encode(&other, &ckpt, true).unwrap();
    cache.store(&key, &other, &other_w).unwrap();
    assert!(matches!(cache.load(&key, &p), Lookup::Invalid(e) if e.contains("does not belong")));
    // Truncated.
    std::fs::write(&path, &bytes[..bytes.len() - 64]).unwrap();
    assert!(matches!(cache.load(&key, &p), Lookup::Invalid(e) if e.contains("truncated")));
    // Not a weights file at all.
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(cache.load(&key, &p), Lookup::Invalid(e) if e.contains("not an ouroc weights file")));
    // Rewritten whole, it is used again.
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(cache.load(&key, &p), Lookup::Hit(_)));
}

#[test]
fn concurrent_writers_leave_one_whole_entry_and_no_temporaries() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&fixture("tied")).unwrap();
    let p = program(&ckpt, DType::BF16);
    let cache = WeightsCache::new(tmp.path());
    let key = WeightsCache::key(&p, &ckpt.identity()).unwrap();
    let want: Vec<((u32, Encoding), Vec<u8>)> = ResidentWeights::encode(&p, &ckpt, true)
        .unwrap()
        .entries()
        .into_iter()
        .map(|(k, b)| (k, b.to_vec()))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                // ResidentWeights is not Sync: each writer prepares its own.
                let w = ResidentWeights::encode(&p, &ckpt, true).unwrap();
                for _ in 0..5 {
                    cache.store(&key, &p, &w).unwrap();
                    // A reader racing the writers sees a whole entry or none, never a part.
                    match cache.load(&key, &p) {
                        Lookup::Hit(h) => {
                            let got: Vec<((u32, Encoding), Vec<u8>)> =
                                h.entries().into_iter().map(|(k, b)| (k, b.to_vec())).collect();
                            assert!(got == want);
                        }
                        Lookup::Miss => {}
                        Lookup::Invalid(e) => panic!("a reader saw a partial entry: {e}"),
                    }
                }
            });
        }
    });
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("{key}.weights")]);
}
