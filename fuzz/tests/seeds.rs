//! Writes the committed seed corpus of every parser target (`tests/__fuzz__/parsers__*/corpus`)
//! from the repository's fixtures, so the corpus can be regenerated when a format changes:
//! `cargo test -p ouroc-fuzz --test seeds -- --ignored`. Review the diff before committing it.

use ouroc_fuzz::{corpus_dir, fixture};
use ouroc_models::Checkpoint;
use ouroc_runtime::deploy::{self, AppMeta, WeightsHeader};
use safetensors::{Dtype, tensor::TensorView};
use std::path::Path;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(path.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

fn compile(ckpt: &Checkpoint) -> ouroc_compile::Compiled {
    let opts = ouroc_compile::CompileOptions::reference(ckpt, ouroc_ir::DType::F32);
    ouroc_compile::compile(ckpt, &opts).unwrap()
}

#[test]
#[ignore = "writes the corpus; run by hand when a format changes"]
fn write_seed_corpus() {
    // safetensors: small files as the reference writer lays them out (header padded with spaces).
    let f32s: Vec<u8> = (0..24).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    let halves: Vec<u8> = (0..8u16).flat_map(|i| (0x3f80 + i).to_le_bytes()).collect();
    let one = [7u8];
    let files: [(&str, Vec<(&str, TensorView)>); 3] = [
        (
            "two.safetensors",
            vec![
                (
                    "model.norm.weight",
                    TensorView::new(Dtype::F32, vec![2, 3], &f32s[..24]).unwrap(),
                ),
                ("w", TensorView::new(Dtype::BF16, vec![8], &halves).unwrap()),
            ],
        ),
        (
            "odd.safetensors",
            vec![
                ("a", TensorView::new(Dtype::U8, vec![1], &one).unwrap()),
                ("b", TensorView::new(Dtype::F32, vec![4, 6], &f32s).unwrap()),
                ("empty", TensorView::new(Dtype::F32, vec![0], &[]).unwrap()),
            ],
        ),
        (
            "one.safetensors",
            vec![("x", TensorView::new(Dtype::F32, vec![24], &f32s).unwrap())],
        ),
    ];
    for (name, views) in files {
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write("safetensors", name, &safetensors::serialize(views, Some(meta)).unwrap());
    }
    write(
        "safetensors_index",
        "sharded.json",
        &read(fixture("sharded").join("model.safetensors.index.json")),
    );

    // config.json of every fixture, the demo model and two named shapes.
    for f in ["mha-r4", "gqa-hd", "tied", "r1", "f16"] {
        write(
            "config_json",
            &format!("{f}.json"),
            &read(fixture(f).join("config.json")),
        );
    }
    write(
        "config_json",
        "demo.json",
        &read(fixture("../../models/demo").join("config.json")),
    );
    for s in ["small", "1.4b"] {
        let json = ouroc_models::shapes::shape_config_json(s).unwrap();
        write("config_json", &format!("shape-{s}.json"), json.as_bytes());
    }

    // tokenizer_config.json NUL generation_config.json; tokenizer.json.
    for (name, dir) in [("fixture", fixture("mha-r4")), ("demo", fixture("../../models/demo"))] {
        let mut both = read(dir.join("tokenizer_config.json"));
        both.push(0);
        both.extend(read(dir.join("generation_config.json")));
        write("tokenizer_files", &format!("{name}.bin"), &both);
    }
    write(
        "tokenizer_json",
        "fixture.json",
        &read(fixture("mha-r4").join("tokenizer.json")),
    );

    // IR text: the imported and the optimised graph; PTX: the Program's module.
    for f in ["r1", "gqa-hd"] {
        let ckpt = Checkpoint::open(&fixture(f)).unwrap();
        let c = compile(&ckpt);
        write(
            "ir_text",
            &format!("{f}-imported.ir"),
            ouroc_ir::print::print(&c.imported).as_bytes(),
        );
        write(
            "ir_text",
            &format!("{f}-optimised.ir"),
            ouroc_ir::print::print(&c.optimised).as_bytes(),
        );
    }
    let ckpt = Checkpoint::open(&fixture("r1")).unwrap();
    let c = compile(&ckpt);
    let module = ouroc_codegen::ptx::module(&c.program).unwrap();
    write("ptx_text", "r1-runtime.ptx", module.runtime_text.as_bytes());
    // One kernel per seed keeps each small; the module's own header opens each.
    let text = &module.text;
    let header_end = text.find(".visible .entry").unwrap_or(text.len());
    for (i, entry) in text.match_indices(".visible .entry").take(4).enumerate() {
        let rest = &text[entry.0..];
        let end = rest[1..].find(".visible .entry").map_or(rest.len(), |e| e + 1);
        write(
            "ptx_text",
            &format!("r1-kernel{i}.ptx"),
            format!("{}{}", &text[..header_end], &rest[..end]).as_bytes(),
        );
    }

    // A built executable's weights file and metadata, as `ouroc build` writes them.
    let weights = c.encode_weights(&ckpt).unwrap();
    let (entries, data_bytes) = deploy::layout(&weights);
    let fingerprint = deploy::fingerprint(&c.program, &weights, &entries).unwrap();
    let header = WeightsHeader {
        fingerprint: fingerprint.clone(),
        entries,
        data_bytes,
    };
    let mut image = Vec::new();
    deploy::write_weights(&mut image, &header, &weights).unwrap();
    write("weights_file", "r1.weights", &image);
    let meta = AppMeta {
        fingerprint,
        program: c.program.clone(),
        model: "r1".into(),
        layers: ckpt.config.num_hidden_layers,
        steps: ckpt.config.total_ut_steps,
        policy: "threshold:1.0".into(),
        precision: "f32".into(),
        max_positions: ckpt.config.max_position_embeddings,
        target: "cpu".into(),
        cpu_level: "x86-64-v3".into(),
        cpu_features: vec!["avx2".into()],
        triple: "x86_64-unknown-linux-gnu".into(),
        kernel_keys: vec![],
        tokenizer: None,
        chat_template: None,
        bos_token: None,
        eos_token: None,
        eos_ids: vec![0],
        config_eos_ids: vec![0],
        kv: "full".into(),
        ptx: None,
        embedded_weights: false,
        weights_bytes: image.len() as u64,
    };
    write("app_meta", "r1.json", &serde_json::to_vec(&meta).unwrap());
}
