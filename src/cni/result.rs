//! The CNI result: interfaces, IPs, routes and DNS, kept in the 1.1.0 shape and rendered in
//! the version the runtime asked for. Also parses results of any supported version (IPAM
//! answers, `prevResult`).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::version::CniVersion;

/// One interface of a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Netns path for sandbox interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// vhost-user socket (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
}

/// One address of a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix.
    pub address: IpNet,
    /// Gateway of the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route of a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// DNS settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// A whole result (IPAM results have no interfaces).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// Interfaces created.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Addresses.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// DNS.
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Parses a result of any supported version (0.3.x/0.4.0 `ips[].version` is ignored; unknown
    /// keys too).
    pub fn parse(v: &Value) -> Result<CniResult, serde_json::Error> {
        CniResult::deserialize(v)
    }

    /// The gateway of the first address of the same family as `ip`.
    pub fn gateway_for(&self, ip: &IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .filter_map(|c| c.gateway)
            .find(|g| g.is_ipv4() == ip.is_ipv4())
    }

    /// The result JSON in `version`'s shape.
    pub fn render(&self, version: CniVersion) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if version < CniVersion::V1_1_0 {
            if let Some(ifs) = v["interfaces"].as_array_mut() {
                for i in ifs.iter_mut().filter_map(Value::as_object_mut) {
                    i.remove("mtu");
                    i.remove("socketPath");
                }
            }
        }
        if version < CniVersion::V1_0_0 {
            if let Some(ips) = v["ips"].as_array_mut() {
                for ip in ips.iter_mut() {
                    let four = ip["address"].as_str().is_some_and(|a| !a.contains(':'));
                    ip["version"] = Value::from(if four { "4" } else { "6" });
                }
            }
        }
        v["cniVersion"] = Value::from(version.as_str());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Some("02:00:00:00:00:01".into()),
                mtu: Some(1500),
                sandbox: None,
                socket_path: Some("/run/vhost-pump/x/vu.sock".into()),
            }],
            ips: vec![IpConfig {
                address: "10.1.0.5/24".parse().unwrap(),
                gateway: Some("10.1.0.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn renders_per_version() {
        let r = sample();
        let v11 = r.render(CniVersion::V1_1_0);
        assert_eq!(
            v11["interfaces"][0]["socketPath"],
            "/run/vhost-pump/x/vu.sock"
        );
        assert_eq!(v11["interfaces"][0]["mtu"], 1500);
        assert_eq!(v11["ips"][0].get("version"), None);
        let v10 = r.render(CniVersion::V1_0_0);
        assert_eq!(v10["interfaces"][0].get("socketPath"), None);
        assert_eq!(v10["cniVersion"], "1.0.0");
        let v04 = r.render(CniVersion::V0_4_0);
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(CniResult::parse(&v04).unwrap().ips, r.ips);
    }

    #[test]
    fn parses_ipam_answers() {
        let v = json!({"cniVersion": "0.4.0", "ips": [{"version": "6", "address": "fd00::5/64",
                       "gateway": "fd00::1"}], "dns": {}});
        let r = CniResult::parse(&v).unwrap();
        assert_eq!(r.ips[0].gateway, Some("fd00::1".parse().unwrap()));
        assert!(r.interfaces.is_empty());
        assert_eq!(
            r.gateway_for(&"fd00::9".parse().unwrap()),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(r.gateway_for(&"10.0.0.1".parse().unwrap()), None);
    }
}
