"""The embedded demo: a synthetic text-to-image task small enough to align on a CPU.

``shapes`` renders the pictures and holds the hidden preference rule (warmer object colour wins) and its
scorer; ``pretrain`` trains the shipped base model and embedder (``assets/``); ``make_pairs`` writes the
preference pairs; ``python -m rpo_fast.demo`` runs the whole demo (``make demo``).
"""
