//! The server's counters, gauges and histograms, rendered in the Prometheus
//! text format (`GET /metrics`). The engine records batches, tokens and
//! latencies; the HTTP layer records requests by endpoint and status.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Bucket upper bounds, in seconds, of the latency histograms.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Bucket upper bounds of the rows-per-batch histogram.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram with fixed buckets.
#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, x: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if x <= b {
                *c += 1;
            }
        }
        self.sum += x;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    generated_tokens: u64,
    /// Generated tokens per exit depth (index depth - 1).
    depth_tokens: Vec<u64>,
    queued: u64,
    running: u64,
    batch_rows: Histogram,
    loop_steps: u64,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    cancelled: u64,
    rejected_busy: u64,
}

/// Everything `/metrics` shows; shared by the engine and the HTTP layer.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                prompt_tokens: 0,
                generated_tokens: 0,
                depth_tokens: Vec::new(),
                queued: 0,
                running: 0,
                batch_rows: Histogram::new(&BATCH_BUCKETS),
                loop_steps: 0,
                ttft: Histogram::new(&LATENCY_BUCKETS),
                itl: Histogram::new(&LATENCY_BUCKETS),
                e2e: Histogram::new(&LATENCY_BUCKETS),
                cancelled: 0,
                rejected_busy: 0,
            }),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Inner)) {
        // A panic while holding the lock cannot leave a counter half-written.
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// An HTTP request answered on `endpoint` (a route, e.g.
    /// `/v1/chat/completions`) with `status`.
    pub fn request(&self, endpoint: &str, status: u16) {
        self.with(|m| *m.requests.entry((endpoint.to_string(), status)).or_default() += 1)
    }

    /// A request turned away because the queue was full (503).
    pub fn rejected_busy(&self) {
        self.with(|m| m.rejected_busy += 1)
    }

    /// Requests waiting and sequences running now.
    pub fn occupancy(&self, queued: usize, running: usize) {
        self.with(|m| {
            m.queued = queued as u64;
            m.running = running as u64;
        })
    }

    /// A prompt prefilled.
    pub fn prompt(&self, tokens: usize) {
        self.with(|m| m.prompt_tokens += tokens as u64)
    }

    /// One batched call of the loop body over `rows` tokens.
    pub fn batch(&self, rows: usize) {
        self.with(|m| {
            m.batch_rows.observe(rows as f64);
            m.loop_steps += 1;
        })
    }

    /// Batched calls of the loop body so far, and their rows in all.
    pub fn batches(&self) -> (u64, f64) {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (m.batch_rows.count, m.batch_rows.sum)
    }

    /// A token generated at exit depth `depth` (1-based); `since_last`:
    /// seconds since the sequence's previous token (None for its first).
    pub fn token(&self, depth: usize, since_last: Option<f64>) {
        self.with(|m| {
            m.generated_tokens += 1;
            if m.depth_tokens.len() < depth {
                m.depth_tokens.resize(depth, 0);
            }
            if depth > 0 {
                m.depth_tokens[depth - 1] += 1;
            }
            if let Some(s) = since_last {
                m.itl.observe(s);
            }
        })
    }

    /// Seconds from a request's arrival to its first token.
    pub fn first_token(&self, seconds: f64) {
        self.with(|m| m.ttft.observe(seconds))
    }

    /// A request finished (`cancelled`: its receiver was dropped: a client
    /// that went away, or a stop string) after
    /// `seconds` in all.
    pub fn finished(&self, seconds: f64, cancelled: bool) {
        self.with(|m| {
            m.e2e.observe(seconds);
            if cancelled {
                m.cancelled += 1;
            }
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter("ouroc_prompt_tokens_total", "Prompt tokens prefilled.", m.prompt_tokens);
        counter("ouroc_generation_tokens_total", "Tokens generated.", m.generated_tokens);
        counter(
            "ouroc_loop_batches_total",
            "Batched calls of the loop body.",
            m.loop_steps,
        );
        counter(
            "ouroc_requests_cancelled_total",
            "Requests whose event stream was dropped before their last token: the client disconnected, or the server stopped at a stop string.",
            m.cancelled,
        );
        counter(
            "ouroc_requests_rejected_busy_total",
            "Requests answered 503 because the queue was full.",
            m.rejected_busy,
        );
        let _ = writeln!(
            out,
            "# HELP ouroc_requests_total HTTP requests answered, by endpoint and status.\n# TYPE ouroc_requests_total counter"
        );
        for ((endpoint, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "ouroc_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP ouroc_generation_tokens_by_depth_total Tokens generated, by the loop depth they exited at.\n# TYPE ouroc_generation_tokens_by_depth_total counter"
        );
        for (i, n) in m.depth_tokens.iter().enumerate() {
            let _ = writeln!(out, "ouroc_generation_tokens_by_depth_total{{depth=\"{}\"}} {n}", i + 1);
        }
        let _ = writeln!(
            out,
            "# HELP ouroc_queue_depth Requests waiting for a sequence slot.\n# TYPE ouroc_queue_depth gauge\nouroc_queue_depth {}",
            m.queued
        );
        let _ = writeln!(
            out,
            "# HELP ouroc_running_sequences Sequences being prefilled or decoded.\n# TYPE ouroc_running_sequences gauge\nouroc_running_sequences {}",
            m.running
        );
        m.batch_rows.render(
            &mut out,
            "ouroc_batch_rows",
            "Tokens per batched call of the loop body.",
        );
        m.ttft
            .render(&mut out, "ouroc_time_to_first_token_seconds", "Arrival to first token.");
        m.itl.render(
            &mut out,
            "ouroc_inter_token_latency_seconds",
            "Time between a sequence's tokens.",
        );
        m.e2e
            .render(&mut out, "ouroc_request_duration_seconds", "Arrival to the last token.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::new();
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 400);
        m.token(2, None);
        m.token(4, Some(0.003));
        m.batch(3);
        let text = m.render();
        assert!(text.contains("ouroc_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2"));
        assert!(text.contains("ouroc_requests_total{endpoint=\"/v1/completions\",status=\"400\"} 1"));
        assert!(text.contains("ouroc_generation_tokens_total 2"));
        assert!(text.contains("ouroc_generation_tokens_by_depth_total{depth=\"2\"} 1"));
        assert!(text.contains("ouroc_generation_tokens_by_depth_total{depth=\"3\"} 0"));
        assert!(text.contains("ouroc_inter_token_latency_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("ouroc_inter_token_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("ouroc_batch_rows_bucket{le=\"2\"} 0"));
        assert!(text.contains("ouroc_batch_rows_bucket{le=\"4\"} 1"));
        assert!(text.contains("ouroc_batch_rows_count 1"));
    }
}
