"""The HTTP ingest process (`payhook serve`): authenticate, decode, normalize, publish or spool."""
