//! tailgate: live Materialize views as Server-Sent Events.
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
