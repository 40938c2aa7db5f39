//! The agent's state files (and the controller's secrets file, which is one):
//! `statefile::decode` on any bytes, as `statefile::read` hands it a file's
//! content. A raw input rarely passes the SHA-256, so each input is also
//! framed with a valid header, the way `statefile::write` frames a payload,
//! and must come back unchanged.
#![no_main]

use std::path::Path;

use keyfleet_files::statefile;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.state");
    if let Ok(payload) = statefile::decode(path, data) {
        // What is accepted is the file's tail after one header line, intact.
        assert!(data.ends_with(&payload), "payload is not the file's tail");
        let head = data.len() - payload.len();
        assert_eq!(data.get(head.wrapping_sub(1)), Some(&b'\n'));
    }

    // The header format of SPEC'd state files, written independently here.
    let mut framed = format!(
        "keyfleet-state v1 len={} sha256={}\n",
        data.len(),
        hex::encode(Sha256::digest(data))
    )
    .into_bytes();
    framed.extend_from_slice(data);
    let back = statefile::decode(path, &framed).expect("a well-framed file decodes");
    assert_eq!(back.as_slice(), data);

    // Cut short anywhere, it is refused.
    if !data.is_empty() {
        let cut = framed.len() - 1 - usize::from(data[0]) % data.len();
        assert!(
            statefile::decode(path, &framed[..cut]).is_err(),
            "a truncated file decoded"
        );
    }
});
