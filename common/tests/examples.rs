//! The example configurations the Debian packages ship
//! (`packaging/examples/`, installed under /usr/share/doc) parse as they
//! are, show the defaults they claim, and name every key the parsers
//! accept: a new config field without its example fails here. The key
//! reference the section-5 man pages are made from
//! (`backy_common::config_reference`) is held to the same configs with
//! every key set, to the examples, and to the parsers' defaults.

use backy_common::config::*;
use backy_common::config_reference::{self, ConfigReference, KeyDefault};
use backy_common::source::{Hooks, QemuDisk, QemuSpec, SourceSpec};
use backy_common::tracker_audit::SamplePercent;
use backy_common::units::Interval;
use backy_common::JobName;
use std::collections::{BTreeMap, BTreeSet};

const SERVER: &str = include_str!("../../packaging/examples/server.yaml");
const CLIENT: &str = include_str!("../../packaging/examples/client.yaml");

/// Names an operator chooses (jobs, schedules, tags, identities): map keys
/// that are not config keys.
const CHOSEN: [&str; 5] = ["somejob", "someschedule", "sometag", "someclient", "somegroup"];

#[test]
fn the_server_example_parses_and_shows_the_defaults() {
    let cfg = ServerConfig::from_yaml(SERVER, "server.yaml").unwrap();
    // "Defaults shown" in the example's comments.
    assert_eq!(cfg.resume, ResumeConfig::default());
    assert_eq!(cfg.scrub, ScrubConfig::default());
    assert_eq!(cfg.limits, Limits::default());
    assert_eq!(cfg.file_mode, DEFAULT_FILE_MODE);
    assert!(!cfg.insecure_plaintext);
    // What the packaged unit (ReadWritePaths=) and README assume.
    assert_eq!(cfg.base_dir, std::path::Path::new("/srv/backy"));
    assert_eq!(cfg.secrets_group.as_deref(), Some("backy"));
    for role in [
        Role::Hypervisor,
        Role::ReadOnly,
        Role::Admin,
        Role::Replica,
        Role::Operator,
    ] {
        assert!(
            cfg.clients.values().any(|c| c.role == role),
            "an identity with role {role:?}"
        );
    }
    let job = |n: &str| cfg.job(&JobName::new(n).unwrap()).unwrap().clone();
    assert_eq!(job("vm2").client.as_deref(), Some("hv01"));
    assert_eq!(job("scratch").schedule, None);
}

#[test]
fn the_client_example_parses_with_every_kind_of_source() {
    let cfg = ClientConfig::from_yaml(CLIENT, "client.yaml").unwrap();
    let kinds: BTreeSet<&str> = cfg.jobs.values().map(|j| j.source.kind()).collect();
    assert_eq!(kinds, BTreeSet::from(["block", "ceph-rbd", "file", "qemu"]));
    // The server example's jobs for this hypervisor's identity.
    let server = ServerConfig::from_yaml(SERVER, "server.yaml").unwrap();
    for name in cfg.jobs.keys() {
        assert_eq!(
            server.job(name).unwrap().client.as_deref(),
            Some("hv01"),
            "{name}"
        );
    }
}

/// A server config with every key set: what the example and the key
/// reference (backy_common::config_reference) are held to.
fn server_everything() -> ServerConfig {
    ServerConfig {
        listen: DEFAULT_LISTEN.into(),
        http_listen: Some("127.0.0.1:9623".into()),
        base_dir: "/b".into(),
        store: Some(StoreConfig::CephRbd(CephStoreConfig {
            conf: "/ceph.conf".into(),
            id: "i".into(),
            keyring: Some("/keyring".into()),
            pool: "p".into(),
            namespace: Some("n".into()),
            lease: Interval::from_secs(1),
            lease_renewal: Interval::from_secs(1),
            lease_margin: Interval::from_secs(1),
            op_timeout: Interval::from_secs(1),
        })),
        schedules: BTreeMap::from([(
            "someschedule".into(),
            ScheduleConfig {
                tags: BTreeMap::from([(
                    "sometag".into(),
                    TagRule {
                        interval: Interval::from_secs(1),
                        keep: 1,
                    },
                )]),
                retention_lock: Some(Interval::from_secs(1)),
            },
        )]),
        jobs: BTreeMap::from([(
            JobName::new("somejob").unwrap(),
            JobConfig {
                schedule: Some("someschedule".into()),
                client: Some("someclient".into()),
                moved_source: None,
                moved_hooks: None,
                max_size: Some(1),
                retention_lock: Some(Interval::from_secs(1)),
                // Not configuration (set on a replica from its records).
                copy_owner: None,
            },
        )]),
        resume: ResumeConfig {
            enabled: true,
            window: Interval::from_secs(1),
            checkpoint: 1,
        },
        scrub: ScrubConfig {
            enabled: true,
            interval: Interval::from_secs(1),
            rate: 1,
        },
        tls: Some(TlsConfig {
            cert: "/c".into(),
            key: "/k".into(),
            client_ca: Some("/ca".into()),
        }),
        insecure_plaintext: false,
        clients: BTreeMap::from([(
            "someclient".into(),
            ClientIdentity {
                role: Role::Admin,
                token_hash: Some("h".into()),
                cert_fingerprint: Some("f".into()),
                jobs: Some(vec![JobName::new("vm1").unwrap()]),
                may_remove: true,
            },
        )]),
        limits: Limits {
            streams_per_client: 1,
            idle_timeout: Interval::from_secs(1),
            max_connections: 1,
            connections_per_client: 1,
            idle_connection_timeout: Interval::from_secs(1),
            first_request_timeout: Interval::from_secs(1),
            max_streams: 1,
        },
        dedup: DedupScope::Host,
        file_mode: DEFAULT_FILE_MODE,
        secrets_group: Some("g".into()),
        replicate: Some(ReplicateConfig {
            source: "https://s:1".into(),
            ca: Some("/ca".into()),
            token_file: Some("/t".into()),
            cert: Some("/c".into()),
            key: Some("/k".into()),
            tls_server_name: Some("s".into()),
            jobs: vec!["vm1".into()],
            max_jobs: 1,
            interval: Interval::from_secs(1),
            lag_warning: Interval::from_secs(1),
            lag_critical: Interval::from_secs(2),
            bwlimit: Some(1),
        }),
    }
}

