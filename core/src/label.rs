//! The forms an initial key takes on the appliance, and their checks (SPEC §6).
//!
//! Every key source yields text; [`parse`] turns it into an [`InitialKey`]
//! (and the [`NodeId`] when the input carried one) or refuses it with a
//! [`LabelError`] that names the reason. Three forms are accepted:
//!
//! - **hex form**: the 16 key bytes as 32 hex digits, then the 4 hex digits of
//!   their CRC-16/X-25 appended little-endian — the Zigbee install-code
//!   convention (`83FE D340 7A93 9723 A5C6 39B2 6916 D505 C3B5`). Case,
//!   spaces and dashes are ignored.
//! - **decimal form**: the key as a 39-digit zero-padded big-endian integer,
//!   then 2 check digits of ISO 7064 MOD 97-10 (the IBAN check). Spaces,
//!   dashes and dots are ignored. Made for remotes and numeric keypads.
//! - **label**: `KF1:<node-id>:<hex form>`, what the QR code or barcode on the
//!   appliance carries; the node id is 1–64 of `A-Z a-z 0-9 . _ -`.
//!
//! Nothing is ever truncated or padded: a wrong length, a bad character or a
//! failing check is refused. No error carries key digits.
use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// Length of an initial key in bytes.
pub const KEY_LEN: usize = 16;
/// Hex digits in the hex form: 32 for the key, 4 for the CRC.
pub const HEX_DIGITS: usize = 36;
/// Digits in the decimal form: 39 for the key, 2 check digits.
pub const DECIMAL_DIGITS: usize = 41;
/// The label's prefix, with its version.
pub const LABEL_PREFIX: &str = "KF1:";
/// Longest node id.
pub const NODE_ID_MAX: usize = 64;

/// CRC-16/X-25 (poly 0x1021 reflected, init and xorout 0xFFFF), which the
/// `crc` crate calls CRC-16/IBM-SDLC; check value 0x906E over "123456789".
const X25: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_SDLC);

pub use crate::crypto::InitialKey;
pub use crate::wire::NodeId;

/// Checks `s` as a node id the way a label's is checked, with the position of
/// a refused character in the error (`NodeId::parse` has the same rules).
pub fn node_id(s: &str) -> Result<NodeId, LabelError> {
    validate_node_id(s, 0)?;
    NodeId::parse(s).map_err(|e| match e {
        crate::wire::NodeIdError::Length(found) => LabelError::NodeIdLength { found },
        crate::wire::NodeIdError::Character(ch) => LabelError::BadChar {
            ch,
            pos: s.chars().position(|c| c == ch).map_or(0, |i| i + 1),
            form: "node id",
            allowed: NODE_ALLOWED,
        },
    })
}

/// Which form the input was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Hex,
    Decimal,
    Label,
}

/// A checked initial key and the node id its label carried, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub node_id: Option<NodeId>,
    pub key: InitialKey,
    pub form: Form,
}

/// Why an input was refused. Positions count characters from 1 in the input
/// as given; no variant carries key digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error(
        "no input: expected a label KF1:<node-id>:<hex form>, 36 hex digits or 41 decimal digits"
    )]
    Empty,
    #[error("character {ch:?} at position {pos} is not allowed in the {form} ({allowed})")]
    BadChar {
        ch: char,
        pos: usize,
        form: &'static str,
        allowed: &'static str,
    },
    #[error(
        "wrong length: the hex form has 36 hex digits (32 of the key, 4 of its CRC), found {found}"
    )]
    HexLength { found: usize },
    #[error("wrong length: the decimal form has 41 digits (39 of the key, 2 check digits), found {found}")]
    DecimalLength { found: usize },
    #[error("wrong length: found {found} digits; the hex form has 36 hex digits, the decimal form 41 digits")]
    DigitsLength { found: usize },
    #[error("CRC-16/X-25 check failed: the last 4 hex digits do not match the 32 before them; a digit was mistyped or misread, enter or scan it again")]
    HexCheck,
    #[error("CRC-16/X-25 check failed for 36 digits read as the hex form; a digit was mistyped or misread, or, if they were meant as the decimal form, 5 digits are missing (it has 41)")]
    HexCheckAllDigits,
    #[error("ISO 7064 MOD 97-10 check failed: the last 2 digits do not match the 39 before them; a digit was mistyped or misread, enter it again")]
    DecimalCheck,
    #[error("the decimal form's first 39 digits exceed 2^128-1 (340282366920938463463374607431768211455), so they cannot be a 16-byte key")]
    DecimalRange,
    #[error("label starts with {found:?}, expected \"KF1:\"; this label is of another version or another product")]
    LabelPrefix { found: String },
    #[error(
        "label has no ':' between the node id and the hex form; expected KF1:<node-id>:<hex form>"
    )]
    LabelFields,
    #[error("node id is empty; a label is KF1:<node-id>:<hex form> with a node id of 1 to 64 characters")]
    NodeIdEmpty,
    #[error("node id has {found} characters, at most 64 are allowed")]
    NodeIdLength { found: usize },
}

