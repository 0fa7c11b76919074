//! Helpers shared by the integration tests (`mod common;` in a test file).

pub mod guest;
pub mod netns;
pub mod vhost_driver;
