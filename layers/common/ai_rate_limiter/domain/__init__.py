"""Pure domain: no I/O imports here."""