const HEX_ALLOWED: &str = "hex digits; spaces and dashes are ignored";
const DEC_ALLOWED: &str = "decimal digits; spaces, dashes and dots are ignored";
const ANY_ALLOWED: &str =
    "hex or decimal digits, spaces, dashes, or a label KF1:<node-id>:<hex form>";
const NODE_ALLOWED: &str = "A-Z a-z 0-9 . _ -";

/// Parses what a key source yielded: a label, a hex form or a decimal form.
/// Leading and trailing whitespace (a scanner's CR/LF, a file's last newline)
/// is ignored.
pub fn parse(raw: &str) -> Result<Parsed, LabelError> {
    // (1-based position in `raw`, character), whitespace trimmed at both ends.
    let chars: Vec<(usize, char)> = raw.chars().enumerate().map(|(i, c)| (i + 1, c)).collect();
    let start = chars.iter().position(|(_, c)| !c.is_whitespace());
    let Some(start) = start else {
        return Err(LabelError::Empty);
    };
    let end = chars
        .iter()
        .rposition(|(_, c)| !c.is_whitespace())
        .map_or(start, |e| e + 1);
    let body = &chars[start..end];

    if body.iter().any(|&(_, c)| c == ':') {
        return parse_label(body);
    }
    if let Some(&(_, first)) = body.first() {
        if first.eq_ignore_ascii_case(&'K') {
            // "KF..." without a ':' is a label with its fields lost; "K" is no hex digit.
            let prefix: String = body.iter().take(4).map(|&(_, c)| c).collect();
            return Err(LabelError::LabelPrefix { found: prefix });
        }
    }
    let (key, form) = parse_bare(body)?;
    Ok(Parsed {
        node_id: None,
        key,
        form,
    })
}

fn parse_label(body: &[(usize, char)]) -> Result<Parsed, LabelError> {
    let prefix: String = body
        .iter()
        .take(LABEL_PREFIX.len())
        .map(|&(_, c)| c)
        .collect();
    if !prefix.eq_ignore_ascii_case(LABEL_PREFIX) {
        // Up to the first ':' when that is short, else the first 8 characters.
        let head: Vec<char> = body.iter().map(|&(_, c)| c).take(13).collect();
        let shown: String = match head.iter().position(|&c| c == ':') {
            Some(i) => head[..=i].iter().collect(),
            None => head.iter().take(8).chain(['…'].iter()).collect(),
        };
        return Err(LabelError::LabelPrefix { found: shown });
    }
    let rest = &body[LABEL_PREFIX.len()..];
    let Some(colon) = rest.iter().position(|&(_, c)| c == ':') else {
        return Err(LabelError::LabelFields);
    };
    let (id_chars, hex_chars) = (&rest[..colon], &rest[colon + 1..]);
    let id: String = id_chars.iter().map(|&(_, c)| c).collect();
    let offset = id_chars.first().map_or(0, |&(p, _)| p - 1);
    validate_node_id(&id, offset)?;
    let node_id = node_id(&id)?;
    let key = parse_hex(hex_chars)?;
    Ok(Parsed {
        node_id: Some(node_id),
        key,
        form: Form::Label,
    })
}

fn validate_node_id(id: &str, offset: usize) -> Result<(), LabelError> {
    let count = id.chars().count();
    if count == 0 {
        return Err(LabelError::NodeIdEmpty);
    }
    if let Some((i, ch)) = id
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(LabelError::BadChar {
            ch,
            pos: offset + i + 1,
            form: "node id",
            allowed: NODE_ALLOWED,
        });
    }
    if count > NODE_ID_MAX {
        return Err(LabelError::NodeIdLength { found: count });
    }
    Ok(())
}

fn is_hex_sep(c: char) -> bool {
    c == ' ' || c == '-'
}

fn is_dec_sep(c: char) -> bool {
    c == ' ' || c == '-' || c == '.'
}

