//! Network-namespace lab (filled in by the end-to-end tests).
