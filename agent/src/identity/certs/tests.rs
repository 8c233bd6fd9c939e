//! The certificate store: dev-ca minting and half-life rotation (driven by an explicit clock, no
//! sleeping), the `files` source with reload on change and refusal of bad files, and the rustls
//! resolvers.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::svid::ns_sa;
use super::*;
use crate::identity::ca::init;
use crate::identity::ca::{DevCa, Svid};

const TD: &str = "cluster.local";
const FRONTEND: &str = "spiffe://cluster.local/ns/prod/sa/frontend";

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("latch-certs-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("tempdir");
    dir
}

fn dev_ca(dir: &Path) -> DevCa {
    let (cert, key) = init(&dir.join("ca")).expect("init");
    DevCa::load(&cert, &key).expect("load")
}

#[test]
fn dev_ca_mints_and_rotates_at_half_life() {
    let dir = tempdir("devca");
    let ttl = Duration::from_secs(10);
    let store = Arc::new(CertStore::new(
        Some(Source::DevCa {
            ca: Box::new(dev_ca(&dir)),
            ttl,
        }),
        TD,
    ));
    store.ensure(&[FRONTEND.to_owned()]).expect("ensure");
    let first = store.current(FRONTEND).expect("minted");
    assert_eq!(first.svid.spiffe_id, FRONTEND);

    let now = SystemTime::now();
    let (rotated, failed) = store.refresh(now);
    assert!(
        rotated.is_empty() && failed.is_empty(),
        "nothing is due yet"
    );
    assert_eq!(
        store.current(FRONTEND).expect("current").svid.serial,
        first.svid.serial
    );

    // Past half of the lifetime (5 s of 10 after issuing): rotate, and the new SVID replaces the
    // old one.
    let later = first.svid.issued_at + Duration::from_secs(6);
    let (rotated, failed) = store.refresh(later);
    assert_eq!(rotated, vec![FRONTEND.to_owned()]);
    assert!(failed.is_empty());
    let second = store.current(FRONTEND).expect("current");
    assert_ne!(second.svid.serial, first.svid.serial);
    assert!(second.svid.not_after >= first.svid.not_after);

    // The resolver hands out the current certificate.
    let resolver = store.resolver(FRONTEND);
    let key = rustls::client::ResolvesClientCert::resolve(&*resolver, &[], &[]).expect("resolves");
    assert_eq!(key.cert, second.svid.chain);

    // Forgetting an identity drops its SVID.
    store.retain(&[]);
    assert!(store.current(FRONTEND).is_none());
    let _ = fs::remove_dir_all(&dir);
}

fn write_svid(dir: &Path, ca: &DevCa, svid: &Svid) {
    let base = dir.join("prod").join("frontend");
    fs::create_dir_all(&base).expect("dir");
    fs::write(base.join("cert.pem"), svid.chain_pem()).expect("cert");
    fs::write(base.join("key.pem"), svid.key_pem()).expect("key");
    fs::write(base.join("bundle.pem"), ca.certificate_pem()).expect("bundle");
    // Each write gets its own modification time, even within one filesystem time tick.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    for f in ["cert.pem", "key.pem", "bundle.pem"] {
        let file = fs::File::options()
            .write(true)
            .open(base.join(f))
            .expect("open");
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + n))
            .expect("mtime");
    }
}

/// A `files` store over a new temporary directory, holding frontend's SVID from a new dev CA.
struct FilesStore {
    dir: PathBuf,
    ca: DevCa,
    certs_dir: PathBuf,
    store: CertStore,
    /// The SVID written and loaded at the start.
    first: Svid,
}

fn files_store(name: &str) -> FilesStore {
    let dir = tempdir(name);
    let ca = dev_ca(&dir);
    let certs_dir = dir.join("svids");
    let first = ca.mint(FRONTEND, Duration::from_secs(3600)).expect("svid");
    write_svid(&certs_dir, &ca, &first);
    let store = CertStore::new(
        Some(Source::Files {
            dir: certs_dir.clone(),
        }),
        TD,
    );
    store.ensure(&[FRONTEND.to_owned()]).expect("loads");
    FilesStore {
        dir,
        ca,
        certs_dir,
        store,
        first,
    }
}