/// A hex or decimal form without a label around it: the form is told by the
/// characters (a hex letter means hex) and then by the digit count.
fn parse_bare(body: &[(usize, char)]) -> Result<(InitialKey, Form), LabelError> {
    if let Some(&(pos, ch)) = body
        .iter()
        .find(|&&(_, c)| !(c.is_ascii_hexdigit() || is_dec_sep(c)))
    {
        return Err(LabelError::BadChar {
            ch,
            pos,
            form: "key",
            allowed: ANY_ALLOWED,
        });
    }
    let has_hex_letter = body
        .iter()
        .any(|&(_, c)| c.is_ascii_hexdigit() && !c.is_ascii_digit());
    if has_hex_letter {
        return Ok((parse_hex(body)?, Form::Hex));
    }
    let digits = body.iter().filter(|&&(_, c)| c.is_ascii_digit()).count();
    match digits {
        DECIMAL_DIGITS => Ok((parse_decimal(body)?, Form::Decimal)),
        // 36 digits without a hex letter: a hex form (rarely all digits) or
        // a decimal form short of 5 digits; a failed CRC names both.
        HEX_DIGITS => match parse_hex(body) {
            Ok(k) => Ok((k, Form::Hex)),
            Err(LabelError::HexCheck) => Err(LabelError::HexCheckAllDigits),
            Err(e) => Err(e),
        },
        found if body.iter().any(|&(_, c)| c == '.') => Err(LabelError::DecimalLength { found }),
        found => Err(LabelError::DigitsLength { found }),
    }
}

fn parse_hex(chars: &[(usize, char)]) -> Result<InitialKey, LabelError> {
    let mut nibbles = Zeroizing::new(Vec::with_capacity(HEX_DIGITS));
    for &(pos, ch) in chars {
        if is_hex_sep(ch) {
            continue;
        }
        match ch.to_digit(16) {
            // to_digit(16) < 16, so the cast is lossless.
            Some(v) => nibbles.push(v as u8),
            None => {
                return Err(LabelError::BadChar {
                    ch,
                    pos,
                    form: "hex form",
                    allowed: HEX_ALLOWED,
                })
            }
        }
    }
    if nibbles.len() != HEX_DIGITS {
        return Err(LabelError::HexLength {
            found: nibbles.len(),
        });
    }
    let mut bytes = Zeroizing::new([0u8; KEY_LEN + 2]);
    for (b, pair) in bytes.iter_mut().zip(nibbles.chunks_exact(2)) {
        *b = (pair[0] << 4) | pair[1];
    }
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(&bytes[..KEY_LEN]);
    let key = InitialKey(key);
    let given = u16::from_le_bytes([bytes[KEY_LEN], bytes[KEY_LEN + 1]]);
    if X25.checksum(key.as_bytes()) != given {
        return Err(LabelError::HexCheck);
    }
    Ok(key)
}

fn parse_decimal(chars: &[(usize, char)]) -> Result<InitialKey, LabelError> {
    let mut digits = Zeroizing::new(Vec::with_capacity(DECIMAL_DIGITS));
    for &(pos, ch) in chars {
        if is_dec_sep(ch) {
            continue;
        }
        match ch.to_digit(10) {
            Some(v) => digits.push(v as u8),
            None => {
                return Err(LabelError::BadChar {
                    ch,
                    pos,
                    form: "decimal form",
                    allowed: DEC_ALLOWED,
                })
            }
        }
    }
    if digits.len() != DECIMAL_DIGITS {
        return Err(LabelError::DecimalLength {
            found: digits.len(),
        });
    }
    if mod97(&digits) != 1 {
        return Err(LabelError::DecimalCheck);
    }
    let mut value = Zeroizing::new(0u128);
    for &d in &digits[..DECIMAL_DIGITS - 2] {
        *value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u128::from(d)))
            .ok_or(LabelError::DecimalRange)?;
    }
    Ok(InitialKey(value.to_be_bytes()))
}

/// The remainder of a decimal digit string modulo 97 (ISO 7064 MOD 97-10
/// computes over the digits as one big integer).
fn mod97(digits: &[u8]) -> u32 {
    digits
        .iter()
        .fold(0u32, |r, &d| (r * 10 + u32::from(d)) % 97)
}

