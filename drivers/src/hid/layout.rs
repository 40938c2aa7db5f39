//! Where the fields a scanner uses sit in its input reports, found by parsing
//! the report descriptor with `hidreport`.
//!
//! Two kinds of report matter:
//! - keyboard reports (usage page 0x07): modifier bits, a key array and/or a
//!   key bitmap (boot keyboard or anything the descriptor declares);
//! - HID point-of-sale scanned-data reports (usage page 0x8C): Decoded Data
//!   bytes, optionally a Byte Count, the AIM Symbology Identifier bytes and the
//!   Decode Data Continued flag.
//!
//! Values are read with [`bits`], which never indexes past the report.
use hidreport::{Field, Report, ReportDescriptor};
use std::ops::Range;

/// HID usage page Keyboard/Keypad.
pub const PAGE_KEYBOARD: u16 = 0x07;
/// HID usage page Bar Code Scanner (HID POS).
pub const PAGE_BARCODE: u16 = 0x8C;
/// Generic Desktop page, for Byte Count (0x3B).
pub const PAGE_GENERIC_DESKTOP: u16 = 0x01;
pub const USAGE_BYTE_COUNT: u16 = 0x3B;
pub const USAGE_SYMBOLOGY_ID_1: u16 = 0xFB;
pub const USAGE_SYMBOLOGY_ID_3: u16 = 0xFD;
pub const USAGE_DECODED_DATA: u16 = 0xFE;
pub const USAGE_DECODE_DATA_CONTINUED: u16 = 0xFF;

/// A key array: `count` slots of `slot_bits` each, a value `v` meaning
/// `usages[v - logical_min]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyArray {
    pub start: usize,
    pub slot_bits: usize,
    pub count: usize,
    pub logical_min: i64,
    /// Keyboard-page usages in slot-value order (only those on page 0x07; others are `None`).
    pub usages: Vec<Option<u16>>,
}

/// The keyboard fields of one input report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyboardFields {
    /// One bit per key given as a variable (modifiers 0xE0–0xE7, and any NKRO bitmap).
    pub bit_keys: Vec<(Range<usize>, u16)>,
    pub arrays: Vec<KeyArray>,
}

/// The point-of-sale fields of one input report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PosFields {
    pub byte_count: Option<Range<usize>>,
    /// Each Decoded Data element, in report order.
    pub data: Vec<Range<usize>>,
    pub symbology: Vec<Range<usize>>,
    pub continued: Option<Range<usize>>,
}

/// What an input report carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportKind {
    Keyboard(KeyboardFields),
    Pos(PosFields),
}

/// One input report of interest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportLayout {
    pub report_id: Option<u8>,
    /// Length on the wire in bytes, report ID included.
    pub len: usize,
    pub kind: ReportKind,
}

/// Every keyboard and POS input report a descriptor declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub numbered: bool,
    pub reports: Vec<ReportLayout>,
}

/// Why a descriptor cannot drive a scanner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("report descriptor does not parse: {0}")]
    Parse(String),
    #[error("report descriptor item at offset {offset}: {what}")]
    Limit { offset: usize, what: String },
    #[error("report descriptor declares no keyboard (usage page 0x07) and no bar code scanner (usage page 0x8C) input; is this the scanner's interface?")]
    NoScannerFields,
}

fn usage_of(u: &hidreport::Usage) -> (u16, u16) {
    (u16::from(u.usage_page), u16::from(u.usage_id))
}

