//! One integration-test binary (each binary links the whole dependency tree): a module per area.

mod sim_support;
mod sprites_client;
mod sprites_conformance;
mod sprites_faults;
mod sprites_wire;
