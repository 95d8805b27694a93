"""Auditing a finished run: report page, run comparison, pictures, export."""
