"""The gateway: routing model ids to candidates, retries, fallbacks, timeouts, recording."""
