//! `latch-bench targets`: issue 21's targets, each judged from the JSON a suite wrote in this run
//! (under `$LATCH_BENCH_OUT`): the target, this run's figure, and whether it was met. `cargo
//! xtask bench` puts the table at the top of `BENCHMARKS.md`.
//!
//! A suite's JSON written before `--since` (or not at all) belongs to another run: its targets
//! say so and are not judged. Figures are judged as the tables print them (CPU to three decimals,
//! microseconds and MB to one), so a row never reads "0.005, missed". Fast-path throughput is
//! judged on its rounds' 95% interval as well: a run whose interval straddles the target has not
//! resolved it (`latch-bench fast-throughput` takes the rounds that do).

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, anyhow};
use serde_json::Value;

use crate::{
    datapath, load, memory, report,
    stats::{median, spread},
};

/// At least this share of the no-agent connection rate on the fast path.
pub const FAST_PATH_RATE: f64 = 0.97;
/// At most this many vCPU per 1,000 requests/s for each agent on the fast path.
pub const FAST_PATH_VCPU: f64 = 0.005;
/// Fast-path throughput at least this share of no agents' (within 1%).
pub const FAST_PATH_THROUGHPUT: f64 = 0.99;
/// At most this many vCPU per 1,000 requests/s for each tunnel agent at 1,000/s on one connection.
pub const TUNNEL_VCPU: f64 = 0.06;
/// A pooled tunneled connection adds less than this at p50, in µs.
pub const POOLED_ADDED_US: f64 = 150.0;
/// Tunnel throughput with one stream: at least this share of no agents'...
pub const TUNNEL_OVER_NO_AGENTS: f64 = 0.75;
/// ...and at least this multiple of the nginx mTLS pair's.
pub const TUNNEL_OVER_NGINX: f64 = 1.5;

/// What a target came to in this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// The rounds' interval straddles the target.
    NotResolved,
    /// The suite's JSON is not from this run.
    NotMeasured,
}

impl Verdict {
    fn of(met: bool) -> Self {
        if met { Verdict::Met } else { Verdict::Missed }
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::NotResolved => "not resolved by this run",
            Verdict::NotMeasured => "not measured in this run",
        }
    }
}

/// One target as this run measured it.
#[derive(Debug)]
pub struct Judged {
    pub target: String,
    pub figure: String,
    pub verdict: Verdict,
}

pub fn run(out_dir: &Path, since: Option<u64>) -> anyhow::Result<()> {
    let since = since.map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    let read = |suite: &str| this_run(out_dir, suite, since);
    let suites: [(&str, Vec<String>, Judge); 4] = [
        ("datapath", datapath_names().into(), datapath_targets),
        ("load", load_names().into(), load_targets),
        ("tunnel", tunnel_names().into(), tunnel_targets),
        ("memory", memory_names().into(), memory_targets),
    ];
    let mut rows = Vec::new();
    for (suite, names, judge) in suites {
        rows.extend(judge_or_not(read(suite)?, names, judge)?);
    }
    print(&rows);
    let json = serde_json::json!({
        "benchmark": "targets",
        "targets": rows.iter().map(|r| serde_json::json!({
            "target": r.target, "figure": r.figure, "verdict": r.verdict.text(),
        })).collect::<Vec<_>>(),
    });
    report::write_json(out_dir, "targets", &json)
}

fn print(rows: &[Judged]) {
    println!("| target (with the shipped defaults) | this run | |");
    println!("|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} |", r.target, r.figure, r.verdict.text());
    }
    let met = rows.iter().filter(|r| r.verdict == Verdict::Met).count();
    println!(
        "\n({met} of {} targets met; each figure is the median over the suite's rounds, with the \
         lowest and highest or the 95% interval in brackets; what each suite measures and how: \
         `docs/benchmarks.md`)",
        rows.len()
    );
    if rows.iter().any(|r| r.verdict == Verdict::NotResolved) {
        println!(
            "\n(not resolved: the rounds' 95% interval straddles the target; `cargo xtask bench \
             fast-throughput --rounds 400` takes as many rounds as a 1% difference needs)"
        );
    }
}

