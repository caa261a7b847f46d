//! ouroc-models: loading Ouro checkpoint directories.
//!
//! - [`config`]: `config.json` parsing and validation;
//! - [`safetensors_file`]: one memory-mapped safetensors file;
//! - [`weights`]: single-file or sharded tensor storage;
//! - [`checkpoint`]: the validated checkpoint;
//! - [`error`]: the error type.

pub mod build;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod limits;
pub mod random;
pub mod safetensors_file;
pub mod shapes;
mod strict_json;
pub mod weights;

pub use build::{BuildOptions, build_from_config, build_graph};
pub use checkpoint::{Checkpoint, StorageDtype, TensorInfo, expected_tensors};
pub use config::OuroConfig;
pub use error::ModelError;
