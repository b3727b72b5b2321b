//! The store engine as a tower-sessions 0.14 `SessionStore` (in progress).
