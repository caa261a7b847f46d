//! One function per parser of untrusted bytes. Each may see the parser refuse its input (that is
//! the parser working); it panics only when the parser panics, or accepts input that breaks an
//! invariant its callers rely on.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use ouroc_models::OuroConfig;
use ouroc_models::limits;
use ouroc_runtime::deploy::{AppMeta, Fingerprint, WeightsHeader, read_weights};

/// A safetensors file: accepted tensors lie inside the file, do not overlap, have unique names
/// and tile the data section.
pub fn safetensors(input: &[u8]) {
    let Ok(mut entries) = ouroc_models::safetensors_file::validate(input) else {
        return;
    };
    let names: HashSet<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), entries.len(), "duplicate tensor names accepted");
    entries.sort_by_key(|(_, r)| (r.start, r.end));
    let data_start = 8 + u64::from_le_bytes(input[..8].try_into().expect("8 bytes")) as usize;
    let mut at = data_start;
    for (name, r) in &entries {
        assert_eq!(r.start, at, "tensor {name} does not start where the previous one ends");
        assert!(r.end <= input.len(), "tensor {name} runs past the file");
        at = r.end;
    }
    assert_eq!(at, input.len(), "bytes after the last tensor accepted");
}

/// `model.safetensors.index.json`: accepted shard names stay inside the checkpoint directory.
pub fn safetensors_index(input: &[u8]) {
    let Ok(shards) = ouroc_models::weights::parse_index(input, Path::new("index.json")) else {
        return;
    };
    for shard in shards.keys() {
        let p = Path::new(shard);
        assert!(
            !shard.is_empty() && p.components().all(|c| matches!(c, std::path::Component::Normal(_))),
            "shard `{shard}` leaves the directory"
        );
    }
}

/// config.json: an accepted config has every size within ouroc's limits, and building its graph
/// (without weights) either works or is refused.
pub fn config_json(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok((cfg, _)) = OuroConfig::from_json_str(text, "config.json") else {
        return;
    };
    for (what, v, max) in [
        ("hidden_size", cfg.hidden_size, limits::MAX_HIDDEN),
        ("intermediate_size", cfg.intermediate_size, limits::MAX_INTERMEDIATE),
        ("num_hidden_layers", cfg.num_hidden_layers, limits::MAX_LAYERS),
        ("num_attention_heads", cfg.num_attention_heads, limits::MAX_HEADS),
        ("num_key_value_heads", cfg.num_key_value_heads, limits::MAX_HEADS),
        ("head_dim", cfg.head_dim, limits::MAX_HEAD_DIM),
        ("vocab_size", cfg.vocab_size, limits::MAX_VOCAB),
        (
            "max_position_embeddings",
            cfg.max_position_embeddings,
            limits::MAX_POSITIONS,
        ),
        ("total_ut_steps", cfg.total_ut_steps, limits::MAX_LOOPS),
    ] {
        assert!((1..=max).contains(&v), "{what} = {v} accepted");
    }
    assert_eq!(cfg.num_attention_heads % cfg.num_key_value_heads, 0);
    let _ = cfg.kv_bytes_per_token(4);
    let opts = ouroc_models::BuildOptions {
        dtype: ouroc_ir::DType::F32,
        policy: ouroc_models::BuildOptions::reference_policy(&cfg, ouroc_ir::DType::F32),
        loops: None,
        unrolled: false,
    };
    if let Ok(g) = ouroc_models::build_from_config(&cfg, "lm_head.weight", &opts) {
        ouroc_ir::verify::verify(&g).expect("a built graph verifies");
    }
}

/// tokenizer_config.json and generation_config.json beside the fixture's tokenizer.json; the
/// input holds both, split at its first NUL byte.
pub fn tokenizer_files(input: &[u8]) {
    let (config, generation) = match input.iter().position(|&b| b == 0) {
        Some(i) => (&input[..i], Some(&input[i + 1..])),
        None => (input, None),
    };
    let _ = ouroc_runtime::Tokenizer::from_files(fixture_tokenizer(), Some(config), generation);
}

/// tokenizer.json itself (the fixture's, mutated): refused or loaded, and a loaded one encodes
/// and decodes a chat prompt without panicking.
pub fn tokenizer_json(input: &[u8]) {
    if let Ok(tok) = ouroc_runtime::Tokenizer::from_files(input, None, None)
        && let Ok(ids) = tok.encode("<|im_start|>user\nhi\n<|im_end|> def f(x):")
    {
        let _ = tok.decode(&ids);
    }
}

/// The IR text parser: an accepted graph prints as text that parses back to the same graph.
pub fn ir_text(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(g) = ouroc_ir::parse::parse(text) else {
        return;
    };
    let _ = ouroc_ir::verify::verify(&g);
    let printed = ouroc_ir::print::print(&g);
    let again = ouroc_ir::parse::parse(&printed)
        .unwrap_or_else(|e| panic!("the printed form of an accepted graph does not parse: {e}\n{printed}"));
    assert_eq!(
        ouroc_ir::print::print(&again),
        printed,
        "print/parse is not a round trip"
    );
}

