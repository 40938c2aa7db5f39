//! Serial ports, shared by the serial scanner and the IR receivers: the line
//! settings in `serialport`'s terms, the USB and PCI ports present, and what
//! grants access to them.
use std::path::Path;

use crate::source::SerialSettings;

/// What [`Access::Denied`](crate::source::Access::Denied) says for a tty.
pub const FIX: &str = "install udev/70-keyfleet.rules (TAG+=\"uaccess\" on the ttyUSB/ttyACM \
     of known scanners, IR receivers and USB-serial bridges; README \"udev rules\") or join the \
     dialout group, then replug";

/// Check the line settings and turn them into serialport's terms.
pub fn line_settings(
    s: &SerialSettings,
) -> Result<
    (
        serialport::DataBits,
        serialport::Parity,
        serialport::StopBits,
    ),
    String,
> {
    use serialport::{DataBits, Parity, StopBits};
    if s.baud == 0 {
        return Err(
            "baud rate 0; give the device's rate with --baud (often 9600 or 115200)".into(),
        );
    }
    let data = match s.data_bits {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        8 => DataBits::Eight,
        n => return Err(format!("data bits {n}; use 5, 6, 7 or 8")),
    };
    let parity = match s.parity.to_ascii_uppercase() {
        'N' => Parity::None,
        'E' => Parity::Even,
        'O' => Parity::Odd,
        c => return Err(format!("parity {c:?}; use N, E or O")),
    };
    let stop = match s.stop_bits {
        1 => StopBits::One,
        2 => StopBits::Two,
        n => return Err(format!("stop bits {n}; use 1 or 2")),
    };
    Ok((data, parity, stop))
}

/// USB and PCI serial ports (a scanner in serial mode or an IR receiver is one of these).
pub fn ports() -> Vec<serialport::SerialPortInfo> {
    // serialport's sysfs scan panics when /sys/class/tty is missing (some containers).
    if !Path::new("/sys/class/tty").is_dir() {
        return Vec::new();
    }
    match serialport::available_ports() {
        Ok(p) => p
            .into_iter()
            .filter(|p| {
                matches!(
                    p.port_type,
                    serialport::SerialPortType::UsbPort(_) | serialport::SerialPortType::PciPort
                )
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list serial ports");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_settings_are_checked() {
        let mut s = SerialSettings::default();
        assert!(line_settings(&s).is_ok());
        s.data_bits = 9;
        assert_eq!(
            line_settings(&s).unwrap_err(),
            "data bits 9; use 5, 6, 7 or 8"
        );
        s = SerialSettings {
            parity: 'X',
            ..Default::default()
        };
        assert!(line_settings(&s).unwrap_err().contains("parity 'X'"));
        s = SerialSettings {
            stop_bits: 3,
            ..Default::default()
        };
        assert!(line_settings(&s).unwrap_err().contains("stop bits 3"));
        s = SerialSettings {
            baud: 0,
            ..Default::default()
        };
        assert!(line_settings(&s).unwrap_err().contains("--baud"));
    }
}
