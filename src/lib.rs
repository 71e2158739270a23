//! sprite-operator: runs one persistent AI-agent microVM per user on
//! Sprites.dev, managed through the `User` and `Sprite` custom resources.

pub mod api;
pub mod config;
pub mod controller;
pub mod crdgen;
pub mod demo;
pub mod event_loop;
pub mod money;
pub mod relay;
pub mod runtime;
pub mod sim;
pub mod sprites;
pub mod telemetry;
pub mod testenv;
pub mod timers;