impl Layout {
    /// Find the keyboard and POS fields in a report descriptor.
    pub fn from_descriptor(descriptor: &[u8]) -> Result<Layout, LayoutError> {
        let rdesc = parse_descriptor(descriptor)?;
        let mut layout = Layout::default();
        for report in rdesc.input_reports() {
            let report_id = report.report_id().as_ref().map(u8::from);
            layout.numbered |= report_id.is_some();
            let len = report.size_in_bytes();
            let mut kbd = KeyboardFields::default();
            let mut pos = PosFields::default();
            for field in report.fields() {
                match field {
                    Field::Variable(v) => {
                        let (page, id) = usage_of(&v.usage);
                        let bits = v.bits.clone();
                        match (page, id) {
                            (PAGE_KEYBOARD, _) if bits.len() == 1 => kbd.bit_keys.push((bits, id)),
                            (PAGE_BARCODE, USAGE_DECODED_DATA) => pos.data.push(bits),
                            (PAGE_BARCODE, USAGE_SYMBOLOGY_ID_1..=USAGE_SYMBOLOGY_ID_3) => {
                                pos.symbology.push(bits)
                            }
                            (PAGE_BARCODE, USAGE_DECODE_DATA_CONTINUED) => {
                                pos.continued = Some(bits)
                            }
                            (PAGE_GENERIC_DESKTOP | PAGE_BARCODE, USAGE_BYTE_COUNT) => {
                                pos.byte_count = Some(bits)
                            }
                            _ => {}
                        }
                    }
                    Field::Array(a) => {
                        let usages: Vec<Option<u16>> = a
                            .usages()
                            .iter()
                            .map(|u| match usage_of(u) {
                                (PAGE_KEYBOARD, id) => Some(id),
                                _ => None,
                            })
                            .collect();
                        if usages.iter().all(Option::is_none) {
                            continue;
                        }
                        let count = usize::from(a.report_count);
                        let total = a.bits.len();
                        if count == 0 || total % count != 0 {
                            continue;
                        }
                        let slot_bits = total / count;
                        if slot_bits == 0 || slot_bits > 32 {
                            continue;
                        }
                        kbd.arrays.push(KeyArray {
                            start: a.bits.start,
                            slot_bits,
                            count,
                            logical_min: i64::from(i32::from(a.logical_minimum)),
                            usages,
                        });
                    }
                    Field::Constant(_) => {}
                }
            }
            // A POS report is the one with Decoded Data; keyboard fields elsewhere.
            let kind = if !pos.data.is_empty() {
                ReportKind::Pos(pos)
            } else if !kbd.arrays.is_empty() || kbd.bit_keys.iter().any(|(_, u)| *u < 0xE0) {
                ReportKind::Keyboard(kbd)
            } else {
                continue;
            };
            layout.reports.push(ReportLayout {
                report_id,
                len,
                kind,
            });
        }
        if layout.reports.is_empty() {
            return Err(LayoutError::NoScannerFields);
        }
        Ok(layout)
    }

    /// The layout for a report as read from the device, if it is one we decode.
    pub fn find(&self, report: &[u8]) -> Option<&ReportLayout> {
        if self.numbered {
            let id = *report.first()?;
            self.reports.iter().find(|r| r.report_id == Some(id))
        } else {
            self.reports.first()
        }
    }

    /// True when any report is a POS scanned-data report.
    pub fn has_pos(&self) -> bool {
        self.reports
            .iter()
            .any(|r| matches!(r.kind, ReportKind::Pos(_)))
    }
}

/// `hidreport` asserts on some malformed inputs; a descriptor comes from a
/// peripheral or a file, so a panic there becomes a parse error here.
fn parse_descriptor(descriptor: &[u8]) -> Result<ReportDescriptor, LayoutError> {
    check_limits(descriptor)?;
    let bytes = descriptor.to_vec();
    let parsed = std::panic::catch_unwind(move || ReportDescriptor::try_from(&bytes));
    match parsed {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(LayoutError::Parse(e.to_string())),
        Err(_) => Err(LayoutError::Parse(
            "the parser rejected it as inconsistent".into(),
        )),
    }
}

/// The kernel's limits (drivers/hid: HID_MAX_USAGES, report size 256 bits,
/// HID_MAX_DESCRIPTOR_SIZE); a descriptor past them never reaches hidraw, and
/// one in a recording must not make the parser allocate without bound.
pub const MAX_REPORT_COUNT: u32 = 12288;
pub const MAX_REPORT_SIZE: u32 = 256;
pub const MAX_DESCRIPTOR_LEN: usize = 4096;
/// HID_MAX_USAGES: the most usages one main item may name; `hidreport` lists
/// every usage of a Usage Minimum..Maximum range, so a wider range is refused.
pub const MAX_USAGES: u32 = 12288;

