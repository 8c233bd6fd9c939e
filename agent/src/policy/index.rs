//! Finds the policies that may apply to a workload without looking at unrelated ones.
//!
//! Policies are bucketed by namespace. Within a bucket, namespace-wide policies (no selector)
//! form one list; the others are filed under the first `(key, value)` pair of their selector.
//! A workload's candidates are the namespace-wide list plus, for each of its labels, the policies
//! filed under that label; each candidate's full selector is then checked. The cost of a lookup
//! grows with the policies that share a namespace and a label with the workload, not with the
//! size of the set.

use std::collections::{BTreeMap, HashMap};

/// Positions into the caller's policy list, in increasing order within each list.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bucket {
    pub wide: Vec<u32>,
    by_label: HashMap<String, HashMap<String, Vec<u32>>>,
}

impl Bucket {
    fn insert(&mut self, id: u32, selector: &BTreeMap<String, String>) {
        match selector.iter().next() {
            None => self.wide.push(id),
            Some((k, v)) => self
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(id),
        }
    }

    /// Policies with a selector that `labels` satisfy, appended to `out` (unsorted).
    pub(crate) fn selected<'s>(
        &self,
        labels: &BTreeMap<String, String>,
        selector_of: impl Fn(u32) -> &'s BTreeMap<String, String>,
        out: &mut Vec<u32>,
    ) {
        if self.by_label.is_empty() {
            return;
        }
        for (key, value) in labels {
            let Some(ids) = self.by_label.get(key).and_then(|m| m.get(value)) else {
                continue;
            };
            for &id in ids {
                if selector_of(id)
                    .iter()
                    .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
                {
                    out.push(id);
                }
            }
        }
    }
}

/// All buckets of one kind of policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Index {
    namespaces: HashMap<String, Bucket>,
}

impl Index {
    /// Index `policies` given as (namespace, selector) in id order.
    pub(crate) fn build<'p>(
        policies: impl Iterator<Item = (&'p str, &'p BTreeMap<String, String>)>,
    ) -> Self {
        let mut index = Self::default();
        for (id, (namespace, selector)) in policies.enumerate() {
            let id = u32::try_from(id).unwrap_or(u32::MAX);
            index
                .namespaces
                .entry(namespace.to_owned())
                .or_default()
                .insert(id, selector);
        }
        index
    }

    pub(crate) fn bucket(&self, namespace: &str) -> Option<&Bucket> {
        self.namespaces.get(namespace)
    }
}
