//! The Kubernetes manifests (`deploy/`, a kustomize base, and `deploy/crds`) are rendered with
//! `kubectl kustomize` and every object is validated offline against the Kubernetes 1.33 schemas,
//! strictly: an unknown field, a wrong type, a missing required field or a kind the schemas do
//! not know fails the step, naming the object and the field.
//!
//! The validator is PyPI's `kubernetes-validate`, pinned, in a virtualenv under
//! `target/manifests/` (`crate::venv`; its JSON schemas, every Kubernetes version's, ship inside the package, so
//! nothing is fetched once it is installed). It reports the first error of each object only.
//! Before the real manifests, it is shown a valid DaemonSet, one with a misspelled field and one
//! with a wrong type, and must pass the first and refuse the others, so that a validator that
//! stopped being strict (or working) is noticed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::{self, relative, root, step};

/// The validator release (it bundles the schemas of Kubernetes 1.x up to 1.37).
const KUBERNETES_VALIDATE: &str = "1.37.0";
/// The Kubernetes version the manifests must be valid for.
const KUBERNETES_VERSION: &str = "1.33.0";
/// The kustomizations under `deploy/`, each rendered and validated on its own.
const KUSTOMIZATIONS: &[&str] = &["deploy", "deploy/crds"];

fn work_dir() -> PathBuf {
    root().join("target").join("manifests")
}

fn validator() -> PathBuf {
    work_dir()
        .join("venv")
        .join("bin")
        .join("kubernetes-validate")
}

/// Install kubernetes-validate into `target/manifests/venv` if it is missing or another version.
pub fn setup() -> anyhow::Result<PathBuf> {
    step(&format!(
        "setup: kubernetes-validate {KUBERNETES_VALIDATE}, for the manifests check"
    ));
    let bin = validator();
    let found = cmd::stdout_of(Command::new(&bin).arg("--version"));
    if found.as_deref().map(str::trim) == Some(KUBERNETES_VALIDATE) {
        println!("    ok: kubernetes-validate {KUBERNETES_VALIDATE} in target/manifests/venv");
        return Ok(bin);
    }
    let venv = work_dir().join("venv");
    println!(
        "    kubernetes-validate {KUBERNETES_VALIDATE} is missing: installing it from PyPI into \
         {} (about 110 MB of schemas, once)",
        venv.display()
    );
    crate::venv::install(
        &venv,
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE}"),
    )?;
    Ok(bin)
}