#[test]
fn the_server_example_names_every_key() {
    let everything = server_everything();
    let keys = keys_of(&serde_yaml::to_value(&everything).unwrap());
    assert!(keys.len() > 25, "{keys:?}");
    let missing: Vec<&String> = keys.iter().filter(|k| !mentions_key(SERVER, k)).collect();
    assert!(missing.is_empty(), "server.yaml example lacks {missing:?}");
    for role in [
        Role::Hypervisor,
        Role::ReadOnly,
        Role::Admin,
        Role::Replica,
        Role::Operator,
    ] {
        let name = serde_yaml::to_value(role).unwrap();
        let name = name.as_str().unwrap();
        assert!(SERVER.contains(&format!("role: {name}")), "role {name}");
    }
}

/// A client config with every key set, each kind of source once.
fn client_everything() -> ClientConfig {
    let hooks = Hooks {
        pre_snapshot: Some("p".into()),
        post_snapshot: Some("q".into()),
        cleanup: Some("c".into()),
        hook_timeout: Some(1),
    };
    let sources = [
        SourceSpec::File {
            path: "/f".into(),
            hooks: hooks.clone(),
        },
        SourceSpec::Block {
            path: "/b".into(),
            hooks: hooks.clone(),
        },
        SourceSpec::CephRbd {
            pool: "p".into(),
            image: "i".into(),
            namespace: Some("n".into()),
            conf: Some("/c".into()),
            id: Some("i".into()),
            keyring: Some("/k".into()),
            hooks,
        },
        SourceSpec::Qemu(QemuSpec::image("/q")),
        SourceSpec::Qemu(QemuSpec {
            disk: QemuDisk::Running {
                qmp: "/q".into(),
                node: "n".into(),
                scratch_dir: Some("/s".into()),
            },
            hooks: Hooks::default(),
        }),
    ];
    // A new kind of source fails to compile here: add it above.
    for s in &sources {
        match s {
            SourceSpec::File { .. }
            | SourceSpec::Block { .. }
            | SourceSpec::CephRbd { .. }
            | SourceSpec::Qemu(_) => {}
        }
        assert!(
            CLIENT.contains(&format!("type: {}", s.kind())),
            "client.yaml example lacks a {} source",
            s.kind()
        );
    }
    let jobs = sources
        .into_iter()
        .enumerate()
        .map(|(i, source)| {
            (
                JobName::new(&format!("somejob{i}")).unwrap(),
                ClientJob {
                    source,
                    audit_sample: Some(SamplePercent::new(1.0).unwrap()),
                    encryption: (i == 0).then(|| backy_common::config::Encryption {
                        key_file: "/k".into(),
                    }),
                },
            )
        })
        .collect();
    ClientConfig {
        server: Some("s".into()),
        token_file: Some("/t".into()),
        ca: Some("/ca".into()),
        cert: Some("/c".into()),
        key: Some("/k".into()),
        tls_server_name: Some("n".into()),
        jobs,
        bwlimit: Some(1),
        audit_sample: Some(SamplePercent::new(1.0).unwrap()),
        groups: BTreeMap::from([(
            JobName::new("somegroup").unwrap(),
            ClientGroup {
                jobs: vec![JobName::new("somejob4").unwrap()],
                hooks: Hooks {
                    pre_snapshot: Some("p".into()),
                    post_snapshot: Some("q".into()),
                    cleanup: Some("c".into()),
                    hook_timeout: Some(1),
                },
            },
        )]),
    }
}

