//! The integration tests: one binary, real engine, real sockets.

mod auth;
mod browser;
mod cli;
mod engine;
mod faults;
mod gateway;
mod https;
mod mux;
mod ops;
mod pages;
mod reload;
mod scoped;
mod support;
mod tls;
