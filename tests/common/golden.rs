//! The golden files of tests/reference/gen_fixtures.py, read for tests.
//! Shared by the top-level tests (tests/common) and the runtime's GPU tests
//! (runtime/tests/gpu_common includes this file by path); each includer
//! provides `fixture(name)`, the path of a fixture directory.

use super::fixture;
use safetensors::SafeTensors;
use std::collections::HashMap;

/// A golden tensor: f32 or i32 data with its shape.
pub struct GoldenTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i32: Vec<i32>,
}

pub struct Golden {
    pub tensors: HashMap<String, GoldenTensor>,
    pub policies: Vec<String>,
}

impl Golden {
    pub fn load(name: &str) -> Golden {
        let path = fixture("golden").join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("golden header");
        let policies = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("policies"))
            .expect("golden metadata lists policies")
            .split(',')
            .map(String::from)
            .collect();
        let st = SafeTensors::deserialize(&bytes).expect("golden file");
        let mut tensors = HashMap::new();
        for (k, v) in st.tensors() {
            let data = v.data();
            let (f, i) = match v.dtype() {
                safetensors::Dtype::F32 => (
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
                safetensors::Dtype::I32 => (
                    vec![],
                    data.chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                d => panic!("golden tensor {k} has dtype {d:?}"),
            };
            tensors.insert(
                k,
                GoldenTensor {
                    shape: v.shape().to_vec(),
                    f32: f,
                    i32: i,
                },
            );
        }
        Golden { tensors, policies }
    }

    pub fn get(&self, key: &str) -> &GoldenTensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("golden has no tensor {key}"))
    }

    /// A tensor some golden files leave out (the demo model's stores logits
    /// for a few policies only, to stay small).
    pub fn try_get(&self, key: &str) -> Option<&GoldenTensor> {
        self.tensors.get(key)
    }

    pub fn prompt(&self) -> Vec<u32> {
        self.get("prompt_ids").i32.iter().map(|&x| x as u32).collect()
    }
}
