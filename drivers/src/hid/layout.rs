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
use std::collections::BTreeMap;
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
    /// Fields the walk over the descriptor's items could not place or name
    /// (past its bound), whose usages are then `hidreport`'s (0 for every
    /// real descriptor tested).
    pub unplaced_fields: usize,
}

/// Why a descriptor cannot drive a scanner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("report descriptor does not parse: {0}")]
    Parse(String),
    #[error("report descriptor item at offset {offset}: {what}; the kernel refuses such a descriptor, or no real one comes near it, so it is corrupt or hostile and is not parsed: use another scanner, or enter the key another way (`--from keyboard`)")]
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
        let (rdesc, descriptor) = parse_descriptor(without_trailing_padding(descriptor))?;
        let items = input_items(&descriptor);
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
                        let bits = v.bits.clone();
                        let declared = declared_usage(&items, report_id, &bits);
                        layout.unplaced_fields += usize::from(declared.is_none());
                        let (page, id) = declared.unwrap_or_else(|| usage_of(&v.usage));
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
                        let placed = declared_item(&items, report_id, &a.bits);
                        layout.unplaced_fields += usize::from(placed.is_none());
                        let declared = placed
                            .map(|(item, _)| item.usages.clone())
                            .filter(|u| !u.is_empty());
                        let usages: Vec<Option<u16>> = declared
                            .unwrap_or_else(|| a.usages().iter().map(usage_of).collect())
                            .into_iter()
                            .map(|u| match u {
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

/// Zero bytes after the last item: some devices (the Apple Wireless Keyboard
/// 05ac:0256 among them) pad their descriptor with them. A 0x00 byte is a main
/// item of the reserved tag 0 that the kernel skips with a warning and
/// `hidreport` refuses, so padding at the end is cut before parsing.
fn without_trailing_padding(descriptor: &[u8]) -> &[u8] {
    let mut at = 0;
    let mut end = 0;
    while let Some(&prefix) = descriptor.get(at) {
        let size = [0usize, 1, 2, 4][usize::from(prefix & 3)];
        at += 1 + size;
        if prefix != 0 {
            end = at.min(descriptor.len());
        }
    }
    &descriptor[..end]
}

/// One Input main item as the descriptor declares it: where its fields sit
/// and every usage it names, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InputItem {
    /// First bit, counted as `hidreport` counts (the report ID byte included).
    start: usize,
    size: usize,
    count: usize,
    /// (page, id) of each usage: Usage items and every Usage Minimum..Maximum
    /// range, in the order given (HID 1.11 §6.2.2.8).
    usages: Vec<(u16, u16)>,
}

/// The Input main items with all their usages. `hidreport` 0.6 keeps only
/// the last Usage Minimum..Maximum pair of a main item, so an NKRO bitmap
/// declared as `Usage Minimum (E0) Usage Maximum (E7) Usage Minimum (00)
/// Usage Maximum (67)` over 112 bits gets usages 00..67 from bit 0 and every
/// key comes out 8 usages off; the ranges are read here instead, and the
/// fields' bit positions still come from `hidreport`. Run after
/// [`check_limits`], which bounds every range; at most [`MAX_EXPANSION`]
/// usages are listed in all (past that, items get none and their fields keep
/// `hidreport`'s usages). Items are grouped by report ID, in bit order.
fn input_items(descriptor: &[u8]) -> InputItems {
    #[derive(Clone, Copy, Default)]
    struct Globals {
        page: u16,
        size: u32,
        count: u32,
        report_id: Option<u8>,
    }
    let mut globals = Globals::default();
    let mut stack: Vec<Globals> = Vec::new();
    let mut usages: Vec<(u16, u16)> = Vec::new();
    let mut min: Option<(Option<u16>, u32)> = None;
    let mut offsets: BTreeMap<Option<u8>, usize> = BTreeMap::new();
    let mut items = InputItems::new();
    let mut budget = MAX_EXPANSION as usize;
    let mut at = 0;
    while let Some(&prefix) = descriptor.get(at) {
        let size = [0usize, 1, 2, 4][usize::from(prefix & 3)];
        let mut value: u32 = 0;
        for k in 0..size {
            let b = descriptor.get(at + 1 + k).copied().unwrap_or(0);
            value |= u32::from(b) << (8 * k);
        }
        // A four-byte usage carries its page in the high half.
        let page_of = |v: u32| (size == 4).then_some((v >> 16) as u16);
        match prefix & 0xFC {
            0x04 => globals.page = value as u16,
            0x74 => globals.size = value,
            0x94 => globals.count = value,
            0x84 => globals.report_id = Some(value as u8),
            0xA4 => stack.push(globals),
            0xB4 => globals = stack.pop().unwrap_or(globals),
            0x08 if budget > usages.len() => {
                usages.push((page_of(value).unwrap_or(globals.page), value as u16))
            }
            0x18 => min = Some((page_of(value), value & 0xFFFF)),
            0x28 => {
                if let Some((page, lo)) = min.take() {
                    let page = page.unwrap_or(globals.page);
                    let hi = value & 0xFFFF;
                    let room = (MAX_USAGES as usize)
                        .min(budget)
                        .saturating_sub(usages.len());
                    usages.extend((lo..=hi).take(room).map(|u| (page, u as u16)));
                }
            }
            0x80 | 0x90 | 0xA0 | 0xB0 | 0xC0 => {
                if prefix & 0xFC == 0x80 {
                    let offset = offsets
                        .entry(globals.report_id)
                        .or_insert(if globals.report_id.is_some() { 8 } else { 0 });
                    let (size, count) = (globals.size as usize, globals.count as usize);
                    budget = budget.saturating_sub(usages.len());
                    if size * count > 0 {
                        items.entry(globals.report_id).or_default().push(InputItem {
                            start: *offset,
                            size,
                            count,
                            usages: std::mem::take(&mut usages),
                        });
                    }
                    *offset += size * count;
                }
                usages.clear();
                min = None;
            }
            _ => {}
        }
        at += 1 + size;
    }
    items
}

/// Input items per report ID, each list in bit order.
type InputItems = BTreeMap<Option<u8>, Vec<InputItem>>;

/// The Input item holding the field at `bits`, and the field's index in it.
fn declared_item<'a>(
    items: &'a InputItems,
    report_id: Option<u8>,
    bits: &Range<usize>,
) -> Option<(&'a InputItem, usize)> {
    let list = items.get(&report_id)?;
    // Items have bits and do not overlap: only the last one starting at or before can hold it.
    let at = list.partition_point(|i| i.start <= bits.start);
    let item = list.get(at.checked_sub(1)?)?;
    let end = item.start + item.size * item.count;
    (bits.start < end && (bits.start - item.start) % item.size == 0)
        .then(|| (item, (bits.start - item.start) / item.size))
}

