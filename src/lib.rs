//! sprite-operator: runs one persistent AI-agent microVM per user on
//! Sprites.dev, managed through the `User` and `Sprite` custom resources.

pub mod api;
pub mod crdgen;
pub mod sim;
pub mod sprites;
pub mod telemetry;
