pub mod compile;
pub mod diagnostic;
pub mod env;
pub mod load;
pub mod model;
pub mod raw;
pub mod shape;
pub mod yaml;
