"""Catalogue watcher: STAC polling, scene upsert and the transactional outbox."""
