//! The agent library's module graph has no cycles: `cargo modules` (rust-analyzer's view of every
//! `use` and doc link between modules) draws the graph, and a cycle in it fails the check, named
//! module by module. docs/architecture.md says why the layers only point down.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail};

use crate::cmd::{self, cargo, step};

/// The cargo-modules release that builds on the workspace's Rust (0.28 needs a newer one).
const CARGO_MODULES: &str = "0.27.0";

/// Install cargo-modules if it is missing or another version.
pub fn setup() -> anyhow::Result<()> {
    step("setup: cargo-modules, for the module graph check");
    let found = cmd::stdout_of(std::process::Command::new("cargo").args(["modules", "--version"]));
    if let Some(version) = found.as_deref().filter(|v| v.contains(CARGO_MODULES)) {
        println!("    ok: {}", version.trim());
        return Ok(());
    }
    println!(
        "    cargo-modules {CARGO_MODULES} is missing: installing it with `cargo install \
         cargo-modules@{CARGO_MODULES} --locked` (a few minutes, once per machine)"
    );
    cmd::run(
        std::process::Command::new("cargo")
            .args([
                "install",
                &format!("cargo-modules@{CARGO_MODULES}"),
                "--locked",
            ])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

/// Fail if a module of the `latch` library reaches itself through other modules.
pub fn check_acyclic() -> anyhow::Result<()> {
    setup()?;
    step("lint: the latch library's module graph has no cycles (cargo modules)");
    let mut command = cargo();
    command.args([
        "modules",
        "dependencies",
        "--lib",
        "-p",
        "latch",
        "--no-externs",
        "--no-sysroot",
        "--no-fns",
        "--no-types",
        "--no-traits",
        "--no-owns",
    ]);
    let output = command.output().context("running cargo modules")?;
    if !output.status.success() {
        bail!(
            "cargo modules dependencies failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let graph = uses(&String::from_utf8_lossy(&output.stdout));
    if graph.is_empty() {
        bail!("cargo modules drew no `uses` edge: its output format changed?");
    }
    let cycles = cycles(&graph);
    if cycles.is_empty() {
        println!(
            "    ok: {} modules, {} uses, no cycle",
            graph.len(),
            graph.values().map(BTreeSet::len).sum::<usize>()
        );
        return Ok(());
    }
    for cycle in &cycles {
        println!("    cycle: {}", cycle.join(" -> "));
    }
    bail!(
        "{} import cycle(s) among the latch library's modules",
        cycles.len()
    )
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The `uses` edges of a cargo-modules dot graph, between distinct modules.
fn uses(dot: &str) -> Graph {
    let mut graph = Graph::new();
    for line in dot.lines() {
        let Some((edge, attributes)) = line.split_once('[') else {
            continue;
        };
        if !attributes.starts_with("label=\"uses\"") {
            continue;
        }
        let Some((from, to)) = edge.split_once("->") else {
            continue;
        };
        let (from, to) = (from.trim().trim_matches('"'), to.trim().trim_matches('"'));
        if from != to {
            graph.entry(to.to_owned()).or_default();
            graph
                .entry(from.to_owned())
                .or_default()
                .insert(to.to_owned());
        }
    }
    graph
}

/// One cycle through each group of modules that reach one another (Tarjan's strongly connected
/// components), each as the path from its first module back to it.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        groups: Vec<Vec<&'g str>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            for w in &self.graph[v] {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.stack.contains(&w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let at = self.stack.iter().rposition(|&x| x == v).unwrap_or(0);
                let group = self.stack.split_off(at);
                if group.len() > 1 {
                    self.groups.push(group);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        groups: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.groups
        .iter()
        .map(|group| cycle_through(graph, group))
        .collect()
}

/// A path from `group`'s first module back to it, staying inside the group.
fn cycle_through(graph: &Graph, group: &[&str]) -> Vec<String> {
    let members: BTreeSet<&str> = group.iter().copied().collect();
    let start = group[0];
    // Breadth-first from the start's successors back to the start.
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph[v].iter().map(String::as_str) {
            if !members.contains(w) || came_from.contains_key(w) {
                continue;
            }
            came_from.insert(w, v);
            if w == start {
                queue.clear();
                break;
            }
            queue.push_back(w);
        }
    }
    let mut path = vec![start.to_owned()];
    let mut v = start;
    while let Some(&prev) = came_from.get(v) {
        path.push(prev.to_owned());
        if prev == start {
            break;
        }
        v = prev;
    }
    path.reverse();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(from: &str, to: &str) -> String {
        format!(
            "    \"{from}\" -> \"{to}\" [label=\"uses\", color=\"#7f7f7f\", style=\"dashed\"] \
             [constraint=false]; // \"uses\" edge"
        )
    }

    #[test]
    fn reads_uses_edges_and_names_a_cycle_module_by_module() {
        let dot = [
            edge("l::a", "l::b"),
            edge("l::b", "l::c"),
            edge("l::c", "l::a"),
            edge("l::c", "l::d"),
            "    \"l\" -> \"l::a\" [label=\"owns\"]; // \"owns\" edge".to_owned(),
        ]
        .join("\n");
        let graph = uses(&dot);
        assert_eq!(graph.len(), 4, "{graph:?}");
        let cycles = cycles(&graph);
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        let cycle = &cycles[0];
        assert_eq!(cycle.first(), cycle.last(), "{cycle:?}");
        assert_eq!(cycle.len(), 4, "three modules and back: {cycle:?}");
        for m in ["l::a", "l::b", "l::c"] {
            assert!(cycle.iter().any(|c| c == m), "{m} in {cycle:?}");
        }
    }

    #[test]
    fn a_graph_that_only_points_down_has_no_cycle() {
        let dot = [
            edge("l::a", "l::b"),
            edge("l::a", "l::c"),
            edge("l::b", "l::c"),
        ]
        .join("\n");
        assert!(cycles(&uses(&dot)).is_empty());
    }
}
