//! The serial shell: opens the port, tells a USB IR Toy from a receiver that
//! prints mode2 text, and delivers bytes. No decoding happens here.
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::source::{Access, DeviceInfo, SerialSettings, SourceError};

use super::irtoy;

/// USB ids of the IR Toy and the IR Droid (LIRC's `irtoy` plugin, the kernel's `ir_toy`).
pub const IRTOY_USB_IDS: [(u16, u16, &str); 2] = [
    (0x04d8, 0xfd08, "USB Infrared Toy"),
    (0x04d8, 0xf58b, "IR Droid"),
];

/// How long the IR Toy has to answer a command (the kernel's `TIMEOUT`).
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

/// What the probe found on the port.
pub enum Kind {
    /// A USB IR Toy, now in sample mode; samples that came with the reply.
    IrToy(Vec<u8>),
    /// Something else: taken to print mode2 text. Bytes it sent during the probe.
    Text(Vec<u8>),
}

/// An open serial receiver.
pub struct Port {
    port: serialport::TTYPort,
    path: String,
    irtoy: bool,
}

fn open_error(path: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Open {
        path: path.to_string(),
        reason: e.to_string(),
    }
}

impl Port {
    /// Open the port with the given line settings and probe it.
    pub fn open(path: &Path, s: &SerialSettings) -> Result<(Port, Kind), SourceError> {
        let name = path.display().to_string();
        let (data_bits, parity, stop_bits) =
            crate::tty::line_settings(s).map_err(|e| open_error(&name, e))?;
        let port = serialport::new(name.clone(), s.baud)
            .data_bits(data_bits)
            .parity(parity)
            .stop_bits(stop_bits)
            .timeout(Duration::from_millis(20))
            .open_native()
            .map_err(|e| open_error(&name, e))?;
        let mut p = Port {
            port,
            path: name,
            irtoy: false,
        };
        let kind = p.probe()?;
        p.irtoy = matches!(kind, Kind::IrToy(_));
        Ok((p, kind))
    }

    /// Reset, ask for the version; a `Vhss` answer is an IR Toy, which is
    /// then put in sample mode. Anything else is a text receiver.
    fn probe(&mut self) -> Result<Kind, SourceError> {
        self.write(irtoy::CMD_RESET)?;
        // Whatever was queued before the reset is stale.
        let _ = self.read_for(Duration::from_millis(50), usize::MAX)?;
        self.write(&[irtoy::CMD_VERSION])?;
        let reply = self.read_for(COMMAND_TIMEOUT, 4)?;
        let Some((hardware, firmware)) = irtoy::parse_version(&reply) else {
            tracing::debug!(port = %self.path, "no IR Toy version reply; reading mode2 text");
            return Ok(Kind::Text(reply));
        };
        if firmware < irtoy::MIN_FIRMWARE {
            return Err(open_error(
                &self.path,
                format!(
                    "IR Toy firmware v{firmware:02} is too old for sample mode; update it to v{:02} or later",
                    irtoy::MIN_FIRMWARE
                ),
            ));
        }
        self.write(&[irtoy::CMD_SAMPLE_MODE])?;
        let mut reply = self.read_for(COMMAND_TIMEOUT, 3)?;
        let samples = reply.split_off(reply.len().min(3));
        if irtoy::parse_sample_mode_reply(&reply).is_none() {
            return Err(open_error(
                &self.path,
                format!("IR Toy did not enter sample mode (answered {reply:02x?}); unplug it and try again"),
            ));
        }
        tracing::info!(port = %self.path, hardware, firmware, "USB IR Toy in sample mode");
        Ok(Kind::IrToy(samples))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), SourceError> {
        self.port.write_all(bytes)?;
        self.port.flush()?;
        Ok(())
    }

    /// Read until `want` bytes arrived or `wait` passed.
    fn read_for(&mut self, wait: Duration, want: usize) -> Result<Vec<u8>, SourceError> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while out.len() < want && Instant::now() < deadline {
            match self.read(&mut buf)? {
                0 => {}
                n => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
        }
        Ok(out)
    }

    /// Read what is there, waiting at most the port timeout (20 ms); 0 when nothing came.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, SourceError> {
        match self.port.read(buf) {
            Ok(0) => Err(SourceError::Ended(format!("{} closed", self.path))),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(0),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(SourceError::Ended(format!("{}: {e}", self.path))),
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if self.irtoy {
            // Back to IRman mode: left in sample mode the Toy keeps streaming
            // and the next open of the tty fails (LIRC's irtoy plugin notes this).
            let _ = self.port.write_all(&[0]);
        }
    }
}

/// Serial ports that are known IR receivers (USB IR Toy, IR Droid).
pub fn list() -> Vec<DeviceInfo> {
    crate::tty::ports()
        .into_iter()
        .filter_map(|p| {
            let serialport::SerialPortType::UsbPort(usb) = p.port_type else {
                return None;
            };
            let (_, _, product) = IRTOY_USB_IDS
                .iter()
                .find(|(vid, pid, _)| *vid == usb.vid && *pid == usb.pid)?;
            Some(DeviceInfo {
                kind: super::NAME,
                access: Access::check(Path::new(&p.port_name), crate::tty::FIX),
                path: p.port_name,
                vendor: usb.manufacturer,
                product: Some(usb.product.unwrap_or_else(|| product.to_string())),
                note: None,
            })
        })
        .collect()
}
