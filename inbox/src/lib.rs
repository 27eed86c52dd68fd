//! Placeholder: the inbox (issue 4) is not built yet. The schema for it (`tidings.inbox`,
//! `tidings.inbox_dead_letters`) already exists in `tidings-migrations`; this crate exposes
//! nothing until its API is real.
