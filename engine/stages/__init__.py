"""Stages: each computes one kind of fact for rows of the store (one module per stage), on the one
mechanism in ``base`` (selection, resume, commits, rejects, runs); executors in ``executors``."""
