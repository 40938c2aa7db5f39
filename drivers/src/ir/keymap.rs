//! ir-keytable TOML keymaps (`rc_keymap(5)`, the `rc_keymaps/*.toml` files
//! v4l-utils ships) and what each button does to an entry.
//!
//! ```toml
//! [[protocols]]
//! name = "rc6_mce"          # optional
//! protocol = "rc6"
//! variant = "rc6_mce"       # optional
//! [protocols.scancodes]
//! 0x800f0400 = "KEY_NUMERIC_0"
//! ```
//! Protocol parameters (`bits`, `header_pulse`, ... for the BPF decoders) are
//! accepted and ignored. Scancode keys are read as `strtoul(key, 0)` reads
//! them: `0x` hex, leading-`0` octal, else decimal.
//!
//! A frame is looked up among the keymap's protocols of its decoder family
//! (`nec` for nec/necx/nec32, `rc5`, `rc-5-sz`, `rc6`); protocols named
//! `unknown` or `other` (many generated keymaps) are searched by scancode
//! alone, as the kernel's table lookup does. Protocols this crate does not
//! decode (sony, jvc, pulse_distance, ...) load but never match.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::decode::{Family, Frame};

/// Where ir-keytable looks for keymaps given by name.
pub const KEYMAP_DIRS: [&str; 2] = ["/etc/rc_keymaps", "/lib/udev/rc_keymaps"];

/// A keymap that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeymapError {
    #[error("cannot read keymap {path}: {source}; give an ir-keytable TOML file with --keymap (see /lib/udev/rc_keymaps/)")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("keymap {path} is not ir-keytable TOML: {message}")]
    Toml { path: String, message: String },
    #[error("keymap {path}: scancode {key:?} in protocol {protocol:?} is not a number")]
    BadScancode {
        path: String,
        protocol: String,
        key: String,
    },
    #[error("keymap {path} has no [[protocols]] table")]
    NoProtocols { path: String },
}

#[derive(Debug, serde::Deserialize)]
struct FileToml {
    #[serde(default)]
    protocols: Vec<ProtocolToml>,
}

#[derive(Debug, serde::Deserialize)]
struct ProtocolToml {
    name: Option<String>,
    protocol: String,
    variant: Option<String>,
    #[serde(default)]
    scancodes: HashMap<String, String>,
}

/// One `[[protocols]]` table.
#[derive(Debug, Clone)]
pub struct KeymapProtocol {
    pub name: Option<String>,
    pub protocol: String,
    pub variant: Option<String>,
    /// The decoder family, when this crate decodes the protocol.
    pub family: Option<Family>,
    scancodes: HashMap<u64, String>,
}

impl KeymapProtocol {
    /// Number of buttons in the table.
    pub fn len(&self) -> usize {
        self.scancodes.len()
    }

    /// Whether the table has no buttons.
    pub fn is_empty(&self) -> bool {
        self.scancodes.is_empty()
    }

    fn scancode_only(&self) -> bool {
        matches!(
            self.protocol.to_ascii_lowercase().as_str(),
            "unknown" | "other"
        )
    }
}

/// A loaded keymap.
#[derive(Debug, Clone)]
pub struct Keymap {
    /// Where it came from (for messages).
    pub source: String,
    pub protocols: Vec<KeymapProtocol>,
}

