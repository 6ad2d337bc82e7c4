"""Data: sources that list published data sets, face alignment, shards and streams."""
