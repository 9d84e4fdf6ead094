//! The integration tests: one binary, real engine, real sockets.

mod cli;
mod engine;
mod faults;
mod gateway;
mod reload;
mod support;