impl Keymap {
    /// Parse keymap text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Keymap, KeymapError> {
        let file: FileToml = toml::from_str(text).map_err(|e| KeymapError::Toml {
            path: source.to_string(),
            message: e.message().to_string(),
        })?;
        if file.protocols.is_empty() {
            return Err(KeymapError::NoProtocols {
                path: source.to_string(),
            });
        }
        let mut protocols = Vec::with_capacity(file.protocols.len());
        for p in file.protocols {
            let mut scancodes = HashMap::with_capacity(p.scancodes.len());
            for (key, button) in p.scancodes {
                let code = parse_scancode(&key).ok_or_else(|| KeymapError::BadScancode {
                    path: source.to_string(),
                    protocol: p.protocol.clone(),
                    key: key.clone(),
                })?;
                scancodes.insert(code, button);
            }
            protocols.push(KeymapProtocol {
                family: Family::from_keymap_name(&p.protocol),
                name: p.name,
                protocol: p.protocol,
                variant: p.variant,
                scancodes,
            });
        }
        Ok(Keymap {
            source: source.to_string(),
            protocols,
        })
    }

    /// Load a keymap file. A bare name (`rc6_mce`, `hauppauge.toml`) that is
    /// not a file here is looked up in [`KEYMAP_DIRS`], as ir-keytable does.
    pub fn load(path: &Path) -> Result<Keymap, KeymapError> {
        let path = resolve(path);
        let text = std::fs::read_to_string(&path).map_err(|source| KeymapError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Keymap::parse(&text, &path.display().to_string())
    }

    /// The button name for a frame, if the keymap has it.
    pub fn lookup(&self, frame: &Frame) -> Option<&str> {
        let family = frame.protocol.family();
        let code = u64::from(frame.scancode);
        let by_family = self.protocols.iter().filter(|p| p.family == Some(family));
        let by_code = self.protocols.iter().filter(|p| p.scancode_only());
        by_family
            .chain(by_code)
            .find_map(|p| p.scancodes.get(&code))
            .map(String::as_str)
    }

    /// Whether any protocol of the keymap can match a frame we decode.
    pub fn has_decodable_protocol(&self) -> bool {
        self.protocols
            .iter()
            .any(|p| p.family.is_some() || p.scancode_only())
    }

    /// The decoder families to enable: the keymap's own, or the defaults
    /// when it has a scancode-only (`unknown`) protocol or none we decode.
    pub fn families(&self) -> Vec<Family> {
        let mut f: Vec<Family> = self.protocols.iter().filter_map(|p| p.family).collect();
        if f.is_empty() || self.protocols.iter().any(KeymapProtocol::scancode_only) {
            f.extend(super::decode::DEFAULT_FAMILIES);
        }
        f.sort_by_key(|x| *x as u8);
        f.dedup();
        f
    }

    /// The protocol names, for messages.
    pub fn protocol_names(&self) -> Vec<&str> {
        self.protocols.iter().map(|p| p.protocol.as_str()).collect()
    }
}

fn resolve(path: &Path) -> PathBuf {
    if path.exists() || path.components().count() != 1 {
        return path.to_path_buf();
    }
    let name = path.to_string_lossy();
    for dir in KEYMAP_DIRS {
        for candidate in [format!("{dir}/{name}"), format!("{dir}/{name}.toml")] {
            let c = PathBuf::from(candidate);
            if c.is_file() {
                return c;
            }
        }
    }
    path.to_path_buf()
}

/// `strtoul(key, NULL, 0)` without its leniency: the whole key must be a number.
fn parse_scancode(key: &str) -> Option<u64> {
    let k = key.trim();
    if let Some(hex) = k.strip_prefix("0x").or_else(|| k.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if k.len() > 1 && k.starts_with('0') {
        u64::from_str_radix(&k[1..], 8).ok()
    } else {
        k.parse().ok()
    }
}

/// What a button does to the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Enter this character (`0`–`9`, `A`–`F`).
    Char(char),
    /// Erase the last character.
    Erase,
    /// Erase everything entered.
    Clear,
    /// The entry is complete.
    Finish,
    /// Abandon the entry.
    Cancel,
    /// Any other button: nothing.
    None,
}

