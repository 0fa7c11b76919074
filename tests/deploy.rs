//! The files under `deploy/`: every conflist is a configuration the plugin accepts, the
//! Kubernetes manifests are well formed, and the systemd unit runs a command line the daemon
//! accepts. Pure file checks: no root needed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

#[test]
fn deploy_conflists_are_valid_plugin_configs() {
    let dir = deploy("cni");
    let mut seen = 0;
    let mut modes = BTreeSet::new();
    for e in fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "conflist") {
            continue;
        }
        let list: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            list["name"].is_string() && list["cniVersion"].is_string(),
            "{}",
            p.display()
        );
        for plugin in list["plugins"].as_array().unwrap() {
            if plugin["type"] != "vhost-pump-cni" {
                continue;
            }
            // The runtime injects name and cniVersion into each plugin's configuration.
            let mut c = plugin.clone();
            c["name"] = list["name"].clone();
            c["cniVersion"] = list["cniVersion"].clone();
            let conf = vhost_pump::cni::config::NetConf::from_value(c)
                .unwrap_or_else(|e| panic!("{}: {e:?}", p.display()));
            modes.insert(format!(
                "{:?}/{:?}",
                conf.mode,
                std::mem::discriminant(&conf.host_port)
            ));
            assert_eq!(
                conf.dan_conf_dir,
                Path::new("/run/kata-containers/dans"),
                "{}: danConfDir must match the Kata snippet",
                p.display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected a conflist per mode, found {seen}");
    assert!(modes.len() >= 3, "modes covered: {modes:?}");

    let kata: toml::Value =
        toml::from_str(&fs::read_to_string(deploy("kata/configuration-dan.toml")).unwrap())
            .expect("Kata snippet is TOML");
    assert_eq!(
        kata["runtime"]["dan_conf"].as_str(),
        Some("/run/kata-containers/dans")
    );
}

/// Checks `doc[path...]` is present and returns it.
#[track_caller]
fn field<'a>(doc: &'a serde_yaml_ng::Value, path: &[&str]) -> &'a serde_yaml_ng::Value {
    let mut v = doc;
    for p in path {
        v = v
            .get(*p)
            .unwrap_or_else(|| panic!("missing {} in {:?}", path.join("."), doc.get("kind")));
    }
    v
}

#[test]
fn deploy_kubernetes_manifests_are_well_formed() {
    let text = fs::read_to_string(deploy("kubernetes/vhost-pump-cni.yaml")).unwrap();
    let mut kinds = BTreeSet::new();
    for de in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc = serde_yaml_ng::Value::deserialize(de).expect("valid YAML");
        if doc.is_null() {
            continue;
        }
        let kind = field(&doc, &["kind"]).as_str().unwrap().to_string();
        assert!(field(&doc, &["apiVersion"]).is_string());
        assert!(field(&doc, &["metadata", "name"]).is_string());
        match kind.as_str() {
            "DaemonSet" => {
                assert_eq!(field(&doc, &["apiVersion"]).as_str(), Some("apps/v1"));
                let sel = field(&doc, &["spec", "selector", "matchLabels"]);
                let labels = field(&doc, &["spec", "template", "metadata", "labels"]);
                for (k, v) in sel.as_mapping().unwrap() {
                    assert_eq!(labels.get(k), Some(v), "selector must match the pod labels");
                }
                let pod = field(&doc, &["spec", "template", "spec"]);
                assert_eq!(field(pod, &["hostNetwork"]).as_bool(), Some(true));
                let volumes: BTreeSet<String> = field(pod, &["volumes"])
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|v| {
                        match v.get("hostPath") {
                            Some(h) => {
                                assert!(field(h, &["path"]).as_str().unwrap().starts_with('/'))
                            }
                            None => assert!(field(v, &["configMap", "name"]).is_string()),
                        }
                        field(v, &["name"]).as_str().unwrap().to_string()
                    })
                    .collect();
                let containers = field(pod, &["initContainers"])
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .chain(field(pod, &["containers"]).as_sequence().unwrap());
                let mut mounted = BTreeSet::new();
                for c in containers {
                    assert!(field(c, &["name"]).is_string());
                    assert!(!field(c, &["image"]).as_str().unwrap().is_empty());
                    assert!(!field(c, &["command"]).as_sequence().unwrap().is_empty());
                    for m in c
                        .get("volumeMounts")
                        .and_then(|m| m.as_sequence())
                        .into_iter()
                        .flatten()
                    {
                        let n = field(m, &["name"]).as_str().unwrap().to_string();
                        assert!(volumes.contains(&n), "volumeMount {n} has no volume");
                        assert!(field(m, &["mountPath"]).as_str().unwrap().starts_with('/'));
                        mounted.insert(n);
                    }
                }
                assert_eq!(mounted, volumes, "every volume is mounted");
            }
            "RuntimeClass" => {
                assert_eq!(
                    field(&doc, &["apiVersion"]).as_str(),
                    Some("node.k8s.io/v1")
                );
                assert!(field(&doc, &["handler"]).is_string());
            }
            "ConfigMap" => {
                for (k, v) in field(&doc, &["data"]).as_mapping().unwrap() {
                    if k.as_str().unwrap().ends_with(".conflist") {
                        serde_json::from_str::<Value>(v.as_str().unwrap())
                            .expect("the conflist in the ConfigMap is JSON");
                    }
                }
            }
            _ => {}
        }
        kinds.insert(kind);
    }
    for want in ["DaemonSet", "RuntimeClass", "ConfigMap"] {
        assert!(kinds.contains(want), "{want} missing; have {kinds:?}");
    }
}

#[test]
fn deploy_systemd_unit_runs_a_valid_command_line() {
    let unit = fs::read_to_string(deploy("systemd/vhost-pump@.service")).unwrap();
    let env_text = fs::read_to_string(deploy("systemd/vhost-pump-example.env")).unwrap();
    let vars: Vec<(String, String)> = env_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect();
    for section in ["[Unit]", "[Service]", "[Install]"] {
        assert!(unit.contains(section), "{section} missing");
    }
    assert!(unit.contains("EnvironmentFile="));
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut argv: Vec<String> = Vec::new();
    for word in exec.split_whitespace() {
        // $VAR splits into words, ${VAR} stays one word (systemd's rules).
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            let v = vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            argv.push(v.unwrap_or_else(|| panic!("{name} not in the example env file")));
        } else if let Some(name) = word.strip_prefix('$') {
            let v = vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            argv.extend(v.unwrap_or_default().split_whitespace().map(String::from));
        } else {
            argv.push(word.replace("%i", "example"));
        }
    }
    assert!(argv[0].ends_with("/vhost-pump"), "{argv:?}");
    use clap::Parser;
    vhost_pump::cli::Args::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("vhost-pump refuses {argv:?}: {e}"));
}