/// `SUITE.json` in `dir` if this run wrote it (at or after `since`, when given).
fn this_run(dir: &Path, suite: &str, since: Option<SystemTime>) -> anyhow::Result<Option<Value>> {
    let path = dir.join(format!("{suite}.json"));
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(None);
    };
    if let Some(since) = since
        && meta.modified().is_ok_and(|written| written < since)
    {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(json))
}

/// The targets each suite judges, named from the thresholds above (and for the rows of a suite
/// that did not run).
fn datapath_names() -> [String; 1] {
    [format!(
        "fast path: at least {:.0}% of the no-agent connection rate",
        FAST_PATH_RATE * 100.0
    )]
}

fn load_names() -> [String; 2] {
    [
        format!(
            "fast path: at most {FAST_PATH_VCPU} vCPU per 1,000/s for each agent, every load shape"
        ),
        format!(
            "tunnel: at most {TUNNEL_VCPU} vCPU per 1,000/s for each agent at 1,000/s on one \
             connection"
        ),
    ]
}

fn tunnel_names() -> [String; 3] {
    [
        format!(
            "fast path: throughput within {:.0}% of no agents, one and eight streams",
            (1.0 - FAST_PATH_THROUGHPUT) * 100.0
        ),
        format!("tunnel: a pooled connection under {POOLED_ADDED_US} µs added at p50"),
        format!(
            "tunnel: with one stream, at least {TUNNEL_OVER_NO_AGENTS} of no agents' throughput \
             and {TUNNEL_OVER_NGINX} of the nginx pair's"
        ),
    ]
}

fn memory_names() -> [String; 2] {
    [
        format!(
            "RSS: under {} MB idle with {} workloads",
            memory::IDLE_TARGET_MB,
            memory::IDLE_TARGET_WORKLOADS
        ),
        format!(
            "RSS: under {} MB with 10,000 tunneled connections held",
            memory::CONNECTIONS_TARGET_MB
        ),
    ]
}

/// How a suite's JSON is judged.
type Judge = fn(&Value) -> anyhow::Result<Vec<Judged>>;

/// `judge` on `json`, or every one of `names` not measured.
fn judge_or_not(
    json: Option<Value>,
    names: Vec<String>,
    judge: Judge,
) -> anyhow::Result<Vec<Judged>> {
    match json {
        Some(json) => judge(&json),
        None => Ok(names
            .into_iter()
            .map(|target| Judged {
                target,
                figure: "–".into(),
                verdict: Verdict::NotMeasured,
            })
            .collect()),
    }
}

/// The number at `pointer` in `json`.
fn number(json: &Value, pointer: &str) -> anyhow::Result<f64> {
    json.pointer(pointer)
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("no number at {pointer}"))
}

/// The array at `pointer` in `json`.
fn array<'a>(json: &'a Value, pointer: &str) -> anyhow::Result<&'a Vec<Value>> {
    json.pointer(pointer)
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no array at {pointer}"))
}

/// The two numbers (source agent, destination agent) at `pointer`, if there are (the JSON of
/// runs before 2026-12-05 has no CPU figures beside the tunnel's).
fn agents_pair(json: &Value, pointer: &str) -> Option<[f64; 2]> {
    let [source, destination] = [0, 1].map(|i| number(json, &format!("{pointer}/{i}")).ok());
    Some([source?, destination?])
}

/// `value` as the tables print it, with `digits` decimals.
fn printed(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

pub fn datapath_targets(json: &Value) -> anyhow::Result<Vec<Judged>> {
    let mut ratios = Vec::new();
    for (i, round) in array(json, "/rounds")?.iter().enumerate() {
        let phase = array(round, "/phases")?
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(datapath::FAST_PATH_PHASE))
            .ok_or_else(|| anyhow!("round {i} has no phase {:?}", datapath::FAST_PATH_PHASE))?;
        ratios.push(number(phase, "/ratio_to_no_agents")?);
    }
    if ratios.is_empty() {
        return Err(anyhow!("datapath.json has no rounds"));
    }
    let mid = median(ratios.clone());
    let [name] = datapath_names();
    Ok(vec![Judged {
        target: name,
        figure: format!("{} of no agents", spread(ratios, 3)),
        verdict: Verdict::of(printed(mid, 3) >= FAST_PATH_RATE),
    }])
}