/// Walk the short items and refuse counts and sizes the kernel would refuse.
fn check_limits(descriptor: &[u8]) -> Result<(), LayoutError> {
    if descriptor.len() > MAX_DESCRIPTOR_LEN {
        return Err(LayoutError::Limit {
            offset: MAX_DESCRIPTOR_LEN,
            what: format!(
                "descriptor of {} bytes is longer than the kernel's {MAX_DESCRIPTOR_LEN}",
                descriptor.len()
            ),
        });
    }
    let mut at = 0;
    // The local Usage Minimum and Maximum in force (reset by every main item).
    let (mut usage_min, mut usage_max): (Option<u32>, Option<u32>) = (None, None);
    while let Some(&prefix) = descriptor.get(at) {
        // Every item is walked as a short item, 0xFE (the long-item prefix)
        // included: that is how `hidreport` itemizes, and this walk must see
        // the items the parser will see.
        let size = [0usize, 1, 2, 4][usize::from(prefix & 3)];
        let mut value: u32 = 0;
        for k in 0..size {
            let b = descriptor.get(at + 1 + k).copied().unwrap_or(0);
            value |= u32::from(b) << (8 * k);
        }
        match prefix & 0xFC {
            0x94 if value > MAX_REPORT_COUNT => {
                return Err(LayoutError::Limit {
                    offset: at,
                    what: format!(
                        "report count {value} exceeds the kernel's limit of {MAX_REPORT_COUNT}"
                    ),
                })
            }
            0x74 if value > MAX_REPORT_SIZE => {
                return Err(LayoutError::Limit {
                    offset: at,
                    what: format!(
                        "report size {value} bits exceeds the kernel's limit of {MAX_REPORT_SIZE}"
                    ),
                })
            }
            0x18 => usage_min = Some(value),
            0x28 => usage_max = Some(value),
            tag if tag & 0x0C == 0 => (usage_min, usage_max) = (None, None),
            _ => {}
        }
        if let (Some(min), Some(max)) = (usage_min, usage_max) {
            let span = u64::from(max.saturating_sub(min)) + 1;
            if max >= min && span > u64::from(MAX_USAGES) {
                return Err(LayoutError::Limit {
                    offset: at,
                    what: format!(
                        "usage range {min:#x}..={max:#x} names {span} usages, more than the kernel's limit of {MAX_USAGES}"
                    ),
                });
            }
        }
        at += 1 + size;
    }
    Ok(())
}

/// Read up to 32 bits, little-endian as HID reports are; `None` when the
/// range reaches past the report.
pub fn bits(report: &[u8], range: &Range<usize>) -> Option<u32> {
    let n = range.end.checked_sub(range.start)?;
    if n == 0 || n > 32 || range.end > report.len() * 8 {
        return None;
    }
    let mut v: u64 = 0;
    for (k, bit) in range.clone().enumerate() {
        let byte = *report.get(bit / 8)?;
        if byte >> (bit % 8) & 1 == 1 {
            v |= 1 << k;
        }
    }
    u32::try_from(v).ok()
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// The boot keyboard descriptor of HID 1.11 Appendix B.1 (also what most scanners send).
    pub const BOOT_KBD: &[u8] = &[
        0x05, 0x01, 0x09, 0x06, 0xa1, 0x01, 0x05, 0x07, 0x19, 0xe0, 0x29, 0xe7, 0x15, 0x00, 0x25,
        0x01, 0x75, 0x01, 0x95, 0x08, 0x81, 0x02, 0x95, 0x01, 0x75, 0x08, 0x81, 0x01, 0x95, 0x05,
        0x75, 0x01, 0x05, 0x08, 0x19, 0x01, 0x29, 0x05, 0x91, 0x02, 0x95, 0x01, 0x75, 0x03, 0x91,
        0x01, 0x95, 0x06, 0x75, 0x08, 0x15, 0x00, 0x25, 0x65, 0x05, 0x07, 0x19, 0x00, 0x29, 0x65,
        0x81, 0x00, 0xc0,
    ];
}

#[cfg(test)]
mod tests {
    use super::tests_support::BOOT_KBD;
    use super::*;

    #[test]
    fn boot_keyboard_fields() {
        let l = Layout::from_descriptor(BOOT_KBD).unwrap();
        assert!(!l.numbered);
        assert_eq!(l.reports.len(), 1);
        let r = &l.reports[0];
        assert_eq!(r.len, 8);
        let ReportKind::Keyboard(k) = &r.kind else {
            panic!("not a keyboard: {r:?}")
        };
        assert_eq!(k.bit_keys.len(), 8);
        assert_eq!(k.bit_keys[1], (1..2, 0xE1)); // left shift
        assert_eq!(k.arrays.len(), 1);
        let a = &k.arrays[0];
        assert_eq!((a.start, a.slot_bits, a.count), (16, 8, 6));
        assert_eq!(a.usages.get(0x20), Some(&Some(0x20)));
    }