#[test]
fn the_client_example_names_every_key() {
    let everything = client_everything();
    let keys = keys_of(&serde_yaml::to_value(&everything).unwrap());
    let keys: BTreeSet<String> = keys.into_iter().filter(|k| !k.starts_with("somejob")).collect();
    assert!(keys.len() > 15, "{keys:?}");
    let missing: Vec<&String> = keys.iter().filter(|k| !mentions_key(CLIENT, k)).collect();
    assert!(missing.is_empty(), "client.yaml example lacks {missing:?}");
}

/// Every mapping key in `v`, at any depth, but names an operator chooses.
fn keys_of(v: &serde_yaml::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    collect(v, &mut out);
    out.retain(|k| !CHOSEN.contains(&k.as_str()));
    out
}

fn collect(v: &serde_yaml::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                if let Some(k) = k.as_str() {
                    out.insert(k.to_string());
                }
                collect(v, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| collect(v, out)),
        serde_yaml::Value::Tagged(t) => collect(&t.value, out),
        _ => {}
    }
}

/// Whether `text` has `key:` as a YAML key: at the start of a line (also
/// commented out, for alternatives such as insecure-plaintext) or inside a
/// flow mapping (`{key: ...}`, `, key: ...`); not merely in prose.
fn mentions_key(text: &str, key: &str) -> bool {
    let k = format!("{key}:");
    text.lines().any(|line| {
        let l = line.trim_start();
        let l = l.strip_prefix('#').map_or(l, str::trim_start);
        l.starts_with(&k) || line.contains(&format!("{{{k}")) || line.contains(&format!(", {k}"))
    })
}

#[test]
fn mentions_key_ignores_prose() {
    assert!(mentions_key("a:\n  b: 1\n", "b"));
    assert!(mentions_key("# insecure-plaintext: true\n", "insecure-plaintext"));
    assert!(mentions_key("x: {y: 1, z: 2}\n", "z"));
    assert!(!mentions_key("# needs tls: client-ca\n", "client-ca"));
    assert!(!mentions_key("token-key: 1\n", "key"));
}

/// The names [`CHOSEN`] stand for in the key reference's paths.
fn placeholder(segment: &str) -> Option<&'static str> {
    match segment {
        "someschedule" => Some("SCHEDULE"),
        "sometag" => Some("TAG"),
        "someclient" => Some("IDENTITY"),
        "somegroup" => Some("GROUP"),
        s if s.starts_with("somejob") && s["somejob".len()..].bytes().all(|b| b.is_ascii_digit()) => {
            Some("JOB")
        }
        _ => None,
    }
}

/// Every key path in `v` (`tls.cert`, `jobs.vm1.schedule`), dotted.
fn paths_of(v: &serde_yaml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().expect("string keys");
                let path = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(path.clone());
                paths_of(v, &path, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| paths_of(v, prefix, out)),
        serde_yaml::Value::Tagged(t) => paths_of(&t.value, prefix, out),
        _ => {}
    }
}