/// Each agent's median vCPU per 1,000/s over the runs of `setup` in `shape` (source,
/// destination).
fn agents_vcpu(shape: &Value, setup: &str) -> anyhow::Result<[f64; 2]> {
    let runs = array(shape, "/setups")?
        .iter()
        .find(|s| s.get("setup").and_then(Value::as_str) == Some(setup))
        .ok_or_else(|| anyhow!("a load shape has no setup {setup:?}"))
        .and_then(|s| array(s, "/runs"))?;
    if runs.is_empty() {
        return Err(anyhow!("setup {setup:?} has no runs"));
    }
    let side = |i: usize| -> anyhow::Result<f64> {
        let values = runs
            .iter()
            .map(|r| number(r, &format!("/vcpu_per_krps/{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(median(values))
    };
    Ok([side(0)?, side(1)?])
}

pub fn load_targets(json: &Value) -> anyhow::Result<Vec<Judged>> {
    let shapes = array(json, "/shapes")?;
    // The fast path: its dearest shape and side.
    let mut worst: Option<(f64, String)> = None;
    for shape in shapes {
        let label = shape.get("shape").and_then(Value::as_str).unwrap_or("?");
        let [source, destination] = agents_vcpu(shape, load::FAST_PATH_SETUP)?;
        for (vcpu, side) in [(source, "source"), (destination, "destination")] {
            if worst.as_ref().is_none_or(|(w, _)| vcpu > *w) {
                worst = Some((vcpu, format!("{label}, {side} agent")));
            }
        }
    }
    let (fast, where_) = worst.ok_or_else(|| anyhow!("load.json has no shapes"))?;
    // The tunnel at 1,000/s on one persistent connection.
    let one = shapes
        .iter()
        .find(|s| {
            s.get("rate").and_then(Value::as_u64) == Some(1000)
                && s.get("conns").and_then(Value::as_u64) == Some(1)
        })
        .ok_or_else(|| anyhow!("load.json has no shape of 1,000/s on one connection"))?;
    let [source, destination] = agents_vcpu(one, load::TUNNEL_DEFAULTS_SETUP)?;
    let [fast_name, tunnel_name] = load_names();
    Ok(vec![
        Judged {
            target: fast_name,
            figure: format!("{fast:.3} at most ({where_})"),
            verdict: Verdict::of(printed(fast, 3) <= FAST_PATH_VCPU),
        },
        Judged {
            target: tunnel_name,
            figure: format!("{source:.3} / {destination:.3} (source / destination)"),
            verdict: Verdict::of(printed(source.max(destination), 3) <= TUNNEL_VCPU),
        },
    ])
}

pub fn tunnel_targets(json: &Value) -> anyhow::Result<Vec<Judged>> {
    // Fast-path throughput, one and eight streams: the ratio of the medians, and the rounds'
    // ratio with its interval where there are rounds enough.
    let mut figures = Vec::new();
    let mut verdicts = Vec::new();
    for streams in [1, 8] {
        let at = format!("/fast_path_throughput/streams_{streams}");
        let ratio = number(json, &format!("{at}/measured_over_reference"))?;
        let interval = json
            .pointer(&format!("{at}/rounds_ratio_mean_and_95_interval"))
            .and_then(Value::as_array)
            .and_then(|v| {
                let v: Vec<f64> = v.iter().filter_map(Value::as_f64).collect();
                (v.len() == 3).then(|| (v[0], v[1], v[2]))
            });
        verdicts.push(match interval {
            Some((low, _, _)) if printed(low, 3) >= FAST_PATH_THROUGHPUT => Verdict::Met,
            Some((_, _, high)) if printed(high, 3) < FAST_PATH_THROUGHPUT => Verdict::Missed,
            Some(_) => Verdict::NotResolved,
            None => Verdict::of(printed(ratio, 3) >= FAST_PATH_THROUGHPUT),
        });
        figures.push(match interval {
            Some((low, mean, high)) => format!(
                "{ratio:.3} with {} (rounds: {mean:.3}, {low:.3}–{high:.3})",
                streams_text(streams)
            ),
            None => format!("{ratio:.3} with {}", streams_text(streams)),
        });
    }
    let fast_verdict = if verdicts.contains(&Verdict::Missed) {
        Verdict::Missed
    } else if verdicts.contains(&Verdict::NotResolved) {
        Verdict::NotResolved
    } else {
        Verdict::Met
    };
    let pooled = number(json, "/added_p50_us/pooled_tunnel")?;
    // What the latency costs, beside it: the agents' CPU per connection, busy polling included.
    let cpu = |phase: &str| {
        agents_pair(json, &format!("/agents_cpu_us_per_connection/{phase}"))
            .map(|[source, destination]| format!("{source:.0} / {destination:.0} µs"))
    };
    let pooled_figure = match (cpu("pooled_tunnel"), cpu("pooled_tunnel_no_busy_poll")) {
        (Some(polling), Some(not_polling)) => format!(
            "{pooled:.0} µs, at {polling} of the agents' CPU per connection (source / \
             destination; busy polling off: {:.0} µs added, at {not_polling})",
            number(json, "/added_p50_us/pooled_tunnel_no_busy_poll")?
        ),
        _ => format!("{pooled:.0} µs"),
    };
    let over_base = number(json, "/throughput_ratio_of_medians/tunnel_over_no_agents_1")?;
    let over_nginx = number(json, "/throughput_ratio_of_medians/tunnel_over_nginx_1")?;
    let [fast_name, pooled_name, throughput_name] = tunnel_names();
    Ok(vec![
        Judged {
            target: fast_name,
            figure: figures.join("; "),
            verdict: fast_verdict,
        },
        Judged {
            target: pooled_name,
            figure: pooled_figure,
            verdict: Verdict::of(printed(pooled, 0) < POOLED_ADDED_US),
        },
        Judged {
            target: throughput_name,
            figure: match agents_pair(json, "/tunnel_agents_cpu_s_per_gib/streams_1") {
                Some([source, destination]) => format!(
                    "{over_base:.2} and {over_nginx:.2}, at {source:.2} / {destination:.2} CPU \
                     seconds per GiB (source / destination agent)"
                ),
                None => format!("{over_base:.2} and {over_nginx:.2}"),
            },
            verdict: Verdict::of(
                printed(over_base, 2) >= TUNNEL_OVER_NO_AGENTS
                    && printed(over_nginx, 2) >= TUNNEL_OVER_NGINX,
            ),
        },
    ])
}

fn streams_text(streams: usize) -> &'static str {
    if streams == 1 {
        "one stream"
    } else {
        "eight streams"
    }
}

pub fn memory_targets(json: &Value) -> anyhow::Result<Vec<Judged>> {
    let idle = array(json, "/idle")?
        .iter()
        .find(|i| {
            i.get("workloads").and_then(Value::as_u64) == Some(memory::IDLE_TARGET_WORKLOADS as u64)
        })
        .map(|i| number(i, "/agent/rss_mb"))
        .transpose()?;
    let held = array(json, "/connections/held")?
        .iter()
        .map(|h| number(h, "/rss_mb"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let all_open = number(json, "/connections/open")? == number(json, "/connections/count")?;
    let worst = held.iter().copied().fold(0.0, f64::max);
    let held_text = held
        .iter()
        .map(|mb| format!("{mb:.1}"))
        .collect::<Vec<_>>()
        .join(" and ");
    let [idle_name, held_name] = memory_names();
    Ok(vec![
        match idle {
            Some(mb) => Judged {
                target: idle_name,
                figure: format!("{mb:.1} MB"),
                verdict: Verdict::of(printed(mb, 1) < memory::IDLE_TARGET_MB),
            },
            None => Judged {
                target: idle_name,
                figure: "no idle measurement with 100 workloads".into(),
                verdict: Verdict::NotMeasured,
            },
        },
        Judged {
            target: held_name,
            figure: if all_open {
                format!("{held_text} MB (source and destination agent)")
            } else {
                format!("{held_text} MB, but not every connection was open")
            },
            verdict: Verdict::of(
                all_open && !held.is_empty() && printed(worst, 1) < memory::CONNECTIONS_TARGET_MB,
            ),
        },
    ])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn verdicts(rows: &[Judged]) -> Vec<Verdict> {
        rows.iter().map(|r| r.verdict).collect()
    }

    #[test]
    fn the_fast_path_rate_is_the_median_of_the_rounds_judged_as_printed() {
        let datapath = |ratios: &[f64]| {
            json!({ "rounds": ratios.iter().map(|r| json!({ "phases": [
                { "name": "no agents (all turns)", "ratio_to_no_agents": 1.0 },
                { "name": datapath::FAST_PATH_PHASE, "ratio_to_no_agents": r },
            ]})).collect::<Vec<_>>() })
        };
        let missed = datapath_targets(&datapath(&[0.846, 0.888, 0.99])).expect("judged");
        assert_eq!(verdicts(&missed), [Verdict::Missed]);
        assert_eq!(missed[0].figure, "0.888 (0.846–0.990) of no agents");
        // 0.9696 prints as 0.970.
        let met = datapath_targets(&datapath(&[0.9696, 0.95, 0.99])).expect("judged");
        assert_eq!(verdicts(&met), [Verdict::Met]);
        let err = datapath_targets(&json!({ "rounds": [{ "phases": [] }] })).unwrap_err();
        assert!(err.to_string().contains("has no phase"), "{err}");
    }

    fn load(fast: [f64; 2], tunnel: [[f64; 2]; 3]) -> Value {
        let setup = |label: &str, runs: Vec<[f64; 2]>| {
            json!({ "setup": label, "runs": runs.iter().map(|v| json!({ "vcpu_per_krps": v }))
                .collect::<Vec<_>>() })
        };
        json!({ "shapes": [
            { "shape": "1,000/s over one connection", "rate": 1000, "conns": 1, "setups": [
                setup("no agents", vec![[0.0, 0.0]]),
                setup(load::FAST_PATH_SETUP, vec![[0.001, 0.001]]),
                setup(load::TUNNEL_DEFAULTS_SETUP, tunnel.to_vec()),
            ]},
            { "shape": "1,000/s, a fresh connection each", "rate": 1000, "conns": null, "setups": [
                setup(load::FAST_PATH_SETUP, vec![fast]),
                setup(load::TUNNEL_DEFAULTS_SETUP, vec![[0.2, 0.2]]),
            ]},
        ]})
    }

    #[test]
    fn cpu_targets_take_the_dearest_fast_path_shape_and_the_tunnel_on_one_connection() {
        let rows = load(
            [0.0056, 0.004],
            [[0.081, 0.084], [0.05, 0.05], [0.083, 0.082]],
        );
        let rows = load_targets(&rows).expect("judged");
        assert_eq!(verdicts(&rows), [Verdict::Missed, Verdict::Missed]);
        assert_eq!(
            rows[0].figure,
            "0.006 at most (1,000/s, a fresh connection each, source agent)"
        );
        // The medians of three runs, each side on its own.
        assert_eq!(rows[1].figure, "0.081 / 0.082 (source / destination)");

        let rows = load(
            [0.0049, 0.005],
            [[0.059, 0.04], [0.0604, 0.07], [0.01, 0.05]],
        );
        let rows = load_targets(&rows).expect("judged");
        assert_eq!(verdicts(&rows), [Verdict::Met, Verdict::Met]);
    }

    fn tunnel(pooled: f64, fast_one: (f64, Option<[f64; 3]>)) -> Value {
        let fast = |(ratio, interval): (f64, Option<[f64; 3]>)| {
            json!({ "measured_over_reference": ratio,
                    "rounds_ratio_mean_and_95_interval": interval })
        };
        json!({
            "added_p50_us": { "pooled_tunnel": pooled, "pooled_tunnel_no_busy_poll": 256.0 },
            "agents_cpu_us_per_connection": {
                "pooled_tunnel": [131.2, 128.6], "pooled_tunnel_no_busy_poll": [60.4, 71.0],
            },
            "throughput_ratio_of_medians": {
                "tunnel_over_no_agents_1": 0.65, "tunnel_over_nginx_1": 1.42,
            },
            "tunnel_agents_cpu_s_per_gib": { "streams_1": [0.851, 0.8649] },
            "fast_path_throughput": {
                "streams_1": fast(fast_one),
                "streams_8": fast((0.995, Some([0.991, 0.995, 0.999]))),
            },
        })
    }

    #[test]
    fn fast_path_throughput_is_judged_on_its_interval() {
        let straddles = tunnel(40.0, (0.955, Some([0.945, 0.976, 1.007])));
        let rows = tunnel_targets(&straddles).expect("judged");
        assert_eq!(
            verdicts(&rows),
            [Verdict::NotResolved, Verdict::Met, Verdict::Missed]
        );
        assert_eq!(
            rows[0].figure,
            "0.955 with one stream (rounds: 0.976, 0.945–1.007); \
             0.995 with eight streams (rounds: 0.995, 0.991–0.999)"
        );
        assert_eq!(
            rows[1].figure,
            "40 µs, at 131 / 129 µs of the agents' CPU per connection (source / destination; \
             busy polling off: 256 µs added, at 60 / 71 µs)"
        );
        assert_eq!(
            rows[2].figure,
            "0.65 and 1.42, at 0.85 / 0.86 CPU seconds per GiB (source / destination agent)"
        );
        let below = tunnel(150.0, (0.983, Some([0.976, 0.983, 0.989])));
        let rows = tunnel_targets(&below).expect("judged");
        assert_eq!(verdicts(&rows)[..2], [Verdict::Missed, Verdict::Missed]);
        let above = tunnel(149.4, (0.995, Some([0.9896, 0.995, 1.001])));
        let rows = tunnel_targets(&above).expect("judged");
        assert_eq!(verdicts(&rows)[..2], [Verdict::Met, Verdict::Met]);
        let no_rounds = tunnel(40.0, (0.989, None));
        let rows = tunnel_targets(&no_rounds).expect("judged");
        assert_eq!(verdicts(&rows)[0], Verdict::Missed);
    }

    #[test]
    fn memory_targets_need_every_connection_open() {
        let memory = |open: u64| {
            json!({
                "idle": [
                    { "workloads": 10, "agent": { "rss_mb": 9.7 } },
                    { "workloads": memory::IDLE_TARGET_WORKLOADS, "agent": { "rss_mb": 16.04 } },
                ],
                "connections": { "count": 10000, "open": open,
                                 "held": [{ "rss_mb": 55.1 }, { "rss_mb": 53.4 }] },
            })
        };
        let rows = memory_targets(&memory(10000)).expect("judged");
        // 16.04 prints as 16.0: not under 16.
        assert_eq!(verdicts(&rows), [Verdict::Missed, Verdict::Met]);
        assert_eq!(
            rows[1].figure,
            "55.1 and 53.4 MB (source and destination agent)"
        );
        let rows = memory_targets(&memory(9000)).expect("judged");
        assert_eq!(verdicts(&rows)[1], Verdict::Missed);
    }

    #[test]
    fn a_suites_json_from_before_the_run_is_not_judged() {
        let dir = std::env::temp_dir().join(format!("latch-bench-targets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        std::fs::write(dir.join("datapath.json"), "{}").expect("writing");
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert!(
            this_run(&dir, "datapath", Some(later))
                .expect("read")
                .is_none()
        );
        assert!(this_run(&dir, "datapath", None).expect("read").is_some());
        assert!(this_run(&dir, "memory", None).expect("read").is_none());
        let rows = judge_or_not(None, memory_names().into(), memory_targets).expect("judged");
        assert_eq!(verdicts(&rows), [Verdict::NotMeasured; 2]);
        std::fs::write(dir.join("tunnel.json"), "{").expect("writing");
        let err = this_run(&dir, "tunnel", None).unwrap_err();
        assert!(format!("{err:#}").contains("tunnel.json"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
