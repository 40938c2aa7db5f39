//! The controller's TOML configuration file, as `Config::load` reads it
//! (`toml::from_str`, then `validate`): no panic, and an accepted file
//! written back as TOML reads back to the same configuration.
#![no_main]

use keyfleet_files::config::Config;
use keyfleet_fuzz::write_seeds;
use libfuzzer_sys::fuzz_target;

fn seeds() -> Vec<(String, Vec<u8>)> {
    vec![("default.toml".into(), Config::default_toml().into_bytes())]
}

fuzz_target!(init: write_seeds(seeds), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = toml::from_str::<Config>(text) else {
        return;
    };
    if let Err(e) = cfg.validate() {
        assert!(!e.to_string().is_empty());
        return;
    }
    let _ = cfg.controller();
    let again = toml::to_string(&cfg).expect("an accepted configuration serializes");
    let back: Config = toml::from_str(&again).expect("written configuration reads back");
    assert_eq!(back, cfg);
});