/// The meaning of an input event code name from a keymap:
/// - `KEY_0`–`KEY_9`, `KEY_NUMERIC_0`–`KEY_NUMERIC_9`, `KEY_KP0`–`KEY_KP9`: digits;
/// - `KEY_A`–`KEY_F`, `KEY_NUMERIC_A`–`KEY_NUMERIC_D`: hex digits. The colour
///   buttons (`KEY_RED` ...) are *not* mapped: there are four of them, so E and F
///   would stay unreachable; a remote with only digits enters the decimal form;
/// - `KEY_BACK`, `KEY_BACKSPACE`, `KEY_DELETE`: erase the last character;
/// - `KEY_CLEAR`: erase everything;
/// - `KEY_OK`, `KEY_ENTER`, `KEY_SELECT`, `KEY_KPENTER`: finish;
/// - `KEY_EXIT`, `KEY_ESC`, `KEY_CANCEL`: cancel the entry.
pub fn action(button: &str) -> Action {
    let b = button.trim();
    let one = |s: &str| {
        let mut c = s.chars();
        match (c.next(), c.next()) {
            (Some(ch), None) => Some(ch),
            _ => None,
        }
    };
    for prefix in ["KEY_NUMERIC_", "KEY_KP", "KEY_"] {
        if let Some(ch) = b.strip_prefix(prefix).and_then(one) {
            match (prefix, ch) {
                (_, '0'..='9') => return Action::Char(ch),
                ("KEY_", 'A'..='F') | ("KEY_NUMERIC_", 'A'..='D') => return Action::Char(ch),
                _ => {}
            }
        }
    }
    match b {
        "KEY_BACK" | "KEY_BACKSPACE" | "KEY_DELETE" => Action::Erase,
        "KEY_CLEAR" => Action::Clear,
        "KEY_OK" | "KEY_ENTER" | "KEY_SELECT" | "KEY_KPENTER" => Action::Finish,
        "KEY_EXIT" | "KEY_ESC" | "KEY_CANCEL" => Action::Cancel,
        _ => Action::None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::decode::Protocol;
    use super::*;

    const MAP: &str = r#"
# comment
[[protocols]]
name = "test"
protocol = "nec"
variant = "necx"
[protocols.scancodes]
0x866b01 = "KEY_1"
0x866b0a = 'KEY_OK'
[[protocols]]
protocol = "rc6"
header_pulse = 2666
[protocols.scancodes]
0x800f0401 = "KEY_NUMERIC_1"
"#;

    fn frame(protocol: Protocol, scancode: u32) -> Frame {
        Frame {
            protocol,
            scancode,
            toggle: false,
        }
    }

    #[test]
    fn lookup_by_family_and_scancode() {
        let k = Keymap::parse(MAP, "test").unwrap();
        assert_eq!(k.lookup(&frame(Protocol::NecX, 0x866b01)), Some("KEY_1"));
        assert_eq!(k.lookup(&frame(Protocol::Nec, 0x866b0a)), Some("KEY_OK"));
        assert_eq!(
            k.lookup(&frame(Protocol::Rc6Mce, 0x800f0401)),
            Some("KEY_NUMERIC_1")
        );
        // Same scancode, other family: no match.
        assert_eq!(k.lookup(&frame(Protocol::Rc5, 0x866b01)), None);
    }

    #[test]
    fn unknown_protocol_matches_by_scancode_alone() {
        let k = Keymap::parse(
            "[[protocols]]\nprotocol = \"unknown\"\n[protocols.scancodes]\n0x1e01 = \"KEY_1\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(k.lookup(&frame(Protocol::Rc5, 0x1e01)), Some("KEY_1"));
    }

    #[test]
    fn refusals_name_the_fault() {
        let e = Keymap::parse(
            "[[protocols]]\nprotocol = \"nec\"\n[protocols.scancodes]\n0xzz = \"KEY_1\"\n",
            "m.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"0xzz\""), "{e}");
        let e = Keymap::parse("protocols = 3", "m.toml").unwrap_err();
        assert!(e.to_string().contains("not ir-keytable TOML"), "{e}");
        let e = Keymap::parse("", "m.toml").unwrap_err();
        assert!(matches!(e, KeymapError::NoProtocols { .. }));
    }

    #[test]
    fn scancode_keys_read_like_strtoul() {
        assert_eq!(parse_scancode("0x1F"), Some(31));
        assert_eq!(parse_scancode("017"), Some(15));
        assert_eq!(parse_scancode("17"), Some(17));
        assert_eq!(parse_scancode("0"), Some(0));
        assert_eq!(parse_scancode("1x"), None);
    }

    #[test]
    fn button_actions() {
        assert_eq!(action("KEY_7"), Action::Char('7'));
        assert_eq!(action("KEY_NUMERIC_0"), Action::Char('0'));
        assert_eq!(action("KEY_KP5"), Action::Char('5'));
        assert_eq!(action("KEY_C"), Action::Char('C'));
        assert_eq!(action("KEY_NUMERIC_D"), Action::Char('D'));
        assert_eq!(action("KEY_G"), Action::None);
        assert_eq!(action("KEY_NUMERIC_11"), Action::None);
        assert_eq!(action("KEY_NUMERIC_E"), Action::None);
        assert_eq!(action("KEY_KPA"), Action::None);
        assert_eq!(action("KEY_RED"), Action::None);
        assert_eq!(action("KEY_BACK"), Action::Erase);
        assert_eq!(action("KEY_BACKSPACE"), Action::Erase);
        assert_eq!(action("KEY_DELETE"), Action::Erase);
        assert_eq!(action("KEY_OK"), Action::Finish);
        assert_eq!(action("KEY_ENTER"), Action::Finish);
        assert_eq!(action("KEY_SELECT"), Action::Finish);
        assert_eq!(action("KEY_EXIT"), Action::Cancel);
        assert_eq!(action("KEY_VOLUMEUP"), Action::None);
    }
}
