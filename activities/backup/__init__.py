"""Backups, archiving and restores with pgBackRest."""
