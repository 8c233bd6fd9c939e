//! Istio's policy objects as the watches deliver them, one at a time: each is checked on its
//! own by the same parser as the policy files, and keeps its last good version when a change
//! to it is refused, so one bad object never takes the others down. A refused object is kept
//! as a report (namespace/name, resource version, the errors), for the log, the debug API and
//! the metrics; a refused object that was never good is not in force, and one that asks to
//! DENY says so, so a DENY never goes missing without a word.

use std::{collections::BTreeMap, path::Path};

use crate::policy::{PolicyKind, PolicyObject, PolicySet};

/// Which object: kind, namespace, name.
pub type ObjectKey = (PolicyKind, String, String);

/// The policy objects of the cluster, each with its last good version.
#[derive(Debug, Default)]
pub struct PolicyObjects {
    objects: BTreeMap<ObjectKey, Entry>,
}

#[derive(Debug, Default)]
struct Entry {
    good: Option<PolicyObject>,
    refused: Option<Refused>,
}

/// An object version the parser refused, as the debug API lists it (`kind`, namespace, name,
/// resource version, the errors as `field.path: why`, whether an earlier version is in force
/// instead, whether the refused version asks to DENY).
pub use crate::debug::api::RefusedPolicy as Refused;

/// What applying one object did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// In force (new, or replacing the last good version).
    Accepted,
    Refused(Refused),
}

