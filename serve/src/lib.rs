//! ouroc-serve: an OpenAI-compatible HTTP server for a compiled LoopLM.
//!
//! | file | holds |
//! |---|---|
//! | `engine.rs` | [`engine::Engine`]: the thread that owns the model and batches every sequence (continuous, cross-depth) |
//! | `metrics.rs` | [`metrics::Metrics`]: counters and histograms, Prometheus text |
//! | `api.rs` | the OpenAI wire format: request bodies and their checks, responses, chunks, the error body |
//! | `http.rs` | [`http::Server`]: the axum routes, streaming (server-sent events), error mapping, graceful shutdown |
//! | `text.rs` | a request's text: incremental detokenisation and stop strings |

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod text;