/// Render every kustomization and validate what it renders; fail naming each bad object.
pub fn check() -> anyhow::Result<()> {
    let bin = setup()?;
    step(&format!(
        "manifests: deploy/ rendered by `kubectl kustomize`, every object validated against the \
         Kubernetes {KUBERNETES_VERSION} schemas (strict: unknown fields are errors)"
    ));
    let dir = work_dir();
    let mut rendered = Vec::new();
    for kustomization in KUSTOMIZATIONS {
        let output = Command::new("kubectl")
            .args(["kustomize", kustomization])
            .current_dir(root())
            .output()
            .context(
                "running `kubectl kustomize` (kubectl 1.27 or newer, with kustomize built in, \
                 is needed for the manifests check)",
            )?;
        if !output.status.success() {
            bail!(
                "`kubectl kustomize {kustomization}` failed:\n{}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let file = dir.join(format!("{}.yaml", kustomization.replace('/', "-")));
        std::fs::write(&file, &output.stdout)
            .with_context(|| format!("writing {}", file.display()))?;
        rendered.push((*kustomization, file, output.stdout));
    }

    // The validator has to pass a good DaemonSet and refuse a misspelled field and a wrong
    // type before its word on the real manifests counts.
    let canary_file = dir.join("canary.yaml");
    std::fs::write(&canary_file, canary())?;
    let report = validate(&bin, &canary_file)?;
    let refused = |name: &str, needle: &str| {
        report
            .problems
            .iter()
            .any(|p| p.starts_with(&format!("daemonset/{name}: ")) && p.contains(needle))
    };
    if report.passed != ["daemonset/good"]
        || !refused("misspelled", "hostNetwrok")
        || !refused("wrong-type", "terminationGracePeriodSeconds")
    {
        bail!(
            "kubernetes-validate {KUBERNETES_VALIDATE} does not validate strictly: for {} it \
             passed {:?} and said {:?} (expected: daemonset/good passed, `hostNetwrok` and \
             `terminationGracePeriodSeconds: thirty` refused)",
            canary_file.display(),
            report.passed,
            report.problems
        );
    }
    println!(
        "    ok: the validator refuses a misspelled field and a wrong type ({})",
        report.problems.join("; ")
    );

    let mut problems = Vec::new();
    for (kustomization, file, _) in &rendered {
        let report = validate(&bin, file)?;
        for problem in &report.problems {
            problems.push(format!("{kustomization}/: {problem}"));
        }
        if !report.passed.is_empty() {
            println!(
                "    ok: {kustomization}/: {} (rendered: {})",
                report.passed.join(", "),
                relative(file)
            );
        }
    }
    if !problems.is_empty() {
        bail!(
            "the manifests are not valid for Kubernetes {KUBERNETES_VERSION}:\n  - {}",
            problems.join("\n  - ")
        );
    }
    Ok(())
}

/// What kubernetes-validate said of one file.
#[derive(Debug, Default, PartialEq)]
struct Report {
    /// `kind/name` of each object that passed.
    passed: Vec<String>,
    /// `kind/name: field.path: why` of each object that did not, and anything else it said.
    problems: Vec<String>,
}

fn validate(bin: &Path, file: &Path) -> anyhow::Result<Report> {
    let output = Command::new(bin)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(file)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut report = parse(&stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stderr.trim().is_empty() {
        report.problems.push(stderr.trim().to_owned());
    }
    if !output.status.success() && report.problems.is_empty() {
        report
            .problems
            .push(format!("kubernetes-validate failed ({})", output.status));
    }
    Ok(report)
}

/// Read kubernetes-validate's lines: `INFO FILE passed for resource KIND/NAME against version V`,
/// `ERROR FILE did not validate for resource KIND/NAME against version V: FIELD: WHY`, `WARN
/// FILE Couldn't find schema for kind K ...` (a kind it does not know: an error here, since
/// everything under deploy/ is a built-in kind or a CRD) and anything else (an error too).
fn parse(stdout: &str) -> Report {
    let mut report = Report::default();
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("INFO ") {
            if let Some(object) = between(line, " for resource ", " against version ") {
                report.passed.push(object.to_owned());
                continue;
            }
        } else if line.starts_with("ERROR ") {
            if let (Some(object), Some((_, why))) = (
                between(line, " for resource ", " against version "),
                line.split_once(" against version ")
                    .and_then(|(_, rest)| rest.split_once(": ")),
            ) {
                report.problems.push(format!("{object}: {why}"));
                continue;
            }
        } else if let Some(rest) = line.strip_prefix("WARN ") {
            let why = rest.split_once(' ').map_or(rest, |(_, why)| why);
            report.problems.push(format!(
                "{why} (no schema: is kind or apiVersion misspelled?)"
            ));
            continue;
        }
        report.problems.push(line.to_owned());
    }
    report
}

fn between<'a>(line: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let (_, rest) = line.split_once(start)?;
    rest.split_once(end).map(|(inside, _)| inside)
}

/// A valid DaemonSet, then the same with `hostNetwork` misspelled, and with a word for a number.
fn canary() -> String {
    let good = "apiVersion: apps/v1
kind: DaemonSet
metadata: { name: NAME }
spec:
  selector: { matchLabels: { app: a } }
  template:
    metadata: { labels: { app: a } }
    spec:
      hostNetwork: true
      terminationGracePeriodSeconds: 30
      containers: [{ name: a, image: a }]
";
    [
        good.replace("NAME", "good"),
        good.replace("NAME", "misspelled")
            .replace("hostNetwork:", "hostNetwrok:"),
        good.replace("NAME", "wrong-type")
            .replace("Seconds: 30", "Seconds: thirty"),
    ]
    .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_validators_lines() {
        let out = "INFO f.yaml passed for resource namespace/latch-system against version 1.33\n\
                   ERROR f.yaml did not validate for resource daemonset/latch against version \
                   1.33: spec.template.spec: Additional properties are not allowed \
                   ('hostNetwrok' was unexpected)\n\
                   WARN f.yaml Couldn't find schema for kind DaemonSett with api version apps/v1 \
                   for kubernetes version 1.33\n\
                   Couldn't parse YAML from file f.yaml\n";
        let report = parse(out);
        assert_eq!(report.passed, ["namespace/latch-system"]);
        assert_eq!(
            report.problems,
            [
                "daemonset/latch: spec.template.spec: Additional properties are not allowed \
                 ('hostNetwrok' was unexpected)",
                "Couldn't find schema for kind DaemonSett with api version apps/v1 for kubernetes \
                 version 1.33 (no schema: is kind or apiVersion misspelled?)",
                "Couldn't parse YAML from file f.yaml",
            ]
        );
    }

    #[test]
    fn canary_breaks_one_thing_each() {
        let canary = canary();
        let docs: Vec<&str> = canary.split("---\n").collect();
        assert_eq!(docs.len(), 3);
        assert!(docs[0].contains("hostNetwork: true") && docs[0].contains("Seconds: 30"));
        assert!(docs[1].contains("hostNetwrok: true") && docs[1].contains("Seconds: 30"));
        assert!(docs[2].contains("hostNetwork: true") && docs[2].contains("Seconds: thirty"));
    }
}
