//! The key sources built into this crate, in one static list (as probe-rs
//! lists its probe kinds in `PROBE_FACTORIES`).
//!
//! Each source module registers one `FACTORY` (a [`Factory`]: its `NAME`,
//! `list` and `open`), behind the cargo feature of its name; [`registry`]
//! holds exactly the ones built in. The lookups go through the
//! [`SourceFactory`] trait, so a test may put a fake source behind it.
//! `keyfleet read-key --from NAME` opens through [`find`]`(NAME)`, and
//! `keyfleet devices` shows what each factory's [`list`](SourceFactory::list)
//! finds. A source whose feature is off is in no list; the binary says so
//! when its name is asked for.
use crate::source::{DeviceInfo, KeySource, SourceError, SourceOptions};

/// One kind of key source: its name, the devices it could read, and how to
/// open it.
pub trait SourceFactory: Sync {
    /// The `--from` name, which is also the name of the cargo feature that
    /// builds the source in (`hid-scanner`, `ir`, ...).
    fn name(&self) -> &'static str;
    /// Candidate devices on this machine for this source, each with whether
    /// this user may open it and what fixes it when not. Never fails: what
    /// cannot be enumerated is logged and left out. Empty for sources with no
    /// device to choose (the keyboard, the keypad).
    fn list(&self) -> Vec<DeviceInfo>;
    /// Opens the source that `opts` describe (`--device`, `--replay`, ...).
    fn open(&self, opts: &SourceOptions) -> Result<Box<dyn KeySource>, SourceError>;
}

/// What each source module registers: its `NAME`, `list` and `open`.
pub struct Factory {
    pub name: &'static str,
    pub list: fn() -> Vec<DeviceInfo>,
    pub open: fn(&SourceOptions) -> Result<Box<dyn KeySource>, SourceError>,
}

impl SourceFactory for Factory {
    fn name(&self) -> &'static str {
        self.name
    }
    fn list(&self) -> Vec<DeviceInfo> {
        (self.list)()
    }
    fn open(&self, opts: &SourceOptions) -> Result<Box<dyn KeySource>, SourceError> {
        (self.open)(opts)
    }
}

/// The `list` of a source with no device to choose (the keyboard, the keypad).
pub fn no_devices() -> Vec<DeviceInfo> {
    Vec::new()
}

/// Every source built in, in the order `keyfleet devices` shows them.
static FACTORIES: &[&dyn SourceFactory] = &[
    #[cfg(feature = "keyboard")]
    &crate::keyboard::FACTORY,
    #[cfg(feature = "keypad")]
    &crate::keypad::FACTORY,
    #[cfg(feature = "hid-scanner")]
    &crate::hid::FACTORY,
    #[cfg(feature = "serial-scanner")]
    &crate::serial::FACTORY,
    #[cfg(feature = "webcam")]
    &crate::webcam::FACTORY,
    #[cfg(feature = "ir")]
    &crate::ir::FACTORY,
    #[cfg(feature = "file")]
    &crate::media::FACTORY,
];

/// The sources built into this crate.
pub fn registry() -> &'static [&'static dyn SourceFactory] {
    FACTORIES
}

/// The built-in source named `name`, if it is built in.
pub fn find(name: &str) -> Option<&'static dyn SourceFactory> {
    FACTORIES.iter().copied().find(|f| f.name() == name)
}

/// Every built-in source's candidate devices, source by source.
pub fn list_all() -> Vec<DeviceInfo> {
    FACTORIES.iter().flat_map(|f| f.list()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The source features of Cargo.toml, with whether this build has each.
    /// A feature added to Cargo.toml without a line here fails
    /// `every_feature_has_a_line_here`.
    const FEATURES: &[(&str, bool)] = &[
        ("keyboard", cfg!(feature = "keyboard")),
        ("keypad", cfg!(feature = "keypad")),
        ("hid-scanner", cfg!(feature = "hid-scanner")),
        ("serial-scanner", cfg!(feature = "serial-scanner")),
        ("webcam", cfg!(feature = "webcam")),
        ("ir", cfg!(feature = "ir")),
        ("file", cfg!(feature = "file")),
    ];

    #[test]
    fn the_registry_holds_exactly_the_enabled_features() {
        let mut got: Vec<&str> = registry().iter().map(|f| f.name()).collect();
        let mut want: Vec<&str> = FEATURES
            .iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        let before = got.len();
        got.dedup();
        assert_eq!(got.len(), before, "two factories share a name");
    }

    #[test]
    fn every_feature_has_a_line_here() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
        let manifest: toml::Table = text.parse().unwrap();
        let mut in_manifest: Vec<String> = manifest["features"]
            .as_table()
            .unwrap()
            .keys()
            .filter(|f| *f != "default")
            .cloned()
            .collect();
        in_manifest.sort();
        let mut here: Vec<String> = FEATURES.iter().map(|(n, _)| n.to_string()).collect();
        here.sort();
        assert_eq!(in_manifest, here);
    }

    #[test]
    fn find_knows_the_built_in_names_only() {
        for f in registry() {
            let found = find(f.name()).map(|g| g.name());
            assert_eq!(found, Some(f.name()));
        }
        for (name, on) in FEATURES {
            assert_eq!(find(name).is_some(), *on, "{name}");
        }
        assert!(find("telepathy").is_none());
        assert!(find("").is_none());
    }

    #[test]
    fn the_sources_opened_say_the_factorys_name() {
        // Sources that open without a device: the name they report is the
        // one they were found by.
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k.txt");
        std::fs::write(&key, "x").unwrap();
        let opts = SourceOptions {
            replay: Some(key.clone()),
            path: Some(key),
            ..Default::default()
        };
        for name in ["keyboard", "file"] {
            if let Some(f) = find(name) {
                let src = f.open(&opts).unwrap();
                assert_eq!(src.name(), name);
            }
        }
    }
}
