//! `nvcim`: the host side of nvcim — the command-line tool and its library.
//!
//! The binary (`nvcim`) only parses arguments and dispatches to [`commands`]; every verb is a
//! module there with a `run` function. The hardware model itself lives in `nvcim-shared`;
//! [`data`] reads datasets, [`model`] holds the Burn networks and the training noise, and
//! [`training`] the training loop.

pub mod cli;
pub mod commands;
pub mod data;
pub mod model;
pub mod options;
pub mod training;