#[test]
fn files_source_loads_reloads_on_change_and_refuses_bad_files() {
    let FilesStore {
        dir,
        ca,
        certs_dir,
        store,
        ..
    } = files_store("files");
    let first = store
        .current(FRONTEND)
        .expect("current")
        .svid
        .serial
        .clone();

    // Unchanged files: nothing to do.
    assert!(store.refresh(SystemTime::now()).0.is_empty());

    // A renewed certificate on disk is picked up.
    write_svid(
        &certs_dir,
        &ca,
        &ca.mint(FRONTEND, Duration::from_secs(3600)).expect("svid"),
    );
    let (rotated, failed) = store.refresh(SystemTime::now());
    assert_eq!(rotated, vec![FRONTEND.to_owned()], "failed: {failed:?}");
    let second = store
        .current(FRONTEND)
        .expect("current")
        .svid
        .serial
        .clone();
    assert_ne!(first, second);

    // A certificate for another identity is refused and the current one kept.
    write_svid(
        &certs_dir,
        &ca,
        &ca.mint(
            "spiffe://cluster.local/ns/prod/sa/ledger",
            Duration::from_secs(3600),
        )
        .expect("svid"),
    );
    let (rotated, failed) = store.refresh(SystemTime::now());
    assert!(rotated.is_empty());
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0]
            .1
            .to_string()
            .contains("expected spiffe://cluster.local/ns/prod/sa/frontend"),
        "{}",
        failed[0].1
    );
    assert_eq!(store.current(FRONTEND).expect("kept").svid.serial, second);

    // A broken key file: the error names the file and never shows key material.
    let key_path = certs_dir.join("prod/frontend/key.pem");
    fs::write(
        &key_path,
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let fresh = CertStore::new(
        Some(Source::Files {
            dir: certs_dir.clone(),
        }),
        TD,
    );
    let err = fresh
        .ensure(&[FRONTEND.to_owned()])
        .expect_err("refused")
        .to_string();
    assert!(!err.contains("c2VjcmV0"), "key material leaked: {err}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn kubernetes_paths_are_required_for_files() {
    assert_eq!(ns_sa(FRONTEND), Some(("prod".into(), "frontend".into())));
    assert_eq!(ns_sa("spiffe://cluster.local/workload/x"), None);
    assert_eq!(ns_sa("spiffe://cluster.local/ns/a/sa/b/c"), None);
}

#[test]
fn a_files_key_that_is_not_the_certificates_is_refused_naming_the_file() {
    let FilesStore {
        dir,
        ca,
        certs_dir,
        store,
        first: good,
    } = files_store("mismatch");
    // The certificate of one SVID with the key of another.
    let other = ca.mint(FRONTEND, Duration::from_secs(3600)).expect("svid");
    let mixed = Svid {
        key: other.key.clone_key(),
        ..(*store.current(FRONTEND).expect("current").svid).clone()
    };
    write_svid(&certs_dir, &ca, &mixed);
    let (rotated, failed) = store.refresh(SystemTime::now());
    assert!(rotated.is_empty());
    let [(id, error)] = failed.as_slice() else {
        panic!("one refusal expected: {failed:?}");
    };
    assert_eq!(id, FRONTEND);
    let error = error.to_string();
    assert!(
        error.contains(
            &certs_dir
                .join("prod/frontend/key.pem")
                .display()
                .to_string()
        ) && error.contains("does not belong to the certificate"),
        "{error}"
    );
    assert_eq!(
        store.current(FRONTEND).expect("kept").svid.serial,
        good.serial,
        "the last good SVID stays"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_bundle_keeps_its_trust_epoch_across_rotations_and_a_new_bundle_gets_another() {
    let FilesStore {
        dir,
        ca,
        certs_dir,
        store,
        ..
    } = files_store("epochs");
    let first = store.trust(FRONTEND).expect("epoch");
    assert!(
        store.take_trust_changes().is_empty(),
        "a first SVID changes nothing"
    );
    let changes = store.trust_changes();

    // A renewed certificate under the same bundle: same epoch, no change.
    write_svid(
        &certs_dir,
        &ca,
        &ca.mint(FRONTEND, Duration::from_secs(3600)).expect("svid"),
    );
    assert_eq!(store.refresh(SystemTime::now()).0.len(), 1);
    assert_eq!(store.trust(FRONTEND), Some(first));
    assert!(store.take_trust_changes().is_empty());

    // Another CA: another bundle, another epoch, reported once.
    let other = {
        let (cert, key) = init(&dir.join("other-ca")).expect("init");
        DevCa::load(&cert, &key).expect("load")
    };
    write_svid(
        &certs_dir,
        &other,
        &other
            .mint(FRONTEND, Duration::from_secs(3600))
            .expect("svid"),
    );
    assert_eq!(store.refresh(SystemTime::now()).0.len(), 1);
    assert_ne!(store.trust(FRONTEND), Some(first));
    assert_eq!(store.take_trust_changes(), vec![FRONTEND.to_owned()]);
    assert!(store.take_trust_changes().is_empty(), "reported once");
    assert!(!changes.has_changed().expect("open"));
    store.announce_trust_change();
    assert!(changes.has_changed().expect("open"), "watchers are told");
    let _ = fs::remove_dir_all(&dir);
}