/// The hex form of a key: 36 uppercase hex digits, the CRC-16/X-25 of the
/// key appended little-endian. Group it with [`group`] for printing.
pub fn hex_form(key: &InitialKey) -> String {
    let crc = X25.checksum(key.as_bytes()).to_le_bytes();
    key.as_bytes()
        .iter()
        .chain(crc.iter())
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// The decimal form of a key: 39 digits of the key, 2 ISO 7064 MOD 97-10
/// check digits.
pub fn decimal_form(key: &InitialKey) -> String {
    let value = u128::from_be_bytes(*key.as_bytes());
    let mut s = format!("{value:039}");
    let mut digits: Vec<u8> = s.bytes().map(|b| b - b'0').collect();
    digits.extend([0, 0]);
    let check = 98 - mod97(&digits);
    digits.zeroize();
    s.push_str(&format!("{check:02}"));
    s
}

/// The label a QR code or barcode carries: `KF1:<node-id>:<hex form>`.
pub fn label(node_id: &NodeId, key: &InitialKey) -> String {
    format!("{LABEL_PREFIX}{node_id}:{}", hex_form(key))
}

/// Inserts `sep` every `size` characters, for printing a form on a label
/// (`group(&hex_form(&k), 4, ' ')`). Parsing ignores the separators.
pub fn group(s: &str, size: usize, sep: char) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / size.max(1));
    for (i, c) in s.chars().enumerate() {
        if i > 0 && size > 0 && i % size == 0 {
            out.push(sep);
        }
        out.push(c);
    }
    out
}

/// Where a failed CRC-16/X-25 check of a hex form points, when it can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckHint {
    /// Exactly one position has a digit that would make the check pass:
    /// `pos` counts characters from 1 in the input as given, `digit` the hex
    /// digits from 1 (of 36).
    Digit { pos: usize, digit: usize },
    /// Swapping two neighbouring digits (and no single-digit change) makes it pass.
    Swapped { pos: [usize; 2] },
}

impl fmt::Display for CheckHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckHint::Digit { pos, digit } => write!(
                f,
                "the check points at character {pos} (hex digit {digit} of {HEX_DIGITS}) as the likely mistake"
            ),
            CheckHint::Swapped { pos: [a, b] } => write!(
                f,
                "characters {a} and {b} look swapped"
            ),
        }
    }
}

/// Where the error in a hex form (bare or in a label) whose CRC failed most
/// likely is. A CRC-16 over 144 bits tells a single wrong hex digit apart
/// from every other single wrong digit (the CRC is linear, so an error's
/// syndrome does not depend on the key; the tests check all 540 single-digit
/// errors), so when exactly one position can be changed to pass the check,
/// that is the place; a swap of two neighbours is
/// tried next. `None` when the input is no 36-digit hex form, when its check
/// passes, or when the check cannot tell (two or more digits wrong). The
/// decimal form's MOD 97-10 check cannot point at a digit, so it gets `None`.
pub fn locate_hex_error(raw: &str) -> Option<CheckHint> {
    let body: Vec<(usize, char)> = raw.chars().enumerate().map(|(i, c)| (i + 1, c)).collect();
    // The hex form of a label is after its second ':'.
    let start = match body.iter().filter(|&&(_, c)| c == ':').count() {
        0 => 0,
        2 => body.iter().rposition(|&(_, c)| c == ':')? + 1,
        _ => return None,
    };
    let mut digits = Zeroizing::new(Vec::with_capacity(HEX_DIGITS));
    let mut positions = Vec::with_capacity(HEX_DIGITS);
    for &(pos, c) in &body[start..] {
        if c.is_whitespace() || is_hex_sep(c) {
            continue;
        }
        // to_digit(16) < 16, so the cast is lossless.
        digits.push(c.to_digit(16)? as u8);
        positions.push(pos);
    }
    if digits.len() != HEX_DIGITS || hex_check_passes(&digits) {
        return None;
    }
    let mut found = None;
    for i in 0..HEX_DIGITS {
        let was = digits[i];
        let passes = (0..16u8).any(|d| {
            d != was && {
                digits[i] = d;
                hex_check_passes(&digits)
            }
        });
        digits[i] = was;
        if passes {
            if found.is_some() {
                return None;
            }
            found = Some(CheckHint::Digit {
                pos: positions[i],
                digit: i + 1,
            });
        }
    }
    if found.is_some() {
        return found;
    }
    for i in 0..HEX_DIGITS - 1 {
        if digits[i] == digits[i + 1] {
            continue;
        }
        digits.swap(i, i + 1);
        let passes = hex_check_passes(&digits);
        digits.swap(i, i + 1);
        if passes {
            if found.is_some() {
                return None;
            }
            found = Some(CheckHint::Swapped {
                pos: [positions[i], positions[i + 1]],
            });
        }
    }
    found
}

