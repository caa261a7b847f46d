//! What a command will hold in memory, checked against what the machine has before it is
//! allocated, so that an impossible size is an error naming the numbers rather than an
//! allocation abort or the OOM killer part-way through.

/// Named byte counts; `None` is a count that overflowed 64 bits.
#[derive(Debug, Default, Clone)]
pub struct Footprint {
    parts: Vec<(String, Option<u64>)>,
}

impl Footprint {
    /// Adds `bytes` under `what` (`None`: the size overflowed while computing it).
    pub fn add(&mut self, what: impl Into<String>, bytes: Option<u64>) -> &mut Self {
        self.parts.push((what.into(), bytes));
        self
    }

    /// The sum, `None` when a part or the sum overflows.
    pub fn total(&self) -> Option<u64> {
        self.parts.iter().try_fold(0u64, |acc, (_, b)| acc.checked_add((*b)?))
    }

    /// `Ok` when the total fits in `available` bytes; otherwise an error naming every part.
    pub fn check_against(&self, available: u64, command: &str) -> Result<(), String> {
        match self.total() {
            Some(t) if t <= available => Ok(()),
            total => Err(format!(
                "{command} would need {} of memory ({}), but this machine has {} available \
                 (MemAvailable + SwapFree); set OUROC_NO_MEMORY_CHECK=1 to try anyway",
                total.map_or("more than 2^64 bytes".to_string(), bytes),
                self.parts
                    .iter()
                    .map(|(w, b)| format!("{w} {}", b.map_or("overflows 64 bits".to_string(), bytes)))
                    .collect::<Vec<_>>()
                    .join(", "),
                bytes(available)
            )),
        }
    }

    /// [`Footprint::check_against`] the memory this machine has now; passes when that cannot be
    /// read (not Linux) or `OUROC_NO_MEMORY_CHECK` is set.
    pub fn check(&self, command: &str) -> Result<(), String> {
        if std::env::var_os("OUROC_NO_MEMORY_CHECK").is_some() {
            return Ok(());
        }
        match available_bytes() {
            Some(a) => self.check_against(a, command),
            None if self.total().is_none() => self.check_against(u64::MAX, command),
            None => Ok(()),
        }
    }
}

/// MemAvailable + SwapFree from /proc/meminfo, in bytes; `None` where it cannot be read.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        kib.checked_mul(1024)
    };
    field("MemAvailable:")?.checked_add(field("SwapFree:").unwrap_or(0))
}

/// 1_500_000_000 -> "1.50 GB" (decimal units, as `ls -h --si` and disk vendors count).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_footprint_larger_than_memory_is_refused_naming_each_part() {
        let mut f = Footprint::default();
        f.add("weights", Some(3_000_000_000))
            .add("KV cache", Some(24_000_000_000_000));
        let e = f.check_against(20_000_000_000, "ouroc run").unwrap_err();
        for part in [
            "ouroc run",
            "24.00 TB",
            "weights 3.00 GB",
            "KV cache 24.00 TB",
            "20.00 GB available",
        ] {
            assert!(e.contains(part), "{e} should mention {part}");
        }
        assert!(f.check_against(25_000_000_000_000, "x").is_ok());
    }

    #[test]
    fn an_overflowing_part_is_refused_even_without_a_limit() {
        let mut f = Footprint::default();
        f.add("KV cache", None);
        assert_eq!(f.total(), None);
        let e = f.check_against(u64::MAX, "ouroc run").unwrap_err();
        assert!(e.contains("more than 2^64") && e.contains("KV cache overflows"), "{e}");
    }

    #[test]
    fn meminfo_available_plus_swap() {
        let text = "MemTotal: 100 kB\nMemAvailable:    2048 kB\nSwapFree: 1024 kB\n";
        assert_eq!(parse_meminfo(text), Some(3072 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert!(available_bytes().is_none_or(|b| b > 0));
    }
}
