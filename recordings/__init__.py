"""recordings: call capture, envelope encryption per recording, ingest, retention and legal hold, export, and
signed, timestamped call records (see docs/recordings.md)."""
