"""Object-class synonym lists from RLIPv2 (see SOURCES.md)."""
