"""Helpers every stage uses: seeding, logging, option names, the checkpoint file reader and writer."""
