//! The integration tests: one binary, real engine, real sockets.

mod cli;
mod engine;
mod gateway;
mod reload;
mod support;
