//! The parts of xtask that the repository's tests use too.

pub mod gen_log;
