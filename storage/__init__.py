"""Parquet schemas, shard layout, atomic writers and the ledger of finished work (a leaf package)."""
