//! The binary's own modules (the library knows nothing of them): the options, and each
//! command's printing of what the library computes. Human-readable text goes to stderr; with
//! `--json`, one JSON document goes to stdout.

pub mod args;
pub mod bench;
pub mod device;
pub mod model;
pub mod train;
