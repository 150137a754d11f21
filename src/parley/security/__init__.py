"""Secrets handling that touches no HTTP: password hashing (``passwords``), the random
tokens that stand for a user (``tokens``: API keys, session tokens, CSRF tokens) and
provider keys encrypted at rest (``vault``). Plain secrets exist only in memory: what is
stored is an argon2 hash (passwords), a SHA-256 digest (tokens, which are random and
high-entropy, so a fast digest suffices) or ciphertext (provider keys).
"""