/// The key paths of a config with chosen names as the reference writes
/// them (`jobs.JOB.schedule`).
fn reference_paths_of(v: &serde_yaml::Value) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    paths_of(v, "", &mut paths);
    paths
        .iter()
        .map(|p| {
            p.split('.')
                .map(|s| placeholder(s).unwrap_or(s))
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect()
}

/// Whether the concrete `path` is `documented` (upper-case segments stand
/// for any name).
fn documented_as(path: &str, documented: &str) -> bool {
    let (p, d): (Vec<&str>, Vec<&str>) = (path.split('.').collect(), documented.split('.').collect());
    p.len() == d.len()
        && p.iter()
            .zip(&d)
            .all(|(p, d)| p == d || (d.bytes().all(|b| b.is_ascii_uppercase())))
}

fn documented(reference: &ConfigReference) -> BTreeSet<String> {
    let paths: BTreeSet<String> = reference.keys.iter().map(|k| k.path.to_string()).collect();
    assert_eq!(
        paths.len(),
        reference.keys.len(),
        "{}: a key documented twice",
        reference.page
    );
    for k in reference.keys {
        assert!(
            !k.doc.trim().is_empty() && !k.kind.is_empty(),
            "{}: {} undocumented",
            reference.page,
            k.path
        );
    }
    paths
}

/// The reference documents exactly the keys the structs have: a new field
/// without its entry (or an entry for a field that went) fails here.
#[test]
fn the_key_reference_has_every_key_and_no_other() {
    for (reference, everything) in [
        (
            &config_reference::SERVER,
            serde_yaml::to_value(server_everything()).unwrap(),
        ),
        (
            &config_reference::CLIENT,
            serde_yaml::to_value(client_everything()).unwrap(),
        ),
    ] {
        let keys = reference_paths_of(&everything);
        let documented = documented(reference);
        let undocumented: Vec<&String> = keys.difference(&documented).collect();
        let gone: Vec<&String> = documented.difference(&keys).collect();
        assert!(
            undocumented.is_empty(),
            "{} lacks {undocumented:?}",
            reference.page
        );
        assert!(
            gone.is_empty(),
            "{} documents keys the config has not: {gone:?}",
            reference.page
        );
    }
}

/// Every key the example configs use is in the reference, at its place.
#[test]
fn every_key_of_the_examples_is_in_the_reference() {
    for (reference, example) in [
        (&config_reference::SERVER, SERVER),
        (&config_reference::CLIENT, CLIENT),
    ] {
        let documented = documented(reference);
        let mut paths = BTreeSet::new();
        paths_of(&serde_yaml::from_str(example).unwrap(), "", &mut paths);
        assert!(paths.len() > 20, "{paths:?}");
        let missing: Vec<&String> = paths
            .iter()
            .filter(|p| !documented.iter().any(|d| documented_as(p, d)))
            .collect();
        assert!(
            missing.is_empty(),
            "{} lacks the example's {missing:?}",
            reference.page
        );
    }
    assert!(documented_as("jobs.vm1.schedule", "jobs.JOB.schedule"));
    assert!(!documented_as("jobs.vm1.schedule", "jobs.JOB"));
    assert!(!documented_as("tls.cert", "tls.key"));
}

/// A default the reference gives as a value, written into a config that
/// leaves the key out, changes nothing the parser makes of it.
#[test]
fn the_reference_defaults_are_the_parsers_defaults() {
    let server = "base-dir: /b\nschedules: {someschedule: {sometag: {interval: 1d, keep: 1}}}\n\
                  jobs: {somejob: {schedule: someschedule}}\nclients: {someclient: {token-hash: h}}\n\
                  replicate: {source: 'https://s:1'}\n";
    let client = "jobs: {somejob: {source: {type: file, path: /f}}}\n";
    // The store's keys, on a server with a pool (which cannot be a replica).
    let pool = "base-dir: /b\njobs: {somejob: {schedule: none}}\n\
                store: {type: ceph-rbd, conf: /c, id: i, pool: p}\n";
    let mut checked = 0;
    for (reference, minimal) in [
        (&config_reference::SERVER, server),
        (&config_reference::CLIENT, client),
    ] {
        for k in reference.keys {
            let KeyDefault::Is(value) = k.default else {
                continue;
            };
            let minimal = match k.path.starts_with("store.") {
                true => pool,
                false => minimal,
            };
            let minimal: serde_yaml::Value = serde_yaml::from_str(minimal).unwrap();
            let mut given = minimal.clone();
            set(&mut given, k.path, serde_yaml::from_str(value).unwrap());
            let same = if reference.page == config_reference::SERVER.page {
                parse::<ServerConfig>(&given) == parse::<ServerConfig>(&minimal)
            } else {
                parse::<ClientConfig>(&given) == parse::<ClientConfig>(&minimal)
            };
            assert!(
                same,
                "{}: {} is not {value} when left out",
                reference.page, k.path
            );
            checked += 1;
        }
    }
    assert!(checked > 15, "{checked}");
    // The check can fail: a value that is not the default.
    let mut given: serde_yaml::Value = serde_yaml::from_str(server).unwrap();
    set(&mut given, "scrub.rate", serde_yaml::from_str("49M").unwrap());
    assert_ne!(
        parse::<ServerConfig>(&given),
        parse::<ServerConfig>(&serde_yaml::from_str(server).unwrap())
    );
}

fn parse<T: serde::de::DeserializeOwned>(v: &serde_yaml::Value) -> T {
    serde_yaml::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v:?}"))
}

/// Sets the reference's `path` in `config` (its placeholders as the
/// chosen names), making the mappings on the way.
fn set(config: &mut serde_yaml::Value, path: &str, value: serde_yaml::Value) {
    let names = [
        ("SCHEDULE", "someschedule"),
        ("TAG", "sometag"),
        ("IDENTITY", "someclient"),
        ("JOB", "somejob"),
        ("GROUP", "somegroup"),
    ];
    let mut at = config;
    for segment in path.split('.') {
        let segment = names
            .iter()
            .find(|(p, _)| *p == segment)
            .map_or(segment, |(_, n)| n);
        let map = at.as_mapping_mut().expect("a mapping on the way");
        at = map
            .entry(segment.into())
            .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    }
    *at = value;
}
