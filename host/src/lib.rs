//! `nvcim`: the host side of nvcim — the command-line tool and its library.
//!
//! The binary (`nvcim`) only parses arguments and dispatches to [`commands`]; every verb is a
//! module there with a `run` function. The hardware model itself lives in `nvcim-shared`.

pub mod cli;
pub mod commands;
pub mod firmware;
pub mod ir;
pub mod onnx;
pub mod options;
