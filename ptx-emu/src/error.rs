//! [`EmuError`]: what went wrong, with the line, instruction, CTA and
//! thread it concerns.

/// Why parsing or running PTX failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmuError {
    #[error("PTX parse error at line {line}: {msg}")]
    Parse { line: u32, msg: String },
    #[error("line {line}: `{inst}`: {msg}")]
    Unsupported { line: u32, inst: String, msg: String },
    #[error("launch of `{kernel}`: {msg}")]
    Launch { kernel: String, msg: String },
    #[error("kernel `{kernel}`, line {line} `{inst}`, CTA {cta:?}, thread {thread:?}: {msg}")]
    Fault {
        kernel: String,
        line: u32,
        inst: String,
        cta: [u32; 3],
        thread: [u32; 3],
        msg: String,
    },
    #[error("kernel `{kernel}`, CTA {cta:?}: deadlock: {msg}")]
    Deadlock { kernel: String, cta: [u32; 3], msg: String },
    #[error("kernel `{kernel}`: more than {limit} warp instructions (an endless loop?)")]
    StepLimit { kernel: String, limit: u64 },
    #[error("memory: {0}")]
    Memory(String),
}
