//! nvcim firmware (work in progress): the board support arrives with the firmware issue.
#![no_std]
