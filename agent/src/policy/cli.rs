//! Text for `latch policy check` and `latch policy explain`; the binary parses arguments.