    #[test]
    fn bits_reads_little_endian_and_refuses_overruns() {
        let r = [0b1010_0000, 0x01];
        assert_eq!(bits(&r, &(5..6)), Some(1));
        assert_eq!(bits(&r, &(4..6)), Some(0b10));
        assert_eq!(bits(&r, &(0..16)), Some(0x01A0));
        assert_eq!(bits(&r, &(8..24)), None);
        assert_eq!(bits(&r, &(0..0)), None);
    }

    #[test]
    fn counts_past_the_kernel_limit_are_refused_before_parsing() {
        // Usage Page (Keyboard), Usage (a), Report Size (1), Report Count (1048576), Input.
        let d = [
            0x05, 0x07, 0x09, 0x04, 0x75, 0x01, 0x97, 0x00, 0x00, 0x10, 0x00, 0x81, 0x02,
        ];
        let e = Layout::from_descriptor(&d).unwrap_err().to_string();
        assert_eq!(
            e,
            "report descriptor item at offset 6: report count 1048576 exceeds the kernel's limit of 12288"
        );
        let d = [
            0x05, 0x07, 0x09, 0x04, 0x76, 0x00, 0x04, 0x95, 0x01, 0x81, 0x02,
        ];
        let e = Layout::from_descriptor(&d).unwrap_err().to_string();
        assert!(e.contains("report size 1024 bits"), "{e}");
    }

    #[test]
    fn a_huge_usage_range_is_refused_before_parsing() {
        // Found by the fuzz target hid_descriptor: Usage Minimum (1) and a
        // four-byte Usage Maximum (0x107503FE) before an array Input; the
        // parser listed all 276 million usages (over 2 GB) for 43 bytes.
        let d = [
            0x05, 0x01, 0x09, 0x06, 0xa1, 0x03, 0x95, 0x05, 0x75, 0x01, 0x05, 0x08, 0x19, 0x01,
            0x29, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x95, 0x06, 0xff, 0x05,
            0x26, 0x00, 0x08, 0x15, 0x00, 0x2b, 0xfe, 0x03, 0x75, 0x10, 0x95, 0x01, 0x81, 0x00,
            0xc0,
        ];
        let e = Layout::from_descriptor(&d).unwrap_err().to_string();
        assert_eq!(
            e,
            "report descriptor item at offset 33: usage range 0x1..=0x107503fe names 276104190 usages, more than the kernel's limit of 12288"
        );
        // The widest range the kernel takes still parses: keys 0..=0x2FFF.
        let d = [
            0x05, 0x07, 0x19, 0x00, 0x2a, 0xff, 0x2f, 0x15, 0x00, 0x26, 0xff, 0x2f, 0x75, 0x10,
            0x95, 0x01, 0x81, 0x00,
        ];
        assert!(Layout::from_descriptor(&d).is_ok());
    }

    #[test]
    fn an_fe_byte_does_not_hide_the_next_items_from_the_limits() {
        // Found by the fuzz target hid_descriptor: the limit walk took 0xFE as a
        // long-item prefix and skipped 253 bytes, hidreport takes it as a short
        // item; the Report Count (0x81ff0901) it skipped made the parser ask
        // for 279 GB.
        let d = hex(
            "058c0902a101091229028502150026ff00750895010501093b81029503058c09fb0909fefd81ff\
             ffffffffffff0f0666ff950209018102058c25017501970109ff810575078103c00914a102a504\
             15002501753409fe8202010666ff950209c0",
        );
        let e = Layout::from_descriptor(&d).unwrap_err().to_string();
        assert_eq!(
            e,
            "report descriptor item at offset 61: report count 2180974849 exceeds the kernel's limit of 12288"
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn mouse_descriptor_is_not_a_scanner() {
        // Usage Page (Generic Desktop), Usage (Mouse), Collection, Usage Page (Button),
        // 3 buttons, 5 bits padding, X/Y relative, End Collection.
        let mouse: &[u8] = &[
            0x05, 0x01, 0x09, 0x02, 0xa1, 0x01, 0x05, 0x09, 0x19, 0x01, 0x29, 0x03, 0x15, 0x00,
            0x25, 0x01, 0x95, 0x03, 0x75, 0x01, 0x81, 0x02, 0x95, 0x01, 0x75, 0x05, 0x81, 0x01,
            0x05, 0x01, 0x09, 0x30, 0x09, 0x31, 0x15, 0x81, 0x25, 0x7f, 0x75, 0x08, 0x95, 0x02,
            0x81, 0x06, 0xc0,
        ];
        assert_eq!(
            Layout::from_descriptor(mouse),
            Err(LayoutError::NoScannerFields)
        );
    }
}
