//! nvcim firmware (work in progress): the board support arrives with the firmware issue.
#![cfg_attr(not(test), no_std)]