/// The PTX emulator's parser (modules the emulator loads).
pub fn ptx_text(input: &[u8]) {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = ouroc_ptx_emu::Module::parse(text);
    }
}

/// The weights file of a built executable, checked against the fingerprint its seed was written
/// with: accepted entries are slices of the file (bounds-checked by construction) with known ids.
pub fn weights_file(input: &[u8]) {
    let want = weights_fingerprint();
    if let Ok(entries) = read_weights(input, want, "fuzzed.weights") {
        for (_, bytes) in entries {
            let (lo, hi) = (input.as_ptr() as usize, input.as_ptr() as usize + input.len());
            assert!(bytes.as_ptr() as usize >= lo && bytes.as_ptr() as usize + bytes.len() <= hi);
        }
    }
}

/// The metadata a built executable carries: parsed, then its Program checked as the driver
/// checks it before running (a refusal is fine; a panic is not).
pub fn app_meta(input: &[u8]) {
    if let Ok(meta) = serde_json::from_slice::<AppMeta>(input) {
        let _ = ouroc_driver::check_program(&meta.program);
    }
}

/// The fixture mha-r4's tokenizer.json.
pub fn fixture_tokenizer() -> &'static [u8] {
    static JSON: OnceLock<Vec<u8>> = OnceLock::new();
    JSON.get_or_init(|| std::fs::read(crate::fixture("mha-r4").join("tokenizer.json")).expect("fixture tokenizer"))
}

/// The fingerprint in the header of the first weights-file seed.
fn weights_fingerprint() -> &'static Fingerprint {
    static WANT: OnceLock<Fingerprint> = OnceLock::new();
    WANT.get_or_init(|| {
        let seed = crate::corpus("weights_file")
            .into_iter()
            .next()
            .expect("a weights seed");
        let hlen = u64::from_le_bytes(seed[8..16].try_into().expect("8 bytes")) as usize;
        let header: WeightsHeader = serde_json::from_slice(&seed[16..16 + hlen]).expect("seed header");
        header.fingerprint
    })
}

/// The model an OpenAI request is checked against: the mha-r4 fixture's tokenizer and chat
/// template, a context of 64 positions, 4 loop steps with an exit gate.
fn served() -> &'static (ouroc_runtime::Tokenizer, ouroc_serve::engine::ModelInfo, Vec<u32>) {
    static SERVED: OnceLock<(ouroc_runtime::Tokenizer, ouroc_serve::engine::ModelInfo, Vec<u32>)> = OnceLock::new();
    SERVED.get_or_init(|| {
        let tok = ouroc_runtime::Tokenizer::load(&crate::fixture("mha-r4")).expect("the fixture's tokenizer");
        let info = ouroc_serve::engine::ModelInfo {
            max_positions: 64,
            loop_steps: 4,
            has_exit_gate: true,
            policy: Some(ouroc_ir::ExitPolicy::parse("threshold:0.5").expect("a policy")),
            vocab: tok.vocab_size(),
        };
        let stop = tok.eos_ids.clone();
        (tok, info, stop)
    })
}

/// An OpenAI request body (`POST /v1/chat/completions`, `POST /v1/completions`), parsed and
/// checked as the server does (the chat template rendered, the prompt tokenised): a request it
/// accepts fits the context, has prompt ids in the vocabulary, valid sampling values, at most 4
/// non-empty stop strings and an exit policy the loop can run; a refusal is a 4xx.
pub fn openai_request(input: &[u8]) {
    use ouroc_serve::api::{Endpoint, GenerateBody, ModelView, parse_body};
    let (tok, info, stop_ids) = served();
    let model = ModelView {
        name: "mha-r4",
        tokenizer: tok,
        info,
        stop_ids,
    };
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        let body = match parse_body::<GenerateBody>(input) {
            Ok(b) => b,
            Err(e) => {
                assert_eq!(e.status.as_u16(), 400, "a malformed body answered {}", e.status);
                return;
            }
        };
        let g = match body.check(endpoint, &model, 7) {
            Ok(g) => g,
            Err(e) => {
                assert!(
                    e.status.is_client_error(),
                    "a refused request answered {}: {}",
                    e.status,
                    e.message
                );
                continue;
            }
        };
        assert!(!g.prompt.is_empty(), "an empty prompt accepted");
        assert!(g.max_tokens >= 1, "max_tokens 0 accepted");
        assert!(
            g.prompt.len() + g.max_tokens <= info.max_positions,
            "{} prompt + {} new tokens accepted for a context of {}",
            g.prompt.len(),
            g.max_tokens,
            info.max_positions
        );
        assert!(
            g.prompt.iter().all(|&t| (t as usize) < info.vocab),
            "a prompt id out of the vocabulary accepted"
        );
        g.sampling.check().expect("accepted sampling values are valid");
        assert!(
            g.stop_strings.len() <= 4 && g.stop_strings.iter().all(|s| !s.is_empty()),
            "stop strings {:?}",
            g.stop_strings
        );
        if let Some(p) = g.exit {
            p.check(info.loop_steps)
                .expect("an accepted exit policy runs on the loop");
        }
    }
}