/// True when 36 nibbles carry a matching CRC-16/X-25.
fn hex_check_passes(nibbles: &[u8]) -> bool {
    let mut bytes = Zeroizing::new([0u8; KEY_LEN + 2]);
    for (b, pair) in bytes.iter_mut().zip(nibbles.chunks_exact(2)) {
        *b = (pair[0] << 4) | pair[1];
    }
    let given = u16::from_le_bytes([bytes[KEY_LEN], bytes[KEY_LEN + 1]]);
    X25.checksum(&bytes[..KEY_LEN]) == given
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_failed_crc_points_at_the_one_wrong_digit() {
        let key = InitialKey::from_bytes(*b"0123456789abcdef");
        let hex = group(&hex_form(&key), 4, ' ');
        // Every single-digit change at every place is located exactly.
        let chars: Vec<char> = hex.chars().collect();
        let mut digit = 0;
        for (i, &c) in chars.iter().enumerate() {
            if c == ' ' {
                continue;
            }
            digit += 1;
            for wrong in "0123456789ABCDEF".chars().filter(|&w| w != c) {
                let mut typed = chars.clone();
                typed[i] = wrong;
                let typed: String = typed.into_iter().collect();
                assert_eq!(
                    locate_hex_error(&typed),
                    Some(CheckHint::Digit { pos: i + 1, digit }),
                    "{wrong} at {}",
                    i + 1
                );
            }
        }
        // In a label the position counts from the start of the line.
        let lab = label(&node_id("pump-07").unwrap(), &key);
        let mut typed: Vec<char> = lab.chars().collect();
        let at = typed.len() - 5;
        typed[at] = if typed[at] == '0' { '1' } else { '0' };
        let typed: String = typed.into_iter().collect();
        assert!(matches!(
            locate_hex_error(&typed),
            Some(CheckHint::Digit { pos, digit: 32 }) if pos == at + 1
        ));
        // A good form, a wrong length, the decimal form: nothing to point at.
        assert_eq!(locate_hex_error(&hex), None);
        assert_eq!(locate_hex_error("1234"), None);
        assert_eq!(locate_hex_error(&decimal_form(&key)), None);
    }

    #[test]
    fn two_wrong_digits_or_a_swap() {
        let key = InitialKey::from_bytes([0x5a; 16]);
        let hex = hex_form(&key);
        // Two wrong digits: either located nowhere, or (rarely) at one place;
        // never a panic. Count how often a hint is given at all.
        let mut hinted = 0;
        let mut tried = 0;
        for i in 0..HEX_DIGITS {
            for j in i + 1..HEX_DIGITS {
                let mut t: Vec<char> = hex.chars().collect();
                t[i] = if t[i] == '0' { '1' } else { '0' };
                t[j] = if t[j] == '0' { '1' } else { '0' };
                let t: String = t.into_iter().collect();
                tried += 1;
                hinted += usize::from(locate_hex_error(&t).is_some());
            }
        }
        println!("two wrong digits: {hinted} of {tried} inputs got a (misleading) hint");
        // A neighbour swap of two different digits.
        let key = InitialKey::from_bytes(*b"0123456789abcdef");
        let mut t: Vec<char> = hex_form(&key).chars().collect();
        let i = (0..HEX_DIGITS - 1).find(|&i| t[i] != t[i + 1]).unwrap();
        t.swap(i, i + 1);
        let t: String = t.into_iter().collect();
        match locate_hex_error(&t) {
            Some(CheckHint::Swapped { pos }) => assert_eq!(pos, [i + 1, i + 2]),
            // A swap is two changed digits; a single-digit fix may also pass.
            other => println!("swap at {}: {other:?}", i + 1),
        }
    }
    use super::*;
    use proptest::prelude::*;

    /// The install code printed in the Zigbee Base Device Behavior
    /// specification and in vendors' install-code notes:
    /// 83FED3407A939723A5C639B26916D505 with CRC C3B5.
    const ZIGBEE_KEY: [u8; 16] = [
        0x83, 0xFE, 0xD3, 0x40, 0x7A, 0x93, 0x97, 0x23, 0xA5, 0xC6, 0x39, 0xB2, 0x69, 0x16, 0xD5,
        0x05,
    ];

    #[test]
    fn x25_check_value() {
        assert_eq!(X25.checksum(b"123456789"), 0x906E);
    }

    #[test]
    fn zigbee_install_code_vector() {
        let key = InitialKey::from_bytes(ZIGBEE_KEY);
        assert_eq!(hex_form(&key), "83FED3407A939723A5C639B26916D505C3B5");
        let p = parse("83FE D340 7A93 9723 A5C6 39B2 6916 D505 C3B5").unwrap();
        assert_eq!(p.key, key);
        assert_eq!(p.form, Form::Hex);
        assert_eq!(p.node_id, None);
        // Lowercase, dashes, scanner CR/LF.
        let p = parse("83fed340-7a939723-a5c639b2-6916d505-c3b5\r\n").unwrap();
        assert_eq!(p.key, key);
    }

    #[test]
    fn check_value_is_sha256_prefix() {
        // SHA-256 of 16 zero bytes is 374708fff7719dd5979ec875d56cd2286f6d3cf7ec317a3b25632aab28ec37bb.
        let key = InitialKey::from_bytes([0; 16]);
        assert_eq!(key.fingerprint(), "374708ff");
        assert_eq!(format!("{key:?}"), "InitialKey(fingerprint 374708ff)");
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = InitialKey::from_bytes(ZIGBEE_KEY);
        let p = Parsed {
            node_id: None,
            key: key.clone(),
            form: Form::Hex,
        };
        let shown = format!("{p:?}");
        assert!(!shown.to_uppercase().contains("83FE"), "{shown}");
        assert!(!shown.contains("131"), "{shown}"); // 0x83 as a decimal byte
        assert!(shown.contains(&key.fingerprint()));
    }

    #[test]
    fn decimal_form_known_values() {
        // Key 1: 38 zeros then 1; IBAN-style check: 98 - (1·100 mod 97) = 95.
        let mut one = [0u8; 16];
        one[15] = 1;
        let key = InitialKey::from_bytes(one);
        assert_eq!(
            decimal_form(&key),
            "00000000000000000000000000000000000000195"
        );
        let max = InitialKey::from_bytes([0xFF; 16]);
        let d = decimal_form(&max);
        assert!(d.starts_with("340282366920938463463374607431768211455"));
        assert_eq!(parse(&d).unwrap().key, max);
        assert_eq!(parse(&d).unwrap().form, Form::Decimal);
    }

    #[test]
    fn label_round_trip_and_node_id() {
        let key = InitialKey::from_bytes(ZIGBEE_KEY);
        let id = node_id("pump-07.hall_B").unwrap();
        let l = label(&id, &key);
        assert_eq!(l, "KF1:pump-07.hall_B:83FED3407A939723A5C639B26916D505C3B5");
        let p = parse(&l).unwrap();
        assert_eq!(
            p.node_id.as_ref().map(NodeId::as_str),
            Some("pump-07.hall_B")
        );
        assert_eq!(p.key, key);
        assert_eq!(p.form, Form::Label);
        // A label's hex form may be grouped, and the prefix may be lowercase.
        let p = parse("kf1:pump-07.hall_B:83FE D340 7A93 9723 A5C6 39B2 6916 D505 C3B5").unwrap();
        assert_eq!(p.key, key);
    }

    #[test]
    fn refuses_empty() {
        assert_eq!(parse(""), Err(LabelError::Empty));
        assert_eq!(parse(" \r\n"), Err(LabelError::Empty));
    }

    #[test]
    fn refuses_short_and_long_hex() {
        let e = parse("83FED3407A939723A5C639B26916D505C3B").unwrap_err();
        assert_eq!(e, LabelError::HexLength { found: 35 });
        assert!(e.to_string().contains("found 35"), "{e}");
        let e = parse("83FED3407A939723A5C639B26916D505C3B500").unwrap_err();
        assert_eq!(e, LabelError::HexLength { found: 38 });
        // The key alone, without its CRC, is refused, not accepted unchecked.
        let e = parse("83FED3407A939723A5C639B26916D505").unwrap_err();
        assert_eq!(e, LabelError::HexLength { found: 32 });
    }

    #[test]
    fn refuses_bad_hex_char_with_position() {
        let e = parse("83FED3407A939723A5C639B26916D5O5C3B5").unwrap_err();
        assert_eq!(
            e,
            LabelError::BadChar {
                ch: 'O',
                pos: 31,
                form: "key",
                allowed: ANY_ALLOWED
            }
        );
        assert!(e.to_string().contains("'O' at position 31"), "{e}");
        // In a label, positions still count from the start of the input.
        let e = parse("KF1:n1:83FED3407A939723A5C639B26916D505C3B.").unwrap_err();
        assert!(
            matches!(
                e,
                LabelError::BadChar {
                    ch: '.',
                    pos: 43,
                    form: "hex form",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn refuses_failing_crc() {
        let e = parse("83FED3407A939723A5C639B26916D505C3B6").unwrap_err();
        assert_eq!(e, LabelError::HexCheck);
        assert!(e.to_string().contains("CRC-16/X-25 check failed"));
        // Key digit changed, CRC kept.
        assert_eq!(
            parse("93FED3407A939723A5C639B26916D505C3B5"),
            Err(LabelError::HexCheck)
        );
        // The CRC byte-swapped (big-endian) is refused: the form is little-endian.
        assert_eq!(
            parse("83FED3407A939723A5C639B26916D505B5C3"),
            Err(LabelError::HexCheck)
        );
    }

    #[test]
    fn refuses_decimal_length_check_and_range() {
        let good = decimal_form(&InitialKey::from_bytes(ZIGBEE_KEY));
        let e = parse(&good[..40]).unwrap_err();
        assert_eq!(e, LabelError::DigitsLength { found: 40 });
        assert!(e.to_string().contains("found 40"));
        let dotted = format!("{}.{}", &good[..20], &good[20..39]);
        assert_eq!(parse(&dotted), Err(LabelError::DecimalLength { found: 39 }));
        let mut bad = good.clone().into_bytes();
        bad[10] = if bad[10] == b'9' { b'0' } else { bad[10] + 1 };
        let e = parse(std::str::from_utf8(&bad).unwrap()).unwrap_err();
        assert_eq!(e, LabelError::DecimalCheck);
        assert!(e.to_string().contains("MOD 97-10"));
        // 2^128 has 39 digits but no 16-byte key; give it valid check digits.
        let big = "340282366920938463463374607431768211456";
        let mut d: Vec<u8> = big.bytes().map(|b| b - b'0').collect();
        d.extend([0, 0]);
        let check = 98 - mod97(&d);
        assert_eq!(
            parse(&format!("{big}{check:02}")),
            Err(LabelError::DecimalRange)
        );
    }

    #[test]
    fn thirty_six_digits_failing_crc_name_both_forms() {
        let dec = decimal_form(&InitialKey::from_bytes(ZIGBEE_KEY));
        let e = parse(&dec[..36]).unwrap_err();
        assert_eq!(e, LabelError::HexCheckAllDigits);
        assert!(e.to_string().contains("decimal form"), "{e}");
        // An all-digit hex form with a good CRC is still a hex form.
        // Keys whose 32 hex digits are the decimal digits of i; about 1 in 7
        // also has a CRC without hex letters.
        let key = (0u64..)
            .map(|i| {
                let digits = format!("{i:032}");
                let mut k = [0u8; 16];
                for (b, pair) in k.iter_mut().zip(digits.as_bytes().chunks(2)) {
                    *b = ((pair[0] - b'0') << 4) | (pair[1] - b'0');
                }
                InitialKey::from_bytes(k)
            })
            .find(|k| !hex_form(k).bytes().any(|c| c.is_ascii_alphabetic()))
            .unwrap();
        let p = parse(&hex_form(&key)).unwrap();
        assert_eq!(p.form, Form::Hex);
        assert_eq!(p.key, key);
    }

    #[test]
    fn refuses_bad_decimal_char() {
        let e = parse("00000000000000000000000000000000000000195x").unwrap_err();
        assert!(
            matches!(
                e,
                LabelError::BadChar {
                    ch: 'x',
                    pos: 42,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn refuses_bad_labels() {
        let hex = "83FED3407A939723A5C639B26916D505C3B5";
        let e = parse(&format!("KF2:n1:{hex}")).unwrap_err();
        assert_eq!(
            e,
            LabelError::LabelPrefix {
                found: "KF2:".into()
            }
        );
        assert_eq!(parse(&format!("KF1:{hex}")), Err(LabelError::LabelFields));
        assert_eq!(parse(&format!("KF1::{hex}")), Err(LabelError::NodeIdEmpty));
        let long = "n".repeat(65);
        assert_eq!(
            parse(&format!("KF1:{long}:{hex}")),
            Err(LabelError::NodeIdLength { found: 65 })
        );
        assert!(parse(&format!("KF1:{}:{hex}", "n".repeat(64))).is_ok());
        let e = parse(&format!("KF1:pump 7:{hex}")).unwrap_err();
        assert!(
            matches!(
                e,
                LabelError::BadChar {
                    ch: ' ',
                    pos: 9,
                    form: "node id",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("node id"));
        // A label whose ':' were lost (e.g. a scanner in the wrong layout).
        assert!(matches!(
            parse(&format!("KF1n1{hex}")),
            Err(LabelError::LabelPrefix { .. })
        ));
        // A label with a bad CRC says so.
        assert_eq!(
            parse("KF1:n1:83FED3407A939723A5C639B26916D505C3B6"),
            Err(LabelError::HexCheck)
        );
    }

    #[test]
    fn node_id_validation() {
        assert!(node_id("A.z_0-9").is_ok());
        assert_eq!(node_id(""), Err(LabelError::NodeIdEmpty));
        assert!(matches!(
            node_id("ab/c"),
            Err(LabelError::BadChar {
                ch: '/',
                pos: 3,
                ..
            })
        ));
        assert!(matches!(
            node_id("é"),
            Err(LabelError::BadChar {
                ch: 'é',
                pos: 1,
                ..
            })
        ));
    }

    #[test]
    fn group_inserts_separators() {
        assert_eq!(group("83FED340C3", 4, ' '), "83FE D340 C3");
    }

    fn arb_key() -> impl Strategy<Value = InitialKey> {
        any::<[u8; 16]>().prop_map(InitialKey::from_bytes)
    }

    fn arb_node_id() -> impl Strategy<Value = NodeId> {
        "[A-Za-z0-9._-]{1,64}".prop_map(|s| node_id(&s).unwrap())
    }

    /// Inserts a separator from `seps` before the characters where `mask` is set.
    fn sprinkle(s: &str, mask: &[u8], seps: &[char]) -> String {
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            let m = mask.get(i).copied().unwrap_or(0);
            if i > 0 && m % 3 == 0 {
                out.push(seps[usize::from(m) % seps.len()]);
            }
            out.push(c);
        }
        out
    }

    proptest! {
        #[test]
        fn hex_round_trip(key in arb_key(), lower in any::<bool>(), mask in proptest::collection::vec(any::<u8>(), 36)) {
            let mut s = sprinkle(&hex_form(&key), &mask, &[' ', '-']);
            if lower { s = s.to_lowercase(); }
            let p = parse(&s).unwrap();
            prop_assert_eq!(p.key, key);
            prop_assert_eq!(p.node_id, None);
        }

        #[test]
        fn decimal_round_trip(key in arb_key(), mask in proptest::collection::vec(any::<u8>(), 41)) {
            let d = decimal_form(&key);
            prop_assert_eq!(d.len(), DECIMAL_DIGITS);
            let p = parse(&sprinkle(&d, &mask, &[' ', '-', '.'])).unwrap();
            prop_assert_eq!(p.form, Form::Decimal);
            prop_assert_eq!(p.key, key);
        }

        #[test]
        fn label_round_trip(key in arb_key(), id in arb_node_id()) {
            let p = parse(&label(&id, &key)).unwrap();
            prop_assert_eq!(p.key, key);
            prop_assert_eq!(p.node_id, Some(id));
        }

        /// Any single hex digit changed is caught by the CRC (a 4-bit burst).
        #[test]
        fn hex_single_substitution_refused(key in arb_key(), at in 0usize..36, delta in 1u32..16) {
            let mut digits: Vec<char> = hex_form(&key).chars().collect();
            let v = digits[at].to_digit(16).unwrap();
            digits[at] = std::char::from_digit((v + delta) % 16, 16).unwrap();
            let s: String = digits.into_iter().collect();
            prop_assert_eq!(parse(&s), Err(LabelError::HexCheck));
        }

        /// Any single decimal digit changed is caught by MOD 97-10 (or is out of range).
        #[test]
        fn decimal_single_substitution_refused(key in arb_key(), at in 0usize..41, delta in 1u32..10) {
            let mut digits: Vec<char> = decimal_form(&key).chars().collect();
            let v = digits[at].to_digit(10).unwrap();
            digits[at] = std::char::from_digit((v + delta) % 10, 10).unwrap();
            let s: String = digits.into_iter().collect();
            let e = parse(&s).unwrap_err();
            prop_assert!(e == LabelError::DecimalCheck || e == LabelError::DecimalRange, "{:?}", e);
        }

        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = parse(&s);
        }

        #[test]
        fn never_panics_near_forms(s in "(KF1:)?[0-9A-Fa-f:. -]{0,50}") {
            let _ = parse(&s);
        }
    }
}
