pub mod diagnostic;
pub mod yaml;
pub mod env;
pub mod raw;