/// The usage the descriptor gives a variable field: the n-th usage of its
/// item, or the last one when the item names fewer usages than fields.
fn declared_usage(
    items: &InputItems,
    report_id: Option<u8>,
    bits: &Range<usize>,
) -> Option<(u16, u16)> {
    let (item, index) = declared_item(items, report_id, bits)?;
    item.usages
        .get(index)
        .or_else(|| item.usages.last())
        .copied()
}

/// `hidreport` asserts on some malformed inputs; a descriptor comes from a
/// peripheral or a file, so a panic there becomes a parse error here.
/// Returns the descriptor as parsed: with any usage range past the kernel's
/// limit cut short (see [`check_limits`]).
fn parse_descriptor(descriptor: &[u8]) -> Result<(ReportDescriptor, Vec<u8>), LayoutError> {
    let mut bytes = descriptor.to_vec();
    check_limits(&mut bytes)?;
    let copy = bytes.clone();
    let parsed = std::panic::catch_unwind(move || ReportDescriptor::try_from(&copy));
    match parsed {
        Ok(Ok(r)) => Ok((r, bytes)),
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
/// The most entries `hidreport` may build for one descriptor: fields, the
/// copies of the open collections each field carries (with their usages), and
/// usages. The items stay within the kernel's limits one by one, but they
/// multiply: a Report Count of 12288 inside a collection of 12288 usages is
/// 151 million usages (600 MB) from 21 bytes. The densest of the 783 real
/// descriptors in the hidreport repository's test data
/// builds 57 entries per descriptor byte, the largest 63 187; at the kernel's
/// 4096 bytes that density is 232 000, under this bound. The fixtures build at
/// most 1 346. At the bound the parser needs about 40 MB and 0.1 s.
pub const MAX_EXPANSION: u64 = 1 << 18;

/// What `hidreport` keeps per Push level, as far as the limits need it.
/// `hidreport` saves and restores the *local* items on Push and Pop too
/// (HID 1.11 §6.2.2.7 saves only the global ones), so a Usage Minimum that a
/// main item cleared comes back with a Pop.
#[derive(Debug, Clone, Default)]
struct Level {
    report_count: u32,
    report_size: u32,
    /// Usage items since the last main item.
    usages: u64,
    usage_min: Option<UsageMin>,
    usage_max: Option<UsageMax>,
}

#[derive(Debug, Clone, Copy)]
struct UsageMax {
    value: u32,
    /// Where the Usage Maximum item is, and its data size: a range too wide
    /// is cut there.
    at: usize,
    size: usize,
}

#[derive(Debug, Clone, Copy)]
struct UsageMin {
    value: u32,
    /// Where the Usage Minimum item is.
    at: usize,
    /// The Pop that brought it back, if one did.
    popped_at: Option<usize>,
}

impl Level {
    /// How many usages `hidreport` lists for a main item here (its
    /// `compile_usages`): the Usage Minimum..Maximum range when there is a
    /// minimum, else the Usage items.
    fn usages(&self) -> u64 {
        match (self.usage_min, self.usage_max) {
            (Some(min), Some(max)) if max.value >= min.value => {
                u64::from(max.value - min.value) + 1
            }
            (Some(_), _) => 0,
            (None, _) => self.usages,
        }
    }

    fn clear_locals(&mut self) {
        (self.usages, self.usage_min, self.usage_max) = (0, None, None);
    }
}

/// Walk the short items as `hidreport` reads them, keep its state (Push
/// levels, open collections), and refuse counts and sizes the kernel would
/// refuse and a descriptor that would expand past [`MAX_EXPANSION`]. A usage
/// range wider than the kernel's [`MAX_USAGES`] is cut short as the kernel
/// cuts it ("ignoring exceeding usage max"): its Usage Maximum item is
/// rewritten in `descriptor` to name 12288 usages (a consumer-control range
/// 0..0x7FFF of a real keyboard's interface is one). Returns how many ranges
/// were cut.
fn check_limits(descriptor: &mut [u8]) -> Result<usize, LayoutError> {
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
    // Never empty: a Pop that would empty it is refused by the parser, and
    // skipped here (the walk goes on, so it checks at least what the parser reads).
    let mut levels = vec![Level::default()];
    // The usage count of each open collection: every field carries a copy of them.
    let mut collections: Vec<u64> = Vec::new();
    let mut expansion: u64 = 0;
    let mut cuts = 0;
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
        // The entries this item adds.
        let mut cost: u64 = 0;
        match prefix & 0xFC {
            // Push copies the level, its Usage items included.
            0xA4 => {
                if let Some(top) = levels.last().cloned() {
                    cost = 1 + top.usages;
                    levels.push(top);
                }
            }
            0xB4 if levels.len() > 1 => {
                levels.pop();
                if let Some(min) = levels.last_mut().and_then(|l| l.usage_min.as_mut()) {
                    min.popped_at = Some(at);
                }
            }
            _ => {}
        }
        let Some(level) = levels.last_mut() else {
            break;
        };
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
            0x94 => level.report_count = value,
            0x74 => level.report_size = value,
            0x08 => {
                level.usages += 1;
                cost = 1;
            }
            0x18 => {
                level.usage_min = Some(UsageMin {
                    value,
                    at,
                    popped_at: None,
                })
            }
            0x28 => level.usage_max = Some(UsageMax { value, at, size }),
            // Collection: its usages, kept until End Collection.
            0xA0 => {
                let n = level.usages();
                cost = 1 + n;
                collections.push(n);
                level.clear_locals();
            }
            0xC0 => {
                collections.pop();
                level.clear_locals();
            }
            // Input, Output, Feature: nothing without a count and a size; a
            // constant is one field; a variable is one field per count, an
            // array one field; each with a copy of the open collections.
            0x80 | 0x90 | 0xB0 => {
                if level.report_count > 0 && level.report_size > 0 {
                    cost = if value & 1 == 1 {
                        1
                    } else {
                        let fields = if value & 2 == 2 {
                            u64::from(level.report_count)
                        } else {
                            1
                        };
                        let per_field = 1 + collections.iter().map(|n| 1 + n).sum::<u64>();
                        level.usages() + fields * per_field
                    };
                }
                level.clear_locals();
            }
            _ => {}
        }
        if let (Some(min), Some(max)) = (level.usage_min, level.usage_max.as_mut()) {
            let span = u64::from(max.value.saturating_sub(min.value)) + 1;
            if max.value >= min.value && span > u64::from(MAX_USAGES) {
                // min + 12287 < max, so it fits the item's data; the bytes may
                // already hold a smaller cut (a copy of this level from before a Push).
                let mut current: u32 = 0;
                for k in 0..max.size {
                    let b = descriptor.get(max.at + 1 + k).copied().unwrap_or(0);
                    current |= u32::from(b) << (8 * k);
                }
                let cut = (min.value + (MAX_USAGES - 1)).min(current);
                for k in 0..max.size {
                    if let Some(b) = descriptor.get_mut(max.at + 1 + k) {
                        *b = (cut >> (8 * k)) as u8;
                    }
                }
                tracing::debug!(
                    offset = max.at,
                    min = min.value,
                    min_offset = min.at,
                    min_popped_at = ?min.popped_at,
                    max = max.value,
                    "usage range past the kernel's limit cut short, as the kernel does"
                );
                max.value = cut;
                cuts += 1;
                // The cost of an item already counted with the wide range stays counted.
            }
        }
        expansion = expansion.saturating_add(cost);
        if expansion > MAX_EXPANSION {
            return Err(LayoutError::Limit {
                offset: at,
                what: format!(
                    "the descriptor expands to more than {MAX_EXPANSION} fields, collection copies and usages ({cost} for this item alone); real descriptors stay under a quarter of that"
                ),
            });
        }
        at += 1 + size;
    }
    Ok(cuts)
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

    /// The NKRO interface of a real keyboard (KYE Imperator 0458:4018,
    /// interface 2, from the hid-recorder capture in bentiss/hid-devices):
    /// 112 one-bit fields under two usage ranges, E0–E7 then 00–67.
    const NKRO_KYE: &str = "05 01 09 06 a1 01 95 70 75 01 15 00 25 01 05 07 19 e0 29 e7 \
                            19 00 29 67 81 02 96 90 01 75 01 81 01 c0";

    #[test]
    fn an_nkro_bitmap_takes_both_usage_ranges_in_order() {
        let l = Layout::from_descriptor(&hex(NKRO_KYE)).unwrap();
        assert_eq!(l.reports[0].len, 64);
        let ReportKind::Keyboard(k) = &l.reports[0].kind else {
            panic!("not a keyboard: {l:?}")
        };
        assert_eq!(k.bit_keys.len(), 112);
        assert!(k.arrays.is_empty());
        // Bit 0 is Left Control, bit 7 Right GUI, bit 8 usage 00, bit 12 'a' (0x04).
        assert_eq!(k.bit_keys[0], (0..1, 0xE0));
        assert_eq!(k.bit_keys[7], (7..8, 0xE7));
        assert_eq!(k.bit_keys[8], (8..9, 0x00));
        assert_eq!(k.bit_keys[12], (12..13, 0x04));
        assert_eq!(k.bit_keys[111], (111..112, 0x67));
    }

    #[test]
    fn several_usage_ranges_of_a_key_array_are_kept() {
        // Report ID 1; one 8-bit key slot whose values 0..3 are a..d and 4..5 are 1..2.
        let d = hex("0501 0906 a101 8501 0507 1904 2907 191e 291f 1500 2505 7508 9501 8100 c0");
        let l = Layout::from_descriptor(&d).unwrap();
        let ReportKind::Keyboard(k) = &l.reports[0].kind else {
            panic!("not a keyboard: {l:?}")
        };
        let usages: Vec<Option<u16>> = k.arrays[0].usages.clone();
        assert_eq!(
            usages,
            [0x04, 0x05, 0x06, 0x07, 0x1E, 0x1F].map(Some).to_vec()
        );
        assert_eq!(k.arrays[0].start, 8);
    }

    #[test]
    fn many_wide_ranges_stay_bounded() {
        // Report Size 1, Count 1, then 372 times: Usage Minimum 0, Usage
        // Maximum 0x2FFF, Usage Minimum 0, Usage Maximum 0, Input. The limit
        // walk counts one usage per item (the last range, as hidreport lists
        // it); keyfleet's own listing caps each item at 12288 and all at
        // MAX_EXPANSION.
        let mut d = hex("0507 7501 9501");
        while d.len() + 11 <= MAX_DESCRIPTOR_LEN {
            d.extend_from_slice(&hex("1900 2aff2f 1900 2900 8102"));
        }
        let start = std::time::Instant::now();
        let items = input_items(&d);
        let listed: usize = items.values().flatten().map(|i| i.usages.len()).sum();
        println!(
            "{} items, {listed} usages listed in {:?}",
            items.values().map(Vec::len).sum::<usize>(),
            start.elapsed()
        );
        assert!(listed <= MAX_EXPANSION as usize, "{listed}");
        // The descriptor itself parses; the fields past the bound keep hidreport's usages.
        let l = Layout::from_descriptor(&d).unwrap();
        println!("{} fields left to hidreport's usages", l.unplaced_fields);
        assert!(l.unplaced_fields < 371);
    }

    #[test]
    fn zero_padding_after_the_descriptor_is_cut() {
        // The boot keyboard with one 0x00 after End Collection, as the Apple
        // Wireless Keyboard 05ac:0256 sends its descriptor; a 0x00 inside an
        // item's data stays.
        let mut d = BOOT_KBD.to_vec();
        d.push(0x00);
        assert_eq!(
            Layout::from_descriptor(&d).unwrap(),
            Layout::from_descriptor(BOOT_KBD).unwrap()
        );
        assert_eq!(
            without_trailing_padding(&hex("0507 8100")),
            hex("0507 8100")
        );
        assert_eq!(without_trailing_padding(&hex("c0 00 00")), hex("c0"));
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
        assert_eq!(
            Layout::from_descriptor(&d),
            limit(
                6,
                "report count 1048576 exceeds the kernel's limit of 12288"
            )
        );
        let d = [
            0x05, 0x07, 0x09, 0x04, 0x76, 0x00, 0x04, 0x95, 0x01, 0x81, 0x02,
        ];
        let e = Layout::from_descriptor(&d).unwrap_err().to_string();
        assert!(e.contains("report size 1024 bits"), "{e}");
    }

    /// The Usage Maximum items `check_limits` rewrote, as (offset, new value).
    fn cuts(d: &[u8]) -> Vec<(usize, u32)> {
        let mut b = d.to_vec();
        let n = check_limits(&mut b).unwrap();
        let mut out: Vec<(usize, u32)> = Vec::new();
        let mut at = 0;
        while let Some(&prefix) = d.get(at) {
            let size = [0usize, 1, 2, 4][usize::from(prefix & 3)];
            if b.get(at + 1..at + 1 + size) != d.get(at + 1..at + 1 + size) {
                let mut v = 0u32;
                for k in 0..size {
                    v |= u32::from(b[at + 1 + k]) << (8 * k);
                }
                out.push((at, v));
            }
            at += 1 + size;
        }
        assert!(out.len() <= n, "{out:?} for {n} cuts");
        out
    }

    #[test]
    fn a_huge_usage_range_is_cut_short_as_the_kernel_does() {
        // Found by the fuzz target hid_descriptor: Usage Minimum (1) and a
        // four-byte Usage Maximum (0x107503FE) before an array Input; the
        // parser listed all 276 million usages (over 2 GB) for 43 bytes. It
        // was refused; now the range is cut to 12288 usages, 1..=0x3000, as
        // the kernel cuts it ("ignoring exceeding usage max"), before parsing.
        let d = [
            0x05, 0x01, 0x09, 0x06, 0xa1, 0x03, 0x95, 0x05, 0x75, 0x01, 0x05, 0x08, 0x19, 0x01,
            0x29, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x95, 0x06, 0xff, 0x05,
            0x26, 0x00, 0x08, 0x15, 0x00, 0x2b, 0xfe, 0x03, 0x75, 0x10, 0x95, 0x01, 0x81, 0x00,
            0xc0,
        ];
        assert_eq!(cuts(&d), [(33, 0x3000)]);
        // The array is on the LED page: no keyboard, no scanner.
        assert_eq!(
            Layout::from_descriptor(&d),
            Err(LayoutError::NoScannerFields)
        );
        // The widest range the kernel takes is left as it is: keys 0..=0x2FFF.
        let d = [
            0x05, 0x07, 0x19, 0x00, 0x2a, 0xff, 0x2f, 0x15, 0x00, 0x26, 0xff, 0x2f, 0x75, 0x10,
            0x95, 0x01, 0x81, 0x00,
        ];
        assert_eq!(cuts(&d), []);
        assert!(Layout::from_descriptor(&d).is_ok());
    }

    #[test]
    fn a_real_consumer_range_past_the_limit_is_cut_and_the_keyboard_read() {
        // The KYE Imperator's interface 1 declares Consumer usages 0..=0x7FFF
        // (32768) on report ID 3; the kernel cuts the range and binds the
        // device. A scanner's composite interface may do the same beside its
        // keyboard report: here the Imperator's consumer report follows a
        // boot keyboard on report ID 1.
        let d = hex(
            "0501 0906 a101 8501 0507 19e0 29e7 1500 2501 7501 9508 8102 \
             9506 7508 1500 2565 1900 2965 8100 c0 \
             050c 0901 a101 8503 1900 2aff7f 1500 26ff7f 9501 7510 8100 c0",
        );
        assert_eq!(cuts(&d), [(49, 0x2FFF)]);
        let l = Layout::from_descriptor(&d).unwrap();
        assert_eq!(l.reports.len(), 1);
        assert_eq!(l.reports[0].report_id, Some(1));
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
        assert_eq!(
            Layout::from_descriptor(&d),
            limit(
                61,
                "report count 2180974849 exceeds the kernel's limit of 12288"
            )
        );
    }

    fn limit(offset: usize, what: &str) -> Result<Layout, LayoutError> {
        Err(LayoutError::Limit {
            offset,
            what: what.to_string(),
        })
    }

    #[test]
    fn a_usage_minimum_brought_back_by_pop_counts_for_the_range() {
        // hidreport saves the local items on Push and restores them on Pop:
        // the Usage Minimum (1) that the Collection cleared is back after the
        // Pop, and the Usage Maximum makes a range of 4 billion usages, cut
        // to 1..=0x3000 before hidreport lists it.
        // Usage Page (Keyboard), Usage Minimum (1), Push, Collection, Pop,
        // Usage Maximum (0xFFFFFFFF), Collection.
        let d = hex("0507 1901 a4 a101 b4 2bffffffff a101");
        assert_eq!(cuts(&d), [(8, 0x3000)]);
        assert!(
            !matches!(Layout::from_descriptor(&d), Err(LayoutError::Limit { .. })),
            "{:?}",
            Layout::from_descriptor(&d)
        );
        // Push and Pop as devices use them (global items around a field) still parse.
        let d = hex(
            "0501 0906 a101 0507 a4 19e0 29e7 1500 2501 7501 9508 8102 b4 \
             1900 2965 1500 2565 7508 9506 8100 c0",
        );
        let l = Layout::from_descriptor(&d).unwrap();
        let ReportKind::Keyboard(k) = &l.reports[0].kind else {
            panic!("not a keyboard: {l:?}")
        };
        assert_eq!((k.bit_keys.len(), k.arrays.len()), (8, 1));
    }

    #[test]
    fn the_fuzzers_slow_descriptor_is_cut_before_parsing() {
        // Found by the fuzz target hid_descriptor (CI's mutation pass,
        // 2026-11-25): hidreport spent 13 s (debug) and 3.5 GB on these
        // 457 bytes. A Usage Minimum (0xE0, offset 128) survives two
        // Push/Pop pairs; the four-byte Usage Maximum 0x36363636 at offset
        // 287 completes a range of 909 million usages, listed for the
        // Collection at 307. It was refused; now the range is cut to
        // 0xE0..=0x30DF (12288 usages) at offset 287 (and at 345, a second
        // Usage Maximum with the same minimum), as the kernel cuts it, and
        // what is left is read.
        let d = include_bytes!("testdata/push-pop-usage-range.bin");
        let expected = include_str!("testdata/push-pop-usage-range.expected");
        // A second four-byte Usage Maximum at 345 pairs with the same minimum.
        assert_eq!(cuts(d), [(287, 0x30DF), (345, 0x30DF)]);
        let start = std::time::Instant::now();
        let l = Layout::from_descriptor(d);
        println!("the fuzzers' slow descriptor read in {:?}", start.elapsed());
        assert_eq!(format!("{l:?}"), expected.trim_end());
    }

    #[test]
    fn fields_times_collection_usages_are_bounded() {
        // Each item within the kernel's limits, together 151 million entries
        // (hidreport: 596 MB, every one of the 12288 fields carrying a copy
        // of the collection's 12288 usages). Usage Page (Keyboard), Usage
        // Minimum (0), Usage Maximum (0x2FFF), Collection, Report Size (1),
        // Report Count (12288), Usage (1), Input (Data, Variable).
        let d = hex("0507 1900 2aff2f a101 7501 960030 0901 8102");
        assert_eq!(
            Layout::from_descriptor(&d),
            limit(
                16,
                "the descriptor expands to more than 262144 fields, collection copies and \
                 usages (151019521 for this item alone); real descriptors stay under a \
                 quarter of that"
            )
        );
        // The bound itself: 21 inputs of 12288 one-bit fields (258 090
        // entries) parse, a 22nd (270 380) is refused.
        let head = hex("0507 7501 960030");
        let input = hex("0901 8102");
        let mut d = head.clone();
        for _ in 0..21 {
            d.extend_from_slice(&input);
        }
        let l = Layout::from_descriptor(&d).unwrap();
        let ReportKind::Keyboard(k) = &l.reports[0].kind else {
            panic!("not a keyboard: {:?}", l.reports[0])
        };
        assert_eq!(k.bit_keys.len(), 21 * 12288);
        d.extend_from_slice(&input);
        let e = Layout::from_descriptor(&d).unwrap_err();
        assert!(matches!(e, LayoutError::Limit { offset: 93, .. }), "{e}");
    }

    #[test]
    fn a_limit_error_says_what_to_do() {
        let e = Layout::from_descriptor(&hex("0507 1900 2aff2f a101 7501 960030 0901 8102"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("report descriptor item at offset 16: the descriptor expands"),
            "{e}"
        );
        assert!(
            e.ends_with("use another scanner, or enter the key another way (`--from keyboard`)"),
            "{e}"
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
