//! The Tidings relay (in progress).