impl PolicyObjects {
    /// Take an added or changed object of `kind`, as the API server returned it.
    pub fn apply(&mut self, kind: PolicyKind, object: &serde_json::Value) -> Applied {
        let meta = &object["metadata"];
        let namespace = meta["namespace"].as_str().unwrap_or("default").to_owned();
        let name = meta["name"].as_str().unwrap_or_default().to_owned();
        let resource_version = meta["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let origin = format!("{kind:?} {namespace}/{name}");
        let parsed = match serde_yaml_ng::to_string(object) {
            Ok(text) => PolicyObject::parse(Path::new(&origin), &text)
                .map_err(|errors| errors.iter().map(ToString::to_string).collect()),
            Err(e) => Err(vec![format!("{origin}: cannot be read: {e}")]),
        };
        let entry = self
            .objects
            .entry((kind, namespace.clone(), name.clone()))
            .or_default();
        match parsed {
            Ok(policy) if policy.kind() == kind => {
                entry.good = Some(policy);
                entry.refused = None;
                Applied::Accepted
            }
            Ok(_) => self.refuse(
                (kind, namespace, name),
                resource_version,
                vec![format!("{origin}: kind: not a {kind:?}")],
                object,
            ),
            Err(errors) => self.refuse((kind, namespace, name), resource_version, errors, object),
        }
    }

    fn refuse(
        &mut self,
        key: ObjectKey,
        resource_version: String,
        errors: Vec<String>,
        object: &serde_json::Value,
    ) -> Applied {
        let entry = self.objects.entry(key.clone()).or_default();
        let refused = Refused {
            kind: format!("{:?}", key.0),
            namespace: key.1,
            name: key.2,
            resource_version,
            errors,
            last_good_kept: entry.good.is_some(),
            deny: object["spec"]["action"].as_str() == Some("DENY"),
        };
        entry.refused = Some(refused.clone());
        Applied::Refused(refused)
    }

    /// Forget a deleted object, good and refused versions alike.
    pub fn delete(&mut self, kind: PolicyKind, namespace: &str, name: &str) {
        self.objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()));
    }

    /// After a full list of `kind`: forget the objects of that kind the list does not hold.
    pub fn retain_listed(&mut self, kind: PolicyKind, listed: &[(String, String)]) {
        self.objects
            .retain(|(k, ns, name), _| *k != kind || listed.contains(&(ns.clone(), name.clone())));
    }

    /// Every object's last good version, as one policy set.
    pub fn set(&self, root_namespace: &str) -> PolicySet {
        PolicySet::from_objects(
            self.objects.values().filter_map(|e| e.good.as_ref()),
            root_namespace,
        )
    }

    /// The objects whose latest version was refused.
    pub fn refused(&self) -> Vec<Refused> {
        self.objects
            .values()
            .filter_map(|e| e.refused.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::policy::{Connection, Target};

    fn deny_all(name: &str, version: &str, action: &str) -> serde_json::Value {
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {
                "name": name, "namespace": "prod", "resourceVersion": version,
                "uid": "2c9a", "creationTimestamp": "2026-12-01T10:00:00Z",
                "managedFields": [{"manager": "kubectl", "operation": "Update"}]
            },
            "spec": {"action": action, "rules": [{}]}
        })
    }

    /// Whether the policies deny a plaintext connection to a `prod` pod.
    fn denies(objects: &PolicyObjects) -> bool {
        let labels = BTreeMap::new();
        let target = Target {
            namespace: "prod",
            labels: &labels,
        };
        let conn = Connection {
            source_principal: None,
            source_ip: Some("10.244.1.2".parse().expect("ip")),
            destination_ip: "10.244.2.2".parse().expect("ip"),
            destination_port: 8080,
        };
        !objects
            .set("istio-system")
            .evaluate_tcp(&target, &conn)
            .allowed
    }

    #[test]
    fn a_bad_change_keeps_the_last_good_version_and_is_reported() {
        let mut objects = PolicyObjects::default();
        let kind = PolicyKind::AuthorizationPolicy;
        assert_eq!(
            objects.apply(kind, &deny_all("deny", "1", "DENY")),
            Applied::Accepted
        );
        assert!(denies(&objects));

        let Applied::Refused(refused) = objects.apply(kind, &deny_all("deny", "2", "DENY-ISH"))
        else {
            panic!("an unknown action is refused");
        };
        assert!(refused.last_good_kept);
        assert_eq!(refused.resource_version, "2");
        assert!(
            refused.errors[0].starts_with("AuthorizationPolicy prod/deny")
                && refused.errors[0].contains("spec.action"),
            "{refused:?}"
        );
        assert!(denies(&objects), "the last good DENY stays in force");
        assert_eq!(objects.refused(), vec![refused]);

        assert_eq!(
            objects.apply(kind, &deny_all("deny", "3", "DENY")),
            Applied::Accepted
        );
        assert!(
            objects.refused().is_empty(),
            "a good version clears the report"
        );
    }

    #[test]
    fn one_bad_object_does_not_block_the_others() {
        let mut objects = PolicyObjects::default();
        let kind = PolicyKind::AuthorizationPolicy;
        let Applied::Refused(refused) = objects.apply(kind, &deny_all("broken", "1", "MAYBE"))
        else {
            panic!("refused");
        };
        assert!(!refused.last_good_kept);
        assert!(
            !denies(&objects),
            "a refused object that was never good is not in force"
        );
        assert_eq!(
            objects.apply(kind, &deny_all("deny", "2", "DENY")),
            Applied::Accepted
        );
        assert!(denies(&objects));
        assert_eq!(objects.refused().len(), 1);
    }

    #[test]
    fn a_refused_deny_says_so() {
        let mut objects = PolicyObjects::default();
        let mut object = deny_all("deny", "1", "DENY");
        object["spec"]["rules"] = json!([{"to": [{"operation": {"ports": ["eighty"]}}]}]);
        let Applied::Refused(refused) = objects.apply(PolicyKind::AuthorizationPolicy, &object)
        else {
            panic!("a bad port is refused");
        };
        assert!(refused.deny);
    }

    #[test]
    fn deleted_and_unlisted_objects_leave() {
        let mut objects = PolicyObjects::default();
        let kind = PolicyKind::AuthorizationPolicy;
        objects.apply(kind, &deny_all("deny", "1", "DENY"));
        objects.delete(kind, "prod", "deny");
        assert!(!denies(&objects));

        objects.apply(kind, &deny_all("deny", "2", "DENY"));
        objects.apply(kind, &deny_all("broken", "3", "NO"));
        objects.retain_listed(kind, &[("prod".into(), "broken".into())]);
        assert!(!denies(&objects));
        assert_eq!(objects.refused().len(), 1);
        objects.retain_listed(PolicyKind::PeerAuthentication, &[]);
        assert_eq!(
            objects.refused().len(),
            1,
            "another kind's list leaves these alone"
        );
    }
}
