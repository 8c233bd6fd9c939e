//! Where results go: one JSON file per suite under `$LATCH_BENCH_OUT` (default `target/bench/`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// `$LATCH_BENCH_OUT` (default `target/bench/`), created if missing.
pub fn out_dir() -> anyhow::Result<PathBuf> {
    let out_dir = std::env::var_os("LATCH_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    Ok(out_dir)
}

/// Write `json` to `SUITE.json` in `out_dir`, and say so.
pub fn write_json(out_dir: &Path, suite: &str, json: &serde_json::Value) -> anyhow::Result<()> {
    let path = out_dir.join(format!("{suite}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
