//! CNI spec versions this plugin speaks, and the VERSION answer.

use serde_json::json;

/// A supported CNI spec version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.3.0 (results as 0.4.0, no CHECK).
    V0_3_0,
    /// 0.3.1.
    V0_3_1,
    /// 0.4.0: CHECK; `ips[].version`.
    V0_4_0,
    /// 1.0.0: no `ips[].version`.
    V1_0_0,
    /// 1.1.0: STATUS, GC; `interfaces[].mtu` and `socketPath`.
    V1_1_0,
}

impl CniVersion {
    /// Every supported version, oldest first.
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    /// The newest supported version.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// Parses a version string; `None` when unsupported.
    pub fn parse(s: &str) -> Option<CniVersion> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The version as written in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// The comma-separated list of supported versions, for messages.
    pub fn supported_list() -> String {
        Self::ALL
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The VERSION command's answer.
    pub fn version_answer(asked: Option<CniVersion>) -> serde_json::Value {
        json!({
            "cniVersion": asked.unwrap_or(Self::LATEST).as_str(),
            "supportedVersions": Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        })
    }
}

impl std::fmt::Display for CniVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        assert_eq!(CniVersion::parse("1.1.0"), Some(CniVersion::V1_1_0));
        assert_eq!(CniVersion::parse("0.2.0"), None);
        assert!(CniVersion::V0_4_0 < CniVersion::V1_0_0);
        let a = CniVersion::version_answer(None);
        assert_eq!(a["supportedVersions"].as_array().unwrap().len(), 5);
    }
}
