//! `policy`: the policy engine's decision cost by number of loaded policies, and the revocation
//! sweep, in-process (`latch_tests::policy_bench`; `docs/policy.md`).

use std::path::Path;

use crate::report;

pub fn run(out_dir: &Path) -> anyhow::Result<()> {
    use latch_tests::policy_bench::{decision_cost, revocation};
    println!("policy benchmark: decision cost by loaded policies; revocation of cached verdicts");
    let iterations = 200_000;
    let costs = [10, 1_000, 10_000]
        .into_iter()
        .map(|n| decision_cost(n, iterations))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let base = costs[0].ns_per_decision;
    println!("\n| policies loaded | ns per decision | ratio to 10 policies |");
    println!("|---:|---:|---:|");
    for c in &costs {
        println!(
            "| {} | {:.0} | {:.2} |",
            c.policies,
            c.ns_per_decision,
            c.ns_per_decision / base
        );
    }
    let r = revocation(100_000)?;
    println!("\n| revocation | entries | removed | ms |");
    println!("|---|---:|---:|---:|");
    println!(
        "| read every entry | {} | 0 | {:.1} |",
        r.entries,
        r.read_all.as_secs_f64() * 1e3
    );
    println!(
        "| sweep, nothing to revoke | {} | 0 | {:.1} |",
        r.entries,
        r.sweep_nothing_to_revoke.as_secs_f64() * 1e3
    );
    println!(
        "| deny-all: revoke every entry | {} | {} | {:.1} |",
        r.entries,
        r.removed,
        r.revoke_all.as_secs_f64() * 1e3
    );
    let at_10k = costs.last().map(|c| c.ns_per_decision).unwrap_or_default();
    println!(
        "\ntargets: under 1000 ns per decision at 10,000 policies ({at_10k:.0} ns); revocation of 100,000 entries under 100 ms ({:.1} ms)",
        r.revoke_all.as_secs_f64() * 1e3
    );
    let json = serde_json::json!({
        "benchmark": "policy",
        "decisions": costs.iter().map(|c| serde_json::json!({
            "policies": c.policies, "ns_per_decision": c.ns_per_decision,
            "ratio_to_10": c.ns_per_decision / base,
        })).collect::<Vec<_>>(),
        "revocation": {
            "entries": r.entries, "removed": r.removed,
            "read_all_ms": r.read_all.as_secs_f64() * 1e3,
            "sweep_nothing_to_revoke_ms": r.sweep_nothing_to_revoke.as_secs_f64() * 1e3,
            "revoke_all_ms": r.revoke_all.as_secs_f64() * 1e3,
        },
    });
    report::write_json(out_dir, "policy", &json)
}
