"""Pure values shared by every layer: messages, requests, stream events, usage, exchanges.

Nothing here does I/O or imports SQLAlchemy or an HTTP client.
"""
